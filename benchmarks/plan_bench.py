"""``python -m benchmarks plan``: ``python -m train plan`` beside nnU-Net v2's planner on the same cohorts.

For each spacing (1, 2 and 4 mm): the synthetic cohort on the BraTS field of view at that spacing, built into a
store; our planner on it (its patch, depth, widths and batch, the batch sized by a training step measured here,
on the CPU: the trial process's peak resident memory); nnU-Net's ``ExperimentPlanner`` (3d_fullres, its default
8 GB target) on the same cases: their raw dataset linked in nnU-Net's layout, and a dataset fingerprint holding
the stored cases' shapes and spacing (what ``nnUNetv2_extract_fingerprint`` would measure after its own crop, which
keeps no margin where the store keeps 2 voxels), with its static VRAM estimate of its plan converted by its own
reference (560e6 units for 8 GB at batch 2). Its estimate is of GPU memory for its network, our figure is a CPU
process's peak memory for ours: the two sit side by side, they are not the same quantity.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from .report import cohort_record, write_result

SPACINGS = {"full": (1.0, 2.0, 4.0), "quick": (2.0, 4.0), "tiny": (4.0,)}
CASES = {"full": 12, "quick": 8, "tiny": 4}
REFERENCE = 560e6  # nnU-Net's UNet_reference_val_3d: 8 GB at batch 2

_NNUNET_PLAN = """
import json, sys
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
pl = ExperimentPlanner(int(sys.argv[1]), gpu_memory_target_in_gb=float(sys.argv[2]))
c = pl.plan_experiment()["configurations"]["3d_fullres"]
a = c["architecture"]
est = pl.static_estimate_VRAM_usage(tuple(c["patch_size"]), len(pl.dataset_json["channel_names"]),
                                    len(pl.dataset_json["labels"]), a["network_class_name"], a["arch_kwargs"],
                                    a["_kw_requires_import"])
print(json.dumps({"patch_size": c["patch_size"], "batch_size": c["batch_size"], "spacing": c["spacing"],
                  "n_stages": a["arch_kwargs"]["n_stages"],
                  "features_per_stage": a["arch_kwargs"]["features_per_stage"], "estimate": float(est)}))
"""


def nnunet_plan(store_path, raw: Path, work: Path, memory_gb: float = 8.0, dataset_id: int = 502) -> dict:
    """nnU-Net's 3d_fullres plan for the store's cases (their sources in ``raw``), by its ExperimentPlanner."""
    import numpy as np

    from prep.discover import discover
    from prep.synth import FOV_MM
    from store import open_store

    from .peers import _environment, to_nnunet_raw

    store = open_store(store_path)
    ids = set(store.case_ids)
    cases = [c for c in discover(raw).cases if c.case_id in ids]
    folder = to_nnunet_raw(cases, work / "raw", dataset_id)
    shapes = [list(store.case(c).shape) for c in store.case_ids]
    spacing = [float(v) for v in store.params["spacing_mm"]]
    grid = [round(f / s) for f, s in zip(FOV_MM, spacing)]
    intensity = {"mean": 0.0, "median": 0.0, "std": 1.0, "min": -5.0, "max": 5.0, "percentile_99_5": 3.0,
                 "percentile_00_5": -3.0}
    fingerprint = {"spacings": [spacing] * len(shapes), "shapes_after_crop": shapes,
                   "foreground_intensity_properties_per_channel": {str(k): intensity for k in
                                                                   range(len(store.modalities))},
                   "median_relative_size_after_cropping": float(np.median([math.prod(s) / math.prod(grid)
                                                                           for s in shapes]))}
    pre = work / "preprocessed" / folder.name
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    r = subprocess.run([sys.executable, "-c", _NNUNET_PLAN, str(dataset_id), str(memory_gb)], capture_output=True,
                       text=True, env=_environment(work), timeout=600)
    if r.returncode:
        raise RuntimeError(f"nnU-Net's planner failed: {r.stderr.strip().splitlines()[-1:]}")
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    plan["estimate_gb"] = plan["estimate"] * plan["batch_size"] / 2 / REFERENCE * 8
    return plan


def run(out_dir: Path, work: Path, size: str = "full", memory_gb: float = 8.0) -> dict:
    from prep.build import BuildConfig, build_store
    from prep.synth import FOV_MM, SynthConfig, synth_cohort
    from store import open_store
    from train.planner import plan_for_store

    rows = []
    for mm in SPACINGS[size]:
        grid = tuple(round(f / mm) for f in FOV_MM)
        raw, store = work / f"plan-raw-{mm:g}mm", work / f"plan-{mm:g}mm.zarr"
        if not raw.is_dir():
            synth_cohort(SynthConfig(out=raw, cases=CASES[size], seed=2024, shape=grid,
                                     workers=min(8, os.cpu_count() or 1)), progress=False)
        cohort_record(raw)
        if not (store / "zarr.json").exists():
            rep = build_store(BuildConfig(source=str(raw), store=str(store), workers=2, spacing=(mm, mm, mm)),
                              progress=False)
            if not rep.ok:
                raise RuntimeError(f"store build failed: {rep.failed}")
        ours = plan_for_store(open_store(store), memory_gb, "cpu", progress=False)
        theirs = nnunet_plan(store, raw, work / f"nnunet-{mm:g}mm", memory_gb)
        t, sz = ours["training"], ours["sizing"]
        rows.append({"spacing_mm": mm, "grid": list(grid), "cases": CASES[size],
                     "ours": {"patch_size": t["patch_size"], "batch_size": t["batch_size"], "levels": sz["levels"],
                              "channels": ours["network"]["channels"], "peak_mb_cpu": sz["peak_mb"],
                              "median_shape": ours["fingerprint"]["median_shape"], "trials": sz["trials"]},
                     "nnunet": theirs})
        print(f"plan {mm:g} mm: ours {ours['training']['patch_size']} x{ours['training']['batch_size']}, nnU-Net "
              f"{theirs['patch_size']} x{theirs['batch_size']}")
    table = _table(rows, memory_gb)
    payload = {"size": size, "memory_gb": memory_gb, "rows": rows, "table_markdown": table,
               "command": "python -m benchmarks plan" + ("" if size == "full" else f" --size {size}")}
    write_result(out_dir, "plan", payload)
    (Path(out_dir) / "plan.md").write_text(f"`{payload['command']}`: {table}\n")
    print(table)
    return payload


def _table(rows: list[dict], memory_gb: float) -> str:
    lines = [f"budget {memory_gb:g} GB (ours: a CPU training process's measured peak; nnU-Net: its GPU target)", "",
             "| spacing | median case | ours: patch, batch, levels | ours: measured peak (CPU) | nnU-Net: patch, "
             "batch, stages | nnU-Net: static estimate |", "|---|---|---|---|---|---|"]
    for r in rows:
        o, n = r["ours"], r["nnunet"]
        lines.append(f"| {r['spacing_mm']:g} mm | {'x'.join(map(str, o['median_shape']))} | "
                     f"{'x'.join(map(str, o['patch_size']))}, {o['batch_size']}, {o['levels']} | "
                     f"{o['peak_mb_cpu'] / 1024:.2f} GB | {'x'.join(map(str, n['patch_size']))}, {n['batch_size']}, "
                     f"{n['n_stages']} | {n['estimate_gb']:.2f} GB |")
    return "\n".join(lines)
