"""Inference of one case: this project's whole path (preprocess from NIfTI, sliding window, back to the source
grid) vs MONAI's bare ``sliding_window_inference`` on the same preprocessed tensor (roi = patch, overlap 0.5)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .cohort import bench_inputs
from .report import bar_chart, summarize, write_result


def scoring_times(cases, reps: int) -> dict:
    """Seconds to score one case against its source seg, per family: the reference moved by a voxel or two
    with a spurious blob added stands in for a prediction (several lesions, a spurious one)."""
    import nibabel as nib
    import numpy as np

    from evaluate.scoring import legacy_scores, lesionwise_scores

    times = {"legacy": [], "lesionwise": []}
    for case in cases:
        img = nib.load(str(case.seg))
        ref = np.asanyarray(img.dataobj).astype(np.uint8)
        spacing = img.header.get_zooms()[:3]
        pred = np.roll(ref, (1, 2, 0), (0, 1, 2))
        idx = np.argwhere(ref > 0)
        far = tuple(int(v) for v in (np.array(ref.shape) - idx.mean(0)).clip(3, None) - 3)
        pred[far[0]:far[0] + 3, far[1]:far[1] + 3, far[2]:far[2] + 3] = 2
        for _ in range(reps):
            for family, fn in (("legacy", legacy_scores), ("lesionwise", lesionwise_scores)):
                t0 = time.perf_counter()
                fn(pred, ref, case.label_convention, spacing)
                times[family].append(time.perf_counter() - t0)
    return {k: summarize(v) for k, v in times.items()}


def run(out_dir: Path, work: Path, size: str = "full", repeats: int | None = None, amp: bool = False) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from evaluate.inference import LoadedRun, label_map, predict_probabilities, regions_on_source
    from prep.discover import discover
    from prep.preprocess import preprocess
    from train.config import TrainConfig
    from train.engine import amp_context, build_model

    b = bench_inputs(work, size)
    reps = repeats or {"full": 2, "quick": 3, "tiny": 1}[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mods = ("t1", "t1ce", "t2", "flair")
    cfg = TrainConfig(modalities=mods, patch_size=b.patch, channels=b.channels, amp=amp)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    run_ = LoadedRun([model], cfg, [], {}, "benchmark model")
    case = discover(b.raw).cases[0]
    autocast, _, amp_desc = amp_context(cfg, device)

    def ours():
        pre = preprocess(case, mods, with_label=False, spacing=b.spacing)
        prob = predict_probabilities(run_, pre.image, device)
        return label_map(regions_on_source(prob, pre.geometry), case.label_convention)

    pre = preprocess(case, mods, with_label=False, spacing=b.spacing)
    x = torch.from_numpy(pre.image)[None].to(device)

    def bare():
        with torch.no_grad(), autocast():
            out = sliding_window_inference(x, roi_size=b.patch, sw_batch_size=cfg.sw_batch_size, predictor=model,
                                           overlap=0.5)
        out.float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {"ours (NIfTI -> source-grid labels)": [], "bare sliding window": []}
    bare()  # warm-up
    ours()
    for _ in range(reps):
        for name, fn in (("bare sliding window", bare), ("ours (NIfTI -> source-grid labels)", ours)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours (NIfTI -> source-grid labels)"] / med["bare sliding window"]
    res = {"size": size, "grid": list(b.shape), "stored_shape": list(pre.image.shape[1:]), "patch": list(b.patch),
           "overlap": 0.5, "channels": list(b.channels), "device": str(device), "precision": amp_desc,
           "seconds_per_case": {k: summarize(v) for k, v in times.items()}, "ours_over_bare": ratio,
           "goal": "ours within 1.2x of bare sliding_window_inference (CPU)",
           "scoring_seconds_per_case": scoring_times(discover(b.raw).cases[:3], reps),
           "scoring_goal": "lesion-wise scoring of one full-size case < 2 s (CPU)"}
    write_result(out_dir, "infer", res)
    bar_chart(out_dir / "infer.png", f"inference of one case {'x'.join(map(str, b.shape))}, {device}",
              "seconds per case", {k: summarize(v) for k, v in times.items()}, log=False)
    print(f"infer: ours {med['ours (NIfTI -> source-grid labels)']:.2f} s, bare {med['bare sliding window']:.2f} s "
          f"per case ({ratio:.2f}x)")
    sc = res["scoring_seconds_per_case"]
    print(f"scoring one case: legacy {sc['legacy']['median']:.2f} s, lesion-wise {sc['lesionwise']['median']:.2f} s")
    return res
