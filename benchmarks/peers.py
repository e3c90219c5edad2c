"""nnU-Net v2 beside ``build-store``: the same cases, the same number of processes, timed the same way.

nnU-Net's preprocessing is three commands: a dataset fingerprint (``nnUNetv2_extract_fingerprint``), planning
(``nnUNetv2_plan_experiment``) and preprocessing (``nnUNetv2_preprocess -c 3d_fullres``). The benchmark cohort
is converted to nnU-Net's raw format (images linked, not copied; labels made consecutive, as nnU-Net requires:
BraTS 2021's 4 becomes 3) and each command is timed as a whole. Per case, once started:

- preprocessing: the spacing of the per-case files it writes (the last minus the first, over n - 1 cases);
- fingerprint: its wall time over the cases. It writes nothing per case, and most of its time is not per case
  anyway: it draws 10^8 foreground intensities in all, shared out over the cohort, and takes percentiles of
  them (about 45 s on one process here for 4 cases as for 8).

Training beside ours (``python -m benchmarks nnunet``): the same conversion for the training and validation cases,
with BraTS's regions (WT, TC, ET through ``regions_class_order``, as nnU-Net trains BraTS), our split as
nnU-Net's fold 0 (``splits_final.json``), ``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train 3d_fullres 0`` with a
trainer whose epochs and iterations fill the time budget (:func:`write_trainer`), ``nnUNetv2_predict`` on the test
cases without and with its mirroring, each command timed as a whole; its label files are mapped back to the
source convention and scored as ours are.

nnU-Net v2 is an optional peer (``pip install -e '.[peers]'``), never needed by the project itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = ("nnU-Net v2 is not installed, so it is not measured: pip install -e '.[peers]' installs it "
                "(an optional extra, never needed by the project itself)")
DATASET_ID = 501


def available() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def nnunet_labels(convention: str):
    """The label values of ``convention`` in nnU-Net's consecutive order: nnU-Net's label k is ``values[k]``."""
    from store.conventions import label_values

    return tuple(label_values(convention))


def from_nnunet(label, convention: str):
    """An nnU-Net label map (0, 1, 2, ...) back in ``convention``'s values (BraTS 2021: 3 becomes 4)."""
    from store.conventions import numbering_to, relabel

    mapping = numbering_to(convention, "nnunet")
    if label.size and int(label.max()) >= len(mapping):
        raise ValueError(f"nnU-Net label {int(label.max())} has no {convention} value (labels 0..{len(mapping) - 1})")
    return relabel(label, mapping)


def write_split(preprocessed: Path, train_ids, val_ids) -> Path:
    """Our train/val split as nnU-Net's fold 0: ``splits_final.json`` in the preprocessed dataset folder, which
    nnU-Net reads instead of drawing its own 5 folds."""
    if not train_ids or not val_ids:
        raise ValueError("nnU-Net's fold 0 needs training and validation cases")
    preprocessed.mkdir(parents=True, exist_ok=True)
    path = preprocessed / "splits_final.json"
    path.write_text(json.dumps([{"train": sorted(train_ids), "val": sorted(val_ids)}], indent=1))
    return path


def link_images(cases, folder: Path) -> Path:
    """``cases``' images as nnU-Net's inference input: {case}_{channel:04d}.nii.gz links in ``folder``."""
    from store.conventions import MODALITIES

    folder.mkdir(parents=True, exist_ok=True)
    for c in cases:
        for k, m in enumerate(MODALITIES):
            link = folder / f"{c.case_id}_{k:04d}.nii.gz"
            link.unlink(missing_ok=True)
            link.symlink_to(Path(c.images[m]).resolve())
    return folder


