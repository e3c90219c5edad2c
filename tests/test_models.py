"""Architectures and recipes: every model trains, validates, resumes, predicts and ensembles from its checkpoint
alone; the recipes do what they say; bad flags are refused before any work."""

import json

import numpy as np
import pytest
import torch

from evaluate.cli import main as eval_main
from store import open_store
from train.cli import main as train_main
from train.config import TrainConfig
from train.models import MODELS, make_loss, record
from train.runs import RunError, load_run

BASE = ["--patch-size", "16", "16", "16", "--workers", "0", "--epochs", "2", "--lr", "0.01"]
SMALL = {"unet": ["--channels", "4", "8", "16"], "segresnet": ["--channels", "8", "16", "32"],
         "dynunet": ["--channels", "4", "8", "16", "--deep-supervision", "--loss", "dicece", "--optimizer", "sgd",
                     "--schedule", "poly"]}


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, extra in SMALL.items():
        out[name] = root / name
        assert train_main(["--store", tiny_store, "--run-dir", str(out[name]), "--model", name, *BASE, *extra]) == 0
    return out


@pytest.mark.parametrize("name", list(SMALL))
def test_each_model_trains_records_its_architecture_and_evaluates(runs, name):
    run = runs[name]
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["architecture"]["name"] == name and ck["architecture"]["class"] == MODELS[name].cls
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == name and cfg["loss"] == ("dicece" if name == "dynunet" else "dice")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["wall_s"] > 0 for r in records) and records[-1]["wall_s"] > records[0]["wall_s"]
    assert "val_loss" in records[-1] and np.isfinite(records[-1]["train_loss"])
    loaded = load_run(run)
    assert type(loaded.models[0]).__name__ == MODELS[name].cls.rsplit(".", 1)[1]
    assert eval_main(["--run-dir", str(run), "--metrics", "legacy"]) == 0


