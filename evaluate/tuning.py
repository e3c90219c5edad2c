"""Postprocessing learned on validation: ``tune`` searches the component removal per region (k mm^3), then the
ET relabelling (v mm^3), greedily in that order, and keeps a rule only when it generalises: the lower bound of the
paired bootstrap 95% interval of its per-case gain over the validation cases is above zero (of such values, the
one with the best mean; none: no rule). It refuses fewer than ``min_cases`` validation cases (10 by default): on
a handful, a rule that fits them is no evidence. ``tune_postprocessing`` predicts the validation cases (for a
k-fold run, every fold's own validation cases: out-of-fold, and all of them count), tunes and writes
``RUN/postprocessing.json`` (evaluate.postprocess holds the rules)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.conventions import region_masks
from train.plan import record_postprocessing
from train.runfolder import CONFIG, KFOLD, fold_name, write_json
from train.runs import RunError

from .postprocess import ET_RELABEL, FILE, ORDER, Rules, apply
from .scoring import REGISTRY

MIN_CASES = 10
KEEP = "the lower bound of the paired bootstrap 95% interval of the gain over the validation cases is above zero"
COMPONENT_GRID_MM3 = (0, 10, 25, 50, 100, 200, 500, 1000)
ET_RELABEL_GRID_MM3 = (0, 25, 50, 100, 200, 500, 1000)


# the families tuning can raise, each by its headline Dice (evaluate.scoring.REGISTRY) over TC, WT, ET
OBJECTIVES = {name: f"mean over validation cases and TC, WT, ET of the {REGISTRY[name].headline_name}"
              for name in ("brats2023", "legacy")}


class TooFewCases(RunError):
    """Fewer validation cases than ``--min-cases``: the message names the flag and the count."""


def too_few(n: int, min_cases: int) -> TooFewCases:
    return TooFewCases(f"{n} validation case(s), fewer than --min-cases {min_cases}: a rule learned on so few is no "
                       f"evidence that it helps; postprocessing not tuned (--min-cases {n} tunes on them anyway)")


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


def tune(cases: list[ValidationCase], convention: str, regions, family: str = "brats2023",
         min_cases: int = MIN_CASES) -> tuple[Rules, dict]:
    """The rules that generalise (module docstring), and the search's record: every value tried with its mean gain
    over the rules kept so far and the gain's 95% interval."""
    from .report import bootstrap_ci

    if family not in OBJECTIVES:
        raise ValueError(f"--metric must be one of {', '.join(OBJECTIVES)}, not {family!r}")
    if not cases:
        raise RunError("no validation cases to tune postprocessing on")
    if len(cases) < min_cases:
        raise too_few(len(cases), min_cases)

    def per_case(rules: Rules) -> np.ndarray:
        return np.array([case_objective(apply(c.pred, c.spacing, rules, convention), c.ref, convention, c.spacing,
                                        c.task, family) for c in cases])

    best = Rules(convention, tuple(regions))
    current = per_case(best)
    before, trace = float(current.mean()), []
    steps = [(r, COMPONENT_GRID_MM3) for r in ORDER if r in regions] + [(ET_RELABEL, ET_RELABEL_GRID_MM3)]
    for rule, grid in steps:
        kept = None  # (mean gain, per-case scores, k)
        for k in grid[1:]:
            scores = per_case(best.with_rule(rule, k))
            gain = scores - current
            lo, hi = bootstrap_ci(gain)
            trace.append({"rule": rule, "mm3": k, "score": float(scores.mean()), "gain": float(gain.mean()),
                          "gain_ci95": [lo, hi]})
            # generalises: the interval's lower bound above zero; of those, the best mean (equals: the smallest k)
            if lo > 0 and (kept is None or gain.mean() > kept[0] + 1e-12):
                kept = (float(gain.mean()), scores, k)
        if kept is not None:
            best, current = best.with_rule(rule, kept[2]), kept[1]
    return best, {"score_before": before, "score_after": float(current.mean()), "search": trace}


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
        pred, ref, spacing, _ = label_maps_for_scoring(loaded[0], prob, loaded[2], conv, regions,
                                                       run.config.threshold)
        cases.append(ValidationCase(cid, pred, ref, spacing, loaded[0].task))

    bar = progress_bar(len(ids), f"predict validation ({part.name})", "case", enabled=progress)
    failures = run_pipeline(ids, store_case_reader(store, source_dir), infer, finish, on_done=lambda *_: bar.update())
    bar.close()
    if failures:
        raise failures[0][1]
    return conv, regions, cases