def to_nnunet_raw(cases, raw_root: Path, dataset_id: int = DATASET_ID, regions: bool = False) -> Path:
    """``cases`` (prep.discover.CaseFiles, one label convention) as nnU-Net's raw dataset under ``raw_root``:
    imagesTr/{case}_{channel:04d}.nii.gz linked to the sources, labelsTr/{case}.nii.gz with the labels renumbered
    0, 1, 2, ... in the convention's order, dataset.json. With ``regions``, dataset.json declares BraTS's regions
    (:func:`region_labels`) instead of the labels, as nnU-Net trains BraTS. Returns the dataset folder."""
    import nibabel as nib
    import numpy as np

    from store.conventions import LABEL_CONVENTIONS, MODALITIES, relabel

    conventions = {c.label_convention for c in cases}
    if len(conventions) != 1:
        raise ValueError(f"one label convention per nnU-Net dataset, got {sorted(conventions)}")
    convention = conventions.pop()
    values = nnunet_labels(convention)
    names = LABEL_CONVENTIONS[convention]["labels"]
    folder = raw_root / f"Dataset{dataset_id:03d}_BraTSBench"
    link_images(cases, folder / "imagesTr")
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for c in cases:
        seg = nib.load(str(c.seg))
        src = np.asanyarray(seg.dataobj)
        if stray := sorted(set(np.unique(src).tolist()) - set(values)):
            raise ValueError(f"case {c.case_id}: labels {stray} are not {convention} labels {list(values)}")
        lab = relabel(src, {v: k for k, v in enumerate(values)})
        out = nib.Nifti1Image(lab, seg.affine, seg.header)
        out.set_data_dtype(np.uint8)
        nib.save(out, str(folder / "labelsTr" / f"{c.case_id}.nii.gz"))
    meta = {
        "channel_names": {str(k): m.upper() for k, m in enumerate(MODALITIES)},
        "labels": {"background": 0, **{names[str(v)]: i for i, v in enumerate(values) if v}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    if regions:
        meta["labels"], meta["regions_class_order"] = region_labels(convention)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def region_labels(convention: str) -> tuple[dict, list[int]]:
    """BraTS's regions in nnU-Net's terms for ``convention``'s labels renumbered 0, 1, 2, ...: each region (WT, TC,
    ET, in that order) the list of nnU-Net labels it unites, and ``regions_class_order``, the label each predicted
    region paints over the ones before it (WT first, so the core and then the enhancing part overwrite it); a
    region's label is its one label the later regions do not hold."""
    from store.conventions import region_labels as members_of

    values = nnunet_labels(convention)
    order = ("WT", "TC", "ET")
    members = {r: sorted(values.index(v) for v in members_of(convention, r)) for r in order}
    labels = {"background": 0, **{f"region {r}": members[r] for r in order}}
    paint = []
    for i, r in enumerate(order):
        later = {m for q in order[i + 1:] for m in members[q]}
        own = [m for m in members[r] if m not in later]
        if len(own) != 1:
            raise ValueError(f"{convention}: region {r} has no single label of its own ({own})")
        paint.append(own[0])
    return labels, paint


def _command(name: str) -> str:
    """nnU-Net's console script beside this interpreter (its extra installs them there), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; {INSTALL_HINT}")
    return found


def _run(args: list[str], env: dict, log: Path | None = None) -> float:
    """Run one command to the end; its wall seconds. With ``log``, its output goes there (appended)."""
    t0 = time.perf_counter()
    if log is None:
        r = subprocess.run(args, env=env, capture_output=True, text=True)
        tail = r.stderr
    else:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, args))}\n")
            f.flush()
            r = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT)
        tail = Path(log).read_text()
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}): {tail[-3000:]}")
    return time.perf_counter() - t0


def _environment(work: Path) -> dict:
    """nnU-Net's three folders, and ``nnunet_env`` (see its sitecustomize) ahead on PYTHONPATH so its trainer lookup
    imports with a CUDA build of torchvision beside a CPU build of torch."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent / "nnunet_env"), os.environ.get("PYTHONPATH"))
                           if p)
    return {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
            "nnUNet_results": str(work / "results"), "PYTHONPATH": path}


_PROBE = """
import json, os, statistics, sys, time
import torch
from nnunetv2.run.run_training import get_trainer_from_args
t = get_trainer_from_args(sys.argv[1], "3d_fullres", 0, sys.argv[2], device=torch.device(sys.argv[3]))
t.on_train_start()
t.on_train_epoch_start()
t.train_step(next(t.dataloader_train))  # warm-up
times, val = [], []
for _ in range(int(sys.argv[4])):
    t0 = time.perf_counter()
    t.train_step(next(t.dataloader_train))
    times.append(time.perf_counter() - t0)
t.on_validation_epoch_start()
with torch.no_grad():
    for _ in range(int(sys.argv[4])):
        t0 = time.perf_counter()
        t.validation_step(next(t.dataloader_val))
        val.append(time.perf_counter() - t0)
print(json.dumps({"seconds_per_iteration": statistics.median(times), "timed_iterations": len(times),
                  "seconds_per_val_iteration": statistics.median(val),
                  "iterations_per_epoch": t.num_iterations_per_epoch, "epochs": t.num_epochs,
                  "val_iterations_per_epoch": t.num_val_iterations_per_epoch}), flush=True)
os._exit(0)  # its data-augmentation processes end with it
"""


def plan_and_preprocess(train_cases, val_cases, work: Path, processes: int = 2) -> dict:
    """nnU-Net's ``plan_and_preprocess`` of our training and validation cases with BraTS's regions, our split as its
    fold 0; its wall seconds and the 3d_fullres plan."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = to_nnunet_raw([*train_cases, *val_cases], work / "raw", regions=True)
    wall = _run([_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np",
                 str(processes)], _environment(work), work / "nnunet.log")
    write_split(work / "preprocessed" / raw.name, [c.case_id for c in train_cases], [c.case_id for c in val_cases])
    plans = json.loads((work / "preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    plan = plans["configurations"]["3d_fullres"]
    return {"plan_and_preprocess_s": wall,
            "plan": {k: plan.get(k) for k in ("patch_size", "batch_size", "spacing", "median_image_size_in_voxels")}}


def training_estimate(work: Path, trainer: str, device: str = "cpu", iterations: int = 3,
                      processes: int | None = None) -> dict:
    """nnU-Net's own trainer timed for a few training and validation iterations (after one warm-up) on the
    preprocessed data, with ``processes`` augmentation processes (``nnUNet_n_proc_DA``; None: its own choice), and
    the training time of a whole ``trainer`` run at that rate (its training iterations only: validation iterations
    and the final validation come on top, so it is a lower bound). Each iteration includes its wait for the batch."""
    out, err = work / "probe.out", work / "probe.err"
    with open(out, "w") as fo, open(err, "w") as fe:  # files, not pipes: its augmentation workers inherit them
        proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(DATASET_ID), trainer, device, str(iterations)],
                                env={**_environment(work), **({} if processes is None else
                                                              {"nnUNet_n_proc_DA": str(processes)})},
                                stdout=fo, stderr=fe, start_new_session=True)
        try:
            rc = proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):  # the workers it leaves behind, with it
                os.killpg(proc.pid, signal.SIGTERM)
    if rc:
        raise RuntimeError(f"timing nnU-Net's {trainer} failed ({rc}): {err.read_text()[-3000:]}")
    probe = json.loads(out.read_text().strip().splitlines()[-1])
    probe["training_s_at_least"] = probe["seconds_per_iteration"] * probe["iterations_per_epoch"] * probe["epochs"]
    return probe


TRAINER = "nnUNetTrainer_race"
_TRAINER_SOURCE = '''"""Written by the race (python -m benchmarks nnunet, benchmarks.peers.write_trainer): nnU-Net's own
trainer with a schedule that ends inside the time budget, so that its poly learning rate anneals to the end,
seeded, and timed by phase into race_times.json beside its checkpoints."""
import json
import os
import random
import time

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        seed = int(os.environ.get("nnUNet_race_seed", "0"))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iterations}
        self.num_val_iterations_per_epoch = {val_iterations}
        self.race = {{"seed": seed, "epochs": {epochs}, "iterations_per_epoch": {iterations},
                     "val_iterations_per_epoch": {val_iterations}, "setup_s": 0.0, "training_iterations_s": 0.0,
                     "validation_s": 0.0, "epoch_end_s": 0.0, "final_validation_s": 0.0, "lr": []}}
        self._t = time.perf_counter()

    def _lap(self, key):
        now = time.perf_counter()
        self.race[key] += now - self._t
        self._t = now

    def on_train_start(self):
        super().on_train_start()
        self._lap("setup_s")

    def on_train_epoch_start(self):
        self._lap("epoch_end_s")  # what passed since the last epoch ended: the epoch's end and checkpoint
        super().on_train_epoch_start()
        self.race["lr"].append(self.optimizer.param_groups[0]["lr"])

    def on_train_epoch_end(self, outputs):
        super().on_train_epoch_end(outputs)
        self._lap("training_iterations_s")

    def on_validation_epoch_end(self, outputs):
        super().on_validation_epoch_end(outputs)
        self._lap("validation_s")

    def perform_actual_validation(self, save_probabilities=False):
        self._lap("epoch_end_s")
        super().perform_actual_validation(save_probabilities)
        self._lap("final_validation_s")
        with open(os.path.join(self.output_folder, "race_times.json"), "w") as f:
            json.dump(self.race, f, indent=1)
'''


def write_trainer(epochs: int, iterations: int, val_iterations: int, name: str = TRAINER) -> Path:
    """nnU-Net's trainer with ``epochs`` of ``iterations`` training and ``val_iterations`` validation iterations,
    written where nnU-Net looks for trainer classes (its own ``training/nnUNetTrainer`` folder) in the environment
    it runs in; its seed comes from ``nnUNet_race_seed`` in the environment."""
    if min(epochs, iterations, val_iterations) < 1:
        raise ValueError(f"a trainer needs at least one epoch and iteration, not {epochs}, {iterations}, "
                         f"{val_iterations}")
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "training" / "nnUNetTrainer" / f"{name}.py"
    path.write_text(_TRAINER_SOURCE.format(name=name, epochs=epochs, iterations=iterations,
                                           val_iterations=val_iterations))
    return path


def fit_schedule(train_s: float, per_iteration_s: float, per_val_iteration_s: float, per_epoch_s: float,
                 iterations: int = 250, val_ratio: int = 5, min_epochs: int = 10) -> dict:
    """nnU-Net's epochs for ``train_s`` seconds of its training loop: its own epoch (``iterations`` training and
    ``iterations / val_ratio`` validation iterations: 250 and 50) where ``min_epochs`` of them fit, else shorter
    epochs in the same ratio, so that ``min_epochs`` fit: its poly learning rate steps once an epoch, and anneals
    only over several. Each epoch costs its iterations' measured times and ``per_epoch_s`` more (its end:
    logging, plotting); at least one epoch of one iteration."""
    fit = (train_s / min_epochs - per_epoch_s) / (per_iteration_s + per_val_iteration_s / val_ratio)
    iterations = max(1, min(iterations, int(fit)))
    val = max(1, iterations // val_ratio)
    epoch = iterations * per_iteration_s + val * per_val_iteration_s + per_epoch_s
    return {"epochs": max(1, int(train_s // epoch)), "iterations_per_epoch": iterations,
            "val_iterations_per_epoch": val, "epoch_s_estimate": epoch}


def nnunet_train(work: Path, results: Path, seed: int, processes: int, device: str = "cpu") -> dict:
    """``nnUNetv2_train 3d_fullres 0`` with :data:`TRAINER` (written first by :func:`write_trainer`), its results in
    ``results`` (one folder per seed, emptied first), ``processes`` augmentation processes: its wall seconds, its phases
    (race_times.json) and its own log's epochs."""
    from .race import nnunet_epochs

    env = {**_environment(work), "nnUNet_results": str(results), "nnUNet_race_seed": str(seed),
           "nnUNet_n_proc_DA": str(processes)}
    log = results / "nnunet-train.log"
    shutil.rmtree(results, ignore_errors=True)  # what a killed attempt left
    results.mkdir(parents=True)
    wall = _run([_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", device],
                env, log)
    fold = next(results.glob(f"Dataset{DATASET_ID:03d}_*/{TRAINER}__nnUNetPlans__3d_fullres/fold_0"))
    return {"train_s": wall, "phases": json.loads((fold / "race_times.json").read_text()),
            "epochs_log": nnunet_epochs(fold), "fold": str(fold), "log": str(log)}


def nnunet_predict(work: Path, results: Path, test_cases, out: Path, mirroring: bool, processes: int,
                   device: str = "cpu") -> float:
    """``nnUNetv2_predict`` of ``test_cases`` with the trained model in ``results`` (its final checkpoint, its
    default), with or without its test-time mirroring: its wall seconds. Labels in nnU-Net's numbering, regions
    painted back into labels by its ``regions_class_order`` (:func:`from_nnunet` maps them to the convention)."""
    inputs = link_images(test_cases, work / "imagesTs")
    env, npr = {**_environment(work), "nnUNet_results": str(results)}, str(processes)
    wall = _run([_command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c",
                 "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", device, "-npp", npr, "-nps", npr,
                 "--disable_progress_bar", *([] if mirroring else ["--disable_tta"])], env,
                results / "nnunet-predict.log")
    written = sorted(out.glob("*.nii.gz"))
    if len(written) != len(test_cases):
        raise RuntimeError(f"nnU-Net predicted {len(written)} of {len(test_cases)} test cases; see {results}")
    return wall


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def nnunet_times(cases, work: Path, processes: int) -> dict:
    """Fingerprint, planning and 3d_fullres preprocessing of ``cases`` with ``processes`` processes: wall time of
    each command, seconds per case once started, bytes written."""
    if len(cases) < 2:
        raise ValueError("the nnU-Net comparison needs at least 2 cases")
    shutil.rmtree(work, ignore_errors=True)
    raw = to_nnunet_raw(cases, work / "raw")
    env = _environment(work)
    d, npr = str(DATASET_ID), str(processes)
    walls = {"fingerprint_s": _run([_command("nnUNetv2_extract_fingerprint"), "-d", d, "-np", npr], env),
             "plan_s": _run([_command("nnUNetv2_plan_experiment"), "-d", d], env),
             "preprocess_s": _run([_command("nnUNetv2_preprocess"), "-d", d, "-c", "3d_fullres", "-np", npr], env)}
    out = work / "preprocessed" / raw.name
    done = sorted(p.stat().st_mtime for p in out.glob("nnUNetPlans_3d_fullres/*.pkl"))
    if len(done) != len(cases):
        raise RuntimeError(f"nnU-Net wrote {len(done)} preprocessed cases for {len(cases)}")
    return {
        "version": _version(),
        "processes": processes,
        "cases": len(cases),
        "wall_s": {**walls, "total_s": sum(walls.values())},
        "per_case_s": {"preprocess": (done[-1] - done[0]) / (len(cases) - 1),
                       "fingerprint": walls["fingerprint_s"] / len(cases)},
        "bytes_written": _bytes_under(out),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("nnunetv2")


def compare(ours: dict, peer: dict) -> dict:
    """Ratios of nnU-Net's figures to build-store's (above 1: build-store is faster or smaller).

    ``ours``: {"per_case_s", "wall_s", "bytes_written"} for the same cases and processes."""
    pc = peer["per_case_s"]
    return {
        "per_case_preprocess_over_build": pc["preprocess"] / ours["per_case_s"],
        "per_case_fingerprint_plus_preprocess_over_build": (pc["fingerprint"] + pc["preprocess"])
        / ours["per_case_s"],
        "wall_fingerprint_plan_preprocess_over_build": peer["wall_s"]["total_s"] / ours["wall_s"],
        "bytes_over_build": peer["bytes_written"] / ours["bytes_written"],
        "goals": {"per_case_preprocess_over_build": ">= 3", "per_case_fingerprint_plus_preprocess_over_build": ">= 10",
                  "wall_fingerprint_plan_preprocess_over_build": ">= 8"},
    }
