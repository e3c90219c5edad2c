"""Inference of one case: this project's whole path (preprocess from NIfTI, sliding window, back to the source
grid) vs MONAI's bare ``sliding_window_inference`` on the same preprocessed tensor (roi = patch, overlap 0.5)."""

from __future__ import annotations

import time
from pathlib import Path

from .cohort import bench_inputs
from .report import bar_chart, summarize, write_result

OURS = "ours (NIfTI -> source-grid labels), pipelined"
BARE = "bare sliding window, tensors on the device"


def scoring_times(cases, reps: int) -> dict:
    """Seconds to score one case against its source seg, per family and all families together (what evaluate
    does per case): the reference moved by a voxel or two with a spurious blob added stands in for a prediction
    (several lesions, a spurious one)."""
    import functools

    import nibabel as nib
    import numpy as np

    from evaluate.scoring import FAMILIES, score_case

    fns = {f: functools.partial(score_case, families=(f,)) for f in FAMILIES}
    fns["all"] = score_case
    times = {k: [] for k in fns}
    for case in cases:
        img = nib.load(str(case.seg))
        ref = np.asanyarray(img.dataobj).astype(np.uint8)
        spacing = img.header.get_zooms()[:3]
        pred = np.roll(ref, (1, 2, 0), (0, 1, 2))
        idx = np.argwhere(ref > 0)
        far = tuple(int(v) for v in (np.array(ref.shape) - idx.mean(0)).clip(3, None) - 3)
        pred[far[0]:far[0] + 3, far[1]:far[1] + 3, far[2]:far[2] + 3] = 2
        if case is cases[0]:
            score_case(pred, ref, case.label_convention, spacing)  # warm-up: the scorers' first imports
        for _ in range(reps):
            for family, fn in fns.items():
                t0 = time.perf_counter()
                fn(pred, ref, case.label_convention, spacing)
                times[family].append(time.perf_counter() - t0)
    return {k: summarize(v) for k, v in times.items()}


def _exported(model, cfg, run_, cases, ours) -> dict:
    """The same path per case with the network exported to ONNX and run by onnxruntime, against torch in float32
    (an exported network has no autocast), the cases in the same order, each measured twice, alternating."""
    import dataclasses
    import importlib.util
    import tempfile

    if importlib.util.find_spec("onnxruntime") is None:
        return {"skipped": "onnxruntime is not installed (pip install -e '.[onnx]')"}
    from evaluate.exported import OnnxNet
    from train.export import EnsembleNet, write_network
    from train.runs import LoadedRun

    fp32 = dataclasses.replace(cfg, amp=False)
    torch_run = LoadedRun([model], fp32, [], run_.preprocessing, "torch float32", [fp32])
    with tempfile.TemporaryDirectory() as d:
        path = write_network(EnsembleNet([model.cpu()]), len(cfg.modalities), cfg.patch_size, Path(d) / "m.onnx",
                             "onnx")
        onnx_run = LoadedRun([OnnxNet(path)], fp32, [], run_.preprocessing, "onnxruntime", [fp32])
        ours(cases[:1], run=onnx_run)  # warm-up: the session's first run
        times = {"torch": [], "onnxruntime": []}
        for _ in range(2):
            times["torch"].append(ours(cases, run=torch_run) / len(cases))
            times["onnxruntime"].append(ours(cases, run=onnx_run) / len(cases))
    t, o = min(times["torch"]), min(times["onnxruntime"])
    return {"torch_s_per_case": t, "onnxruntime_s_per_case": o, "onnxruntime_over_torch": o / t,
            "runs": times, "goal": "onnxruntime <= torch per case (CPU)"}


def _bundle(model, cfg, run_, cases, source: Path, ours) -> dict:
    """The network exported as a MONAI bundle (``train export --format bundle``) and predicted by MONAI's runner
    (``monai.bundle.run``, in this process: its configuration parsed on each run, as a command would), against
    ``evaluate predict --model`` on the bundle's own TorchScript file; the whole cohort folder, alternating, twice
    each, the faster of each kept; seconds per case."""
    import importlib.util
    import sys
    import tempfile

    if importlib.util.find_spec("ignite") is None or importlib.util.find_spec("fire") is None:
        return {"skipped": "MONAI's bundle runner needs pytorch-ignite and fire (pip install -e '.[bundle]')"}
    from monai.bundle import run as bundle_run

    from evaluate.exported import load_exported
    from train.bundle import write_bundle
    from train.export import EnsembleNet, model_card, write_network

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "bundle"
        write_bundle(folder, lambda p: write_network(EnsembleNet([model.cpu()]), len(cfg.modalities), cfg.patch_size,
                                                      p, "torchscript"),
                     model_card(Path(d) / "run", run_, "torchscript", "model.ts", False))
        exported = load_exported(folder / "models" / "model.ts")
        sys.path.insert(0, str(folder))  # the bundle's scripts package, as running from its folder gives
        try:
            times = {"predict --model": [], "bundle": []}
            for k in range(2):
                times["predict --model"].append(ours(cases, run=exported) / len(cases))
                t0 = time.perf_counter()
                bundle_run(config_file=str(folder / "configs" / "inference.json"), bundle_root=str(folder),
                           dataset_dir=str(source), output_dir=str(Path(d) / f"out{k}"))
                times["bundle"].append((time.perf_counter() - t0) / len(cases))
                if len(list((Path(d) / f"out{k}").glob("*.nii.gz"))) != len(cases):
                    raise RuntimeError("the bundle did not predict every case")
        finally:
            sys.path.remove(str(folder))
    p, bnd = min(times["predict --model"]), min(times["bundle"])
    return {"predict_s_per_case": p, "bundle_s_per_case": bnd, "bundle_over_predict": bnd / p, "runs": times,
            "goal": "bundle <= 1.5x evaluate predict --model per case (CPU)"}


