"""The seed's experiment: T1 alone vs T1 + T2 + FLAIR, same cohort, same budget, test Dice per region.

Reduced scale by default (a 2 mm cohort stored at 2 mm, 64^3 patches) so it finishes on 2 CPU cores in under
40 minutes; ``--full`` uses 1 mm cases and 128^3 patches unchanged otherwise (for a GPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from .report import write_result

ARMS = {"T1": ("t1",), "T1+T2+FLAIR": ("t1", "t2", "flair")}


def run(out_dir: Path, work: Path, quick: bool = False, full: bool = False, epochs: int | None = None,
        cases: int | None = None) -> dict:
    from evaluate.evaluation import evaluate_split
    from prep.build import BuildConfig, build_store
    from prep.synth import FOV_MM, FULL_SHAPE, SynthConfig, synth_cohort
    from store.conventions import REGIONS
    from train.config import TrainConfig
    from train.experiment import run as train_run

    if quick:
        shape, n, patch, ep, channels = (48, 48, 31), cases or 10, (16, 16, 16), epochs or 2, (8, 16, 32)
    elif full:
        shape, n, patch, ep, channels = FULL_SHAPE, cases or 60, (128, 128, 128), epochs or 60, (16, 32, 64, 128, 256)
    else:
        shape, n, patch, ep, channels = (120, 120, 78), cases or 40, (64, 64, 64), epochs or 24, (16, 32, 64, 128, 256)
    spacing = tuple(f / s for f, s in zip(FOV_MM, shape))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    synth_cohort(SynthConfig(out=work / "raw", cases=n, seed=2024, shape=shape, workers=2), progress=False)
    store = work / "store.zarr"
    rep = build_store(BuildConfig(source=str(work / "raw"), store=str(store), workers=2, spacing=spacing),
                      progress=False)
    if not rep.ok:
        raise RuntimeError(f"store build failed: {rep.failed}")
    results = {}
    base = TrainConfig(store=str(store), epochs=ep, patience=ep, val_every=max(1, ep // 4), patch_size=patch,
                       batch_size=2, lr=1e-3, cache="ram", workers=1, seed=0, channels=channels, amp=False,
                       device="auto")
    for arm, mods in ARMS.items():
        run_dir = work / f"run-{arm.replace('+', '-')}"
        cfg = replace(base, modalities=mods, run_dir=str(run_dir))
        t = time.perf_counter()
        train_run(cfg)
        train_s = time.perf_counter() - t
        s = evaluate_split(str(run_dir), str(store), "test", progress=False)
        results[arm] = {"modalities": list(mods), "train_seconds": train_s,
                        "test_dice": {r: s["scores"][f"dice_{r.lower()}"]["mean"] for r in REGIONS},
                        "test_hd95_mm": {r: s["scores"][f"hd95_{r.lower()}"]["mean"] for r in REGIONS},
                        "monai_dice_mean": s["monai_dice_mean"], "test_cases": s["cases"]}
    lines = ["| inputs | Dice TC | Dice WT | Dice ET | HD95 TC mm | HD95 WT mm | HD95 ET mm | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        d, h = r["test_dice"], r["test_hd95_mm"]
        lines.append(f"| {arm} | {d['TC']:.3f} | {d['WT']:.3f} | {d['ET']:.3f} | {h['TC']:.1f} | {h['WT']:.1f} | "
                     f"{h['ET']:.1f} | {r['train_seconds']:.0f} |")
    table = "\n".join(lines)
    payload = {"cohort": {"cases": n, "shape": list(shape), "spacing_mm": list(spacing), "seed": 2024},
               "budget": {"epochs": ep, "patch": list(patch), "batch_size": 2, "lr": 1e-3, "channels": list(channels)},
               "arms": results, "table_markdown": table, "seconds": time.perf_counter() - t0,
               "wt_gain": results["T1+T2+FLAIR"]["test_dice"]["WT"] - results["T1"]["test_dice"]["WT"]}
    write_result(out_dir, "modalities", payload)
    (Path(out_dir) / "modalities.md").write_text(
        f"Test Dice (mean over {results['T1']['test_cases']} test cases) after {ep} epochs each, {n} synthetic cases "
        f"at {spacing[0]:.1f} mm, patch {patch[0]}^3; `python -m benchmarks modalities`.\n\n{table}\n")
    print(table)
    print(json.dumps({"wt_gain": payload["wt_gain"], "seconds": round(payload["seconds"])}))
    return payload
