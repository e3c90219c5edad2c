"""Postprocessing learned on validation: ``tune`` searches the component removal per region (k mm^3), then the
ET relabelling (v mm^3), from grids that include 0 (no rule), greedily in that order, and keeps a rule only when it
raises the mean validation score (ties keep no rule). ``tune_postprocessing`` predicts the validation cases (for a
k-fold run, every fold's own validation cases: out-of-fold), tunes and writes ``RUN/postprocessing.json``
(evaluate.postprocess holds the rules)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.conventions import region_masks
from train.runs import RunError

from .postprocess import ET_RELABEL, FILE, ORDER, Rules, apply

COMPONENT_GRID_MM3 = (0, 10, 25, 50, 100, 200, 500, 1000)
ET_RELABEL_GRID_MM3 = (0, 25, 50, 100, 200, 500, 1000)


OBJECTIVES = {
    "brats2023": "mean over validation cases and ET, TC, WT of the brats2023 lesion-wise Dice",
    "legacy": "mean over validation cases and TC, WT, ET of the legacy Dice",
}


@dataclass
class ValidationCase:
    case: str
    pred: np.ndarray  # the final label map, as evaluate writes it
    ref: np.ndarray
    spacing: tuple
    task: str


def case_objective(pred: np.ndarray, ref: np.ndarray, convention: str, spacing, task: str, family: str) -> float:
    """One case's share of the tuning objective (OBJECTIVES): the mean Dice of the family's three regions."""
    from . import brats2023
    from .metrics import dice

    if family == "legacy":
        names = ("TC", "WT", "ET")
        p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
        return float(np.mean([dice(p[i], g[i]) for i in range(3)]))
    names = brats2023.REGIONS
    p, g = region_masks(pred, convention, names), region_masks(ref, convention, names)
    return float(np.mean([brats2023.region_scores(p[i], g[i], spacing, task, with_hd95=False)["dice"]
                          for i in range(3)]))


def tune(cases: list[ValidationCase], convention: str, regions, family: str = "brats2023") -> tuple[Rules, dict]:
    """The rules that maximise the mean validation objective, and the search's record."""
    if family not in OBJECTIVES:
        raise ValueError(f"--metric must be one of {', '.join(OBJECTIVES)}, not {family!r}")
    if not cases:
        raise RunError("no validation cases to tune postprocessing on")

    def objective(rules: Rules) -> float:
        return float(np.mean([case_objective(apply(c.pred, c.spacing, rules, convention), c.ref, convention,
                                             c.spacing, c.task, family) for c in cases]))

    best = Rules(convention, tuple(regions))
    current = before = objective(best)
    trace = []
    steps = [(r, COMPONENT_GRID_MM3) for r in ORDER if r in regions] + [(ET_RELABEL, ET_RELABEL_GRID_MM3)]
    for rule, grid in steps:
        tried = [(objective(best.with_rule(rule, k)), k) for k in grid[1:]]
        trace += [{"rule": rule, "mm3": k, "score": s} for s, k in tried]
        score, k = max(tried, key=lambda t: (t[0], -t[1]))  # the best score; of equals, the smallest k
        if score > current + 1e-12:  # a rule must raise the score: ties keep no rule
            best, current = best.with_rule(rule, k), score
    return best, {"score_before": before, "score_after": current, "search": trace}


def _validation_cases(part: Path, store_path, source_dir, dev, tta: bool, progress: bool):
    """(convention, regions, [ValidationCase]) of one trained model on its own validation split."""
    from store import open_store
    from store.progress import progress_bar
    from train.experiment import splits_for
    from train.runs import load_run

    from .cases import check_run_on_store, label_maps_for_scoring, store_case_reader
    from .inference import predict_probabilities
    from .pipeline import run_pipeline

    run = load_run(part, False, dev)
    store = open_store(store_path or run.config.store)
    conv, regions = check_run_on_store(run, store), tuple(run.config.regions)
    ids = splits_for(store, run.config.fold)[1]
    model_channels = [store.modalities.index(m) for m in run.config.modalities]
    cases: list[ValidationCase] = []

    def infer(loaded):
        return predict_probabilities(run, loaded[1][model_channels], dev, tta)

    def finish(cid, loaded, prob):
        pred, ref, spacing, _ = label_maps_for_scoring(loaded[0], prob, loaded[2], conv, regions)
        cases.append(ValidationCase(cid, pred, ref, spacing, loaded[0].task))

    bar = progress_bar(len(ids), f"predict validation ({part.name})", "case", enabled=progress)
    failures = run_pipeline(ids, store_case_reader(store, source_dir), infer, finish, on_done=lambda *_: bar.update())
    bar.close()
    if failures:
        raise failures[0][1]
    return conv, regions, cases


def tune_postprocessing(run_dir: str, metric: str = "brats2023", store_path: str | None = None,
                        source_dir: str | None = None, device: str = "auto", tta: bool = False,
                        progress: bool = True) -> dict:
    """Predict the run's validation cases (out-of-fold for a k-fold run), tune, write RUN/postprocessing.json."""
    from train.device import resolve_device

    if metric not in OBJECTIVES:
        raise ValueError(f"--metric must be one of {', '.join(OBJECTIVES)}, not {metric!r}")
    root = Path(run_dir)
    dev = resolve_device(device)
    kfold = root / "kfold.json"
    parts = ([root / f"fold-{f['fold']}" for f in json.loads(kfold.read_text())["folds"]] if kfold.exists()
             else [root])
    cases: list[ValidationCase] = []
    for part in parts:
        conv, regions, found = _validation_cases(part, store_path, source_dir, dev, tta, progress)
        cases += found
    if not cases:
        raise RunError(f"run {run_dir} has no validation cases (the store's validation split for it is empty): "
                       f"postprocessing is tuned on validation only")
    cases.sort(key=lambda c: c.case)
    rules, record = tune(cases, conv, regions, metric)
    out = {
        "convention": rules.convention, "regions": list(rules.regions),
        "min_component_mm3": {r: rules.min_component_mm3.get(r, 0.0) for r in ORDER if r in regions},
        "et_relabel_below_mm3": rules.et_relabel_below_mm3, "rules": rules.describe(),
        "metric": metric, "objective": OBJECTIVES[metric], "test_time_augmentation": tta,
        "validation": "out-of-fold predictions of every fold" if kfold.exists() else "the run's validation split",
        "validation_cases": [c.case for c in cases],
        "grids_mm3": {"components": list(COMPONENT_GRID_MM3), "et_relabel": list(ET_RELABEL_GRID_MM3)},
        **record,
    }
    tmp = root / f".{FILE}.tmp"
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(root / FILE)
    shown = "; ".join(out["rules"]) or "no rule raises it"
    print(f"postprocessing on {len(cases)} validation cases ({metric}): {record['score_before']:.4f} -> "
          f"{record['score_after']:.4f}; {shown} -> {root / FILE}")
    return out