def _enough_cases(parts: list[Path], store_path, min_cases: int) -> None:
    """TooFewCases before any prediction when the run's validation cases (every fold's) are fewer than
    ``min_cases``; a run with none is left to the caller's own message."""
    from store import open_store
    from train.config import TrainConfig
    from train.experiment import splits_for

    n = 0
    for part in parts:  # the config the trainer wrote beside each model: no network is loaded here
        if not (part / CONFIG).exists():
            return  # not a run folder: loading it says why
        cfg = TrainConfig.load(part / CONFIG)
        n += len(splits_for(open_store(store_path or cfg.store), cfg.fold)[1])
    if 0 < n < min_cases:
        raise too_few(n, min_cases)


def tune_postprocessing(run_dir: str, metric: str = "brats2023", store_path: str | None = None,
                        source_dir: str | None = None, device: str = "auto", tta: bool = False,
                        progress: bool = True, min_cases: int = MIN_CASES) -> dict:
    """Predict the run's validation cases (out-of-fold for a k-fold run), tune, write RUN/postprocessing.json.
    Fewer than ``min_cases`` validation cases: TooFewCases, before any prediction, nothing written."""
    from train.device import resolve_device

    if metric not in OBJECTIVES:
        raise ValueError(f"--metric must be one of {', '.join(OBJECTIVES)}, not {metric!r}")
    root = Path(run_dir)
    dev = resolve_device(device)
    kfold = root / KFOLD
    parts = ([root / fold_name(f["fold"]) for f in json.loads(kfold.read_text())["folds"]] if kfold.exists()
             else [root])
    _enough_cases(parts, store_path, min_cases)
    cases: list[ValidationCase] = []
    for part in parts:
        conv, regions, found = _validation_cases(part, store_path, source_dir, dev, tta, progress)
        cases += found
    if not cases:
        raise RunError(f"run {run_dir} has no validation cases (the store's validation split for it is empty): "
                       f"postprocessing is tuned on validation only")
    cases.sort(key=lambda c: c.case)
    rules, record = tune(cases, conv, regions, metric, min_cases)
    out = {
        "convention": rules.convention, "regions": list(rules.regions),
        "min_component_mm3": {r: rules.min_component_mm3.get(r, 0.0) for r in ORDER if r in regions},
        "et_relabel_below_mm3": rules.et_relabel_below_mm3, "rules": rules.describe(),
        "metric": metric, "objective": OBJECTIVES[metric], "kept_when": KEEP, "min_cases": min_cases,
        "test_time_augmentation": tta,
        "validation": "out-of-fold predictions of every fold" if kfold.exists() else "the run's validation split",
        "validation_cases": [c.case for c in cases],
        "grids_mm3": {"components": list(COMPONENT_GRID_MM3), "et_relabel": list(ET_RELABEL_GRID_MM3)},
        **record,
    }
    write_json(root / FILE, out)
    record_postprocessing(root, out)  # the plan records the whole recipe, its tuned rules too
    shown = "; ".join(out["rules"]) or "no rule whose gain is above zero at 95%"
    print(f"postprocessing on {len(cases)} validation cases ({metric}): {record['score_before']:.4f} -> "
          f"{record['score_after']:.4f}; {shown} -> {root / FILE}")
    return out