def test_resume_continues_and_refuses_another_architecture(runs, tiny_store, capsys):
    run = runs["segresnet"]
    assert train_main(["--store", tiny_store, "--run-dir", str(run), "--model", "segresnet", *BASE[:-4],
                       "--epochs", "3", "--lr", "0.01", *SMALL["segresnet"], "--resume"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert train_main(["--store", tiny_store, "--run-dir", str(run), "--model", "unet", *BASE,
                       "--channels", "8", "16", "32", "--resume"]) == 2
    assert "model was 'segresnet', now 'unet'" in capsys.readouterr().err


def test_ensembles_of_different_architectures(runs, tmp_path, capsys):
    run = load_run(runs["unet"], [str(runs["segresnet"]), str(runs["dynunet"])])
    assert len(run.models) == 3 and "dynunet, segresnet, unet" in run.kind
    assert eval_main(["--run-dir", str(runs["unet"]), "--ensemble", str(runs["segresnet"]), str(runs["dynunet"]),
                      "--metrics", "legacy"]) == 0
    summary = json.loads((runs["unet"] / "eval" / "test.json").read_text())
    assert summary["models"].startswith("ensemble of 3 models")
    # a run whose preprocessing differs is refused in one line
    other = tmp_path / "other"
    other.mkdir()
    for f in ("best.pt", "config.json"):
        (other / f).write_bytes((runs["segresnet"] / f).read_bytes())
    prep = json.loads((runs["segresnet"] / "preprocessing.json").read_text())
    prep["params"]["spacing_mm"] = [1.0, 1.0, 1.0]
    (other / "preprocessing.json").write_text(json.dumps(prep))
    with pytest.raises(RunError, match="its preprocessing .* differ"):
        load_run(runs["unet"], [str(other)])
    capsys.readouterr()
    assert eval_main(["--run-dir", str(runs["unet"]), "--ensemble", str(other)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_deep_supervision_weights_halve_per_level():
    from monai.losses import DiceLoss

    cfg = TrainConfig(model="dynunet", deep_supervision=True, loss="dice")
    loss = make_loss(cfg)
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    outs = torch.randn(2, 3, 3, 8, 8, 8)  # (B, 1 + 2 levels, R, X, Y, Z)
    base = DiceLoss(sigmoid=True, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)
    want = sum(w * base(outs[:, i], target) for i, w in enumerate((1.0, 0.5, 0.25)))
    assert float(loss(outs, target)) == pytest.approx(float(want), rel=1e-5)
    assert float(loss(outs[:, 0], target)) == pytest.approx(float(base(outs[:, 0], target)))  # evaluation output


def test_recipes_poly_schedule_and_sgd(runs):
    records = [json.loads(line) for line in (runs["dynunet"] / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == pytest.approx(0.01) and records[1]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)
    state = torch.load(runs["dynunet"] / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert state["momentum"] == 0.99 and state["nesterov"] is True


def test_time_limit_stops_cleanly(tiny_store, tmp_path, capsys):
    run = tmp_path / "timed"
    assert train_main(["--store", tiny_store, "--run-dir", str(run), *BASE[:-4], "--epochs", "50", "--val-every", "10",
                       *SMALL["unet"], "--time-limit", "0.0005"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "val_loss" in records[0]  # validated although not a validation epoch
    assert (run / "best.pt").exists() and (run / "last.pt").exists()
    assert "time limit" in capsys.readouterr().out


class FakeClock:
    """The trainer's clock advanced by hand: each training epoch takes ``epoch_s``, each validated case ``case_s``."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _time_limited_run(tiny_store, tmp_path, monkeypatch, limit_min: float, epoch_s: float, case_s: float,
                      resume_from=None, extra=()):
    """A --time-limit run of the trainer on the fake clock; (records, trainer, validation cases)."""
    import train.engine as engine
    from store import open_store
    from train.options import build_parser, config_from_args

    run = resume_from or tmp_path / "timed"
    flags = ["--store", tiny_store, "--run-dir", str(run), *BASE[:-4], "--epochs", "50", "--val-every", "3",
             "--lr", "0.01", "--schedule", "poly", *SMALL["unet"], "--time-limit", str(limit_min), *extra]
    cfg = config_from_args(build_parser().parse_args(flags + (["--resume"] if resume_from else [])))
    sp = open_store(tiny_store).splits
    clock = FakeClock()
    real_validate, real_epoch = engine.validate, engine.Trainer.train_epoch

    def validate(model, store, case_ids, *args, **kwargs):
        clock.t += case_s * len(case_ids)
        return real_validate(model, store, case_ids, *args, **kwargs)

    def train_epoch(self, epoch):
        clock.t += epoch_s
        return real_epoch(self, epoch)

    monkeypatch.setattr(engine, "validate", validate)
    monkeypatch.setattr(engine.Trainer, "train_epoch", train_epoch)
    trainer = engine.Trainer(cfg, sp["train"], sp["val"], run, progress=False)
    trainer.clock = clock
    trainer.fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records, trainer, len(sp["val"])


def test_a_time_limit_counts_each_epochs_validation_and_the_schedule_ends_at_its_end(tiny_store, tmp_path,
                                                                                      monkeypatch):
    # 60 s; epochs of 10 s; validating every case takes 8 s, timed on one case before the first epoch. Going on
    # after an epoch needs its due validation, the next epoch and that epoch's validation within the limit
    records, trainer, n_val = _time_limited_run(tiny_store, tmp_path, monkeypatch, 1.0, 10.0, 8.0 / 2)
    val_s = 4.0 * n_val
    assert trainer.summary["stopped"] == "time limit of 1 min"
    assert records[-1]["wall_s"] <= 60.0  # the stopping epoch's own validation inside the limit
    assert "val_loss" in records[-1] and records[-1]["val_s"] == pytest.approx(val_s)
    # one more epoch would not have fitted: its training and validation after what was done
    assert records[-1]["wall_s"] + 10.0 + val_s > 60.0
    # each epoch's learning rate is the poly schedule at the share of the limit at that epoch's planned end, so the
    # last epoch trains at the schedule's end, not one epoch behind it
    # (decided after each epoch's training: its due validation, the next epoch, that one's validation)
    planned_end = [r["wall_s"] + 10.0 + val_s for r in records[:-1]]
    for r, end in zip(records[1:], planned_end):
        assert r["lr"] == pytest.approx(0.01 * (1 - min(1.0, end / 60.0)) ** 0.9)
    assert records[-1]["lr"] <= 0.01 * (1 - 0.75) ** 0.9


def test_a_resumed_time_limited_run_takes_the_validation_time_from_its_record(tiny_store, tmp_path, monkeypatch):
    records, _, n_val = _time_limited_run(tiny_store, tmp_path, monkeypatch, 1.0, 10.0, 4.0)
    resumed, trainer, _ = _time_limited_run(tiny_store, tmp_path, monkeypatch, 2.0, 10.0, 4.0,
                                            resume_from=tmp_path / "timed")
    assert len(resumed) > len(records)
    # no validation case was timed before the resumed epochs: the record's figure decided
    first_resumed = resumed[len(records)]
    assert first_resumed["wall_s"] == pytest.approx(records[-1]["wall_s"] + 10.0 + (
        4.0 * n_val if "val_s" in first_resumed else 0.0))
    assert trainer.val_seconds == pytest.approx(4.0 * n_val)


def test_snapshots_keep_the_run_as_it_stood_at_each_minute(tiny_store, tmp_path, monkeypatch):
    # 2 min; epochs of 10 s, a validation of every case 4 s each. Snapshots at 0.5 and 1 min, and one at 5 min,
    # after the run's end
    from train import snapshots
    from train.runs import load_run

    records, trainer, n_val = _time_limited_run(tiny_store, tmp_path, monkeypatch, 2.0, 10.0, 4.0,
                                                extra=["--snapshot-at", "1", "0.5", "5"])
    val_s, run = 4.0 * n_val, tmp_path / "timed"
    taken = {}
    for minutes in (0.5, 1.0, 5.0):
        folder = snapshots.folder(run, minutes)
        snap = json.loads((folder / "snapshot.json").read_text())
        taken[minutes] = snap
        kept = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert len(kept) == snap["epoch"] and kept == records[:snap["epoch"]]  # the run as it stood
        assert "val_loss" in kept[-1] and kept[-1]["wall_s"] == snap["wall_s"]  # validated at the snapshot
        assert load_run(folder).kind == "single model"  # a run folder evaluate and predict read
    for minutes in (0.5, 1.0):
        snap = taken[minutes]
        # the last epoch before the minute: its training ended before it, and another epoch and its validation
        # would have passed it
        assert snap["wall_s"] - val_s < 60 * minutes < snap["wall_s"] + 10.0 + val_s
    assert taken[5.0]["epoch"] == len(records) and taken[5.0]["wall_s"] == records[-1]["wall_s"]
    assert taken[0.5]["epoch"] < taken[1.0]["epoch"] < len(records)
    assert sorted(m for r in records for m in r.get("snapshots", ())) == [0.5, 1.0, 5.0]


@pytest.mark.parametrize("flags,message", [
    (["--snapshot-at", "0"], "--snapshot-at takes distinct positive numbers of minutes"),
    (["--snapshot-at", "2", "2"], "--snapshot-at takes distinct positive numbers of minutes"),
    (["--model", "unet", "--deep-supervision"], "--deep-supervision: unet has no deep supervision"),
    (["--model", "swinunetr", "--channels", "12", "--patch-size", "48", "48", "48"], "multiple of 32"),
    (["--model", "swinunetr", "--channels", "12", "--patch-size", "32", "32", "32"], "at least 64"),
    (["--model", "swinunetr", "--channels", "16"], "multiple of 12"),
    (["--model", "segresnet", "--channels", "8", "24"], "double at each level"),
    (["--model", "dynunet", "--channels", "4", "8", "16", "32", "--patch-size", "20", "20", "20"], "multiple of 8"),
    (["--time-limit", "0"], "--time-limit must be a positive"),
    (["--time-limit", "-2"], "--time-limit must be a positive"),
])
def test_bad_model_flags_are_refused_before_any_work(flags, message, tmp_path, capsys):
    run = tmp_path / "never"
    args = ["--store", str(tmp_path / "no-store.zarr"), "--run-dir", str(run), "--workers", "0"]
    if "--patch-size" not in flags:
        args += ["--patch-size", "64", "64", "64"]
    assert train_main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_unknown_names_are_usage_errors(capsys):
    for flag in ("--model", "--loss", "--optimizer", "--schedule"):
        with pytest.raises(SystemExit) as e:
            train_main([flag, "nope"])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_records_rebuild_the_same_network():
    """The network rebuilt from its JSON record is the same network: the same class, the original's weights load
    into it with every key matching, and it then gives the original's outputs."""
    from train.models import build, build_from_record

    for name in MODELS:
        cfg = TrainConfig(model=name, channels=MODELS[name].default_channels, modalities=("t1", "t2"),
                          patch_size=(64, 64, 64) if name == "swinunetr" else (32, 32, 32))
        a, b = build(cfg), build_from_record(json.loads(json.dumps(record(cfg))))
        assert type(a) is type(b)
        b.load_state_dict(a.state_dict(), strict=True)
        a.eval(), b.eval()
        x = torch.randn(1, 2, *cfg.patch_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out_a, out_b = a(x), b(x)
        out_a = out_a[0] if isinstance(out_a, (list, tuple)) else out_a
        out_b = out_b[0] if isinstance(out_b, (list, tuple)) else out_b
        assert torch.equal(out_a, out_b), name


def test_swinunetr_trains_and_predicts(tmp_path):
    from prep.build import BuildConfig, build_store
    from prep.synth import SynthConfig, synth_cohort

    from .helpers import synth_spacing

    shape = (120, 120, 78)  # 2 mm voxels: cropped cases of at least 64 voxels a side, as SwinUNETR needs
    synth_cohort(SynthConfig(out=tmp_path / "raw", cases=6, seed=3, shape=shape), progress=False)
    store = tmp_path / "s.zarr"
    assert build_store(BuildConfig(source=str(tmp_path / "raw"), store=str(store), workers=0,
                                   spacing=synth_spacing(shape)), progress=False).ok
    run = tmp_path / "swin"
    assert train_main(["--store", str(store), "--run-dir", str(run), "--model", "swinunetr", "--channels", "12",
                       "--patch-size", "64", "64", "64", "--batch-size", "1", "--epochs", "1", "--steps-per-epoch",
                       "1", "--workers", "0", "--loss", "dicefocal", "--schedule", "cosine"]) == 0
    # training validated a whole case by sliding window; the saved model rebuilds from its checkpoint and predicts
    # (one window: a whole-case evaluation would repeat validation's half minute)
    from evaluate.inference import predict_probabilities

    loaded = load_run(run)
    assert loaded.config.model == "swinunetr"
    image = open_store(store).case(open_store(store).splits["val"][0]).image(loaded.config.modalities,
                                                                            region=(slice(0, 64),) * 3)
    prob = predict_probabilities(loaded, image, torch.device("cpu"))
    assert prob.shape == (3, *image.shape[1:]) and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


def test_time_limited_schedules_run_their_course():
    from train.models import make_schedule

    share = {"t": 0.0}
    for schedule, at_half in (("poly", 0.5 ** 0.9), ("cosine", 0.5)):
        cfg = TrainConfig(schedule=schedule, epochs=1000, lr=1.0, eta_min=0.0, time_limit=10)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_schedule(cfg, opt, progress=lambda: share["t"])
        share["t"] = 0.5  # half the time spent after one of 1000 epochs: the schedule is half way
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(at_half)
        share["t"] = 0.0
    # without a time limit, epochs alone: cosine over 4 epochs is at half after 2
    cfg = TrainConfig(schedule="cosine", epochs=4, lr=1.0, eta_min=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(cfg, opt)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["segresnet", "dynunet"])
def test_models_train_with_amp_from_streamed_patches_and_evaluate_with_tta(name, tiny_store, tmp_path, capsys):
    """--amp and --cache none with each architecture: the run says the precision it used and that it streamed its
    patches, trains an epoch, and its test cases are scored with the 8 mirrorings."""
    from train.device import cpu_has_bf16

    run = tmp_path / name
    assert train_main(["--store", tiny_store, "--run-dir", str(run), "--model", name, *BASE[:-4], "--epochs", "1",
                       *SMALL[name], "--amp", "--cache", "none", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert ("bf16 autocast (CPU)" if cpu_has_bf16() else "this CPU has no native bf16") in out
    assert "cache none" in out, out
    assert len([line for line in (run / "metrics.jsonl").read_text().splitlines() if line]) == 1
    assert eval_main(["--run-dir", str(run), "--metrics", "legacy", "--tta"]) == 0
    rows = (run / "eval" / "test-tta.csv").read_text().splitlines()
    assert len(rows) == 1 + len(open_store(tiny_store).splits["test"])