def _report(out_dir: Path, res: dict) -> None:
    """infer.json, infer.png and the console lines of ``run``'s result."""
    per_case, exported = res["seconds_per_case"], res["exported"]
    ours, bare = per_case[OURS], per_case[BARE]
    write_result(out_dir, "infer", res)
    bars = {k: {"median": v, "min": v, "max": v} for k, v in per_case.items()}
    bar_chart(out_dir / "infer.png", f"inference over {res['cases']} cases {'x'.join(map(str, res['grid']))}, "
              f"{res['device']}", "seconds per case", bars, log=False)
    print(f"infer: ours {ours:.2f} s, bare {bare:.2f} s per case over {res['cases']} cases "
          f"({res['ours_over_bare']:.2f}x); --tta {res['tta']['tta_over_plain']:.2f}x the plain pass")
    if "skipped" not in (bundle := res.get("bundle", {"skipped": ""})):
        print(f"infer: MONAI bundle under MONAI's runner {bundle['bundle_s_per_case']:.2f} s per case, evaluate "
              f"predict --model {bundle['predict_s_per_case']:.2f} s ({bundle['bundle_over_predict']:.2f}x)")
    if "skipped" not in exported:
        print(f"infer: exported to ONNX, onnxruntime {exported['onnxruntime_s_per_case']:.2f} s per case, torch "
              f"float32 {exported['torch_s_per_case']:.2f} s ({exported['onnxruntime_over_torch']:.2f}x)")
    sc = res["scoring_seconds_per_case"]
    print("scoring one case: " + ", ".join(f"{k} {v['median']:.2f} s" for k, v in sc.items()))


def run(out_dir: Path, work: Path, size: str = "full", repeats: int | None = None, amp: bool = False) -> dict:
    """Seconds per case over the benchmark cohort's folder: ours (NIfTI in, labels in the source geometry out,
    pipelined as ``evaluate predict --source``) vs bare ``sliding_window_inference`` on tensors already on the
    device; then ``--tta`` against the plain pass on the first cases."""
    import tempfile

    import torch
    from monai.inferers import sliding_window_inference

    from evaluate.predictions import predict_jobs
    from prep.discover import discover
    from prep.preprocess import preprocess
    from train.config import TrainConfig
    from train.device import amp_context
    from train.models import build
    from train.runs import LoadedRun

    b = bench_inputs(work, size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mods = ("t1", "t1ce", "t2", "flair")
    cfg = TrainConfig(modalities=mods, patch_size=b.patch, channels=b.channels, amp=amp)
    torch.manual_seed(0)
    model = build(cfg).to(device).eval()
    cases = discover(b.raw).cases
    conv = cases[0].label_convention
    run_ = LoadedRun([model], cfg, [], {"params": {"spacing_mm": list(b.spacing), "crop_margin": 2},
                                        "label_convention": conv}, "benchmark model", [cfg])
    autocast, _, amp_desc = amp_context(cfg, device)
    n_tta = {"full": 1, "quick": 2, "tiny": 1}[size]

    def ours(subset, tta=False, run=run_) -> float:
        with tempfile.TemporaryDirectory() as d:
            jobs = [(c, Path(d) / f"{c.case_id}.nii.gz") for c in subset]
            t0 = time.perf_counter()
            written, failed = predict_jobs(run, device, jobs, conv, tta)
            seconds = time.perf_counter() - t0
        if failed:
            raise RuntimeError(f"benchmark prediction failed: {failed}")
        return seconds

    tensors = [torch.from_numpy(preprocess(c, mods, with_label=False, spacing=b.spacing).image)[None].to(device)
               for c in cases]

    def bare(x) -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            out = sliding_window_inference(x, roi_size=b.patch, sw_batch_size=cfg.sw_batch_size, predictor=model,
                                           overlap=0.5)
        out.float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    bare(tensors[0])  # warm-up of both paths
    ours(cases[:1])
    bare_s = [bare(x) for x in tensors]
    ours_total = ours(cases)
    per_case = {OURS: ours_total / len(cases), BARE: sum(bare_s) / len(cases)}
    ratio = per_case[OURS] / per_case[BARE]
    plain_few, tta_few = ours(cases[:n_tta]), ours(cases[:n_tta], tta=True)
    exported = _exported(model, cfg, run_, cases, ours) if device.type == "cpu" else {
        "skipped": "onnxruntime runs on the CPU here"}
    res = {"size": size, "grid": list(b.shape), "cases": len(cases), "patch": list(b.patch), "overlap": 0.5,
           "channels": list(b.channels), "device": str(device), "precision": amp_desc,
           "seconds_per_case": per_case, "bare_seconds_each": summarize(bare_s), "ours_over_bare": ratio,
           "goal": "ours within 1.2x of bare sliding_window_inference (CPU), 1.5x (GPU)",
           "tta": {"cases": n_tta, "plain_s": plain_few, "tta_s": tta_few, "tta_over_plain": tta_few / plain_few,
                   "goal": "<= 8.5x"},
           "exported": exported,
           "bundle": _bundle(model, cfg, run_, cases, b.raw, ours) if device.type == "cpu" else {
               "skipped": "the CPU comparison"},
           "scoring_seconds_per_case": scoring_times(cases[:3], 1),
           "scoring_goal": "every family (legacy, brats2023, brats2025) of one full-size case < 2 s (CPU)"}
    _report(out_dir, res)
    return res
