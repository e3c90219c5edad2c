"""``python -m evaluate report``: one self-contained HTML page per run (``RUN/report.html``) with what the run
learned: its curves, its test scores per family (a table sortable in the page, means with 95% intervals), every
evaluated case's overlay worst first, the recipe and what postprocessing changed.

The page is static: no server, no network, the figures embedded as PNG, one small script of its own (the table's
sorting). It is rendered by Jinja2 from ``evaluate/templates/report.html.j2`` out of the run folder's files, read
through ``train.runfolder``; nothing else is written, and a ``report.html`` this command did not write is kept."""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import numpy as np

from store.conventions import REGIONS
from train.runfolder import (
    CONFIG,
    FOLD_GLOB,
    KFOLD,
    METRICS,
    PLAN,
    PREPROCESSING,
    REPORT,
    eval_dir,
    read_evaluations,
    read_metrics,
    read_rules,
    write_text,
)

from .report import HEADLINE, bootstrap_ci
from .scoring import REGISTRY

GENERATOR = "brats-pipeline evaluate report"  # the page's <meta name="generator">: how a rerun knows its own file


class ReportError(ValueError):
    """A run folder the report cannot be made for, or a report.html it must not replace; one line."""


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _parts(run_dir: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every trained model's folder: the run itself, or each fold of a k-fold run."""
    if (run_dir / KFOLD).exists():
        folds = [p for p in run_dir.glob(FOLD_GLOB) if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return [(p.name, p) for p in sorted(folds, key=lambda p: int(p.name.split("-")[-1]))]
    return [("run", run_dir)]


def _training(parts: list[tuple[str, Path]]) -> dict:
    """The curves figure and a line per model: epochs, best validation Dice, wall time, data wait."""
    from .pictures import curves_figure

    histories, lines = {}, []
    for name, folder in parts:
        if not (folder / METRICS).exists():
            continue
        recs = read_metrics(folder)
        histories[name] = recs
        val = [r for r in recs if "dice_mean" in r]
        best = max(val, key=lambda r: r["dice_mean"]) if val else None
        waits = [r["data_wait_share"] for r in recs if "data_wait_share" in r]
        lines.append({"name": name, "epochs": len(recs), "best": best and {
            "epoch": best["epoch"], "dice_mean": best["dice_mean"], "dice": best.get("dice", {})},
            "wall_min": recs[-1].get("wall_s", float("nan")) / 60 if recs else float("nan"),
            "data_wait": float(np.median(waits)) if waits else float("nan")})
    figure = _png(curves_figure(histories)) if histories else None
    return {"figure": figure, "models": lines}


def _number(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) if k != "case" else v for k, v in row.items()} for row in csv.DictReader(f)]


def _mean_ci(values: list[float]) -> dict:
    v = np.array([x for x in values if isinstance(x, float) and not math.isnan(x)])
    if not v.size:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    low, high = bootstrap_ci(v) if v.size > 1 else (float(v[0]), float(v[0]))
    return {"mean": float(v.mean()), "low": low, "high": high, "n": int(v.size)}


def _family(name: str, rows: list[dict], regions: list[str]) -> dict | None:
    family = REGISTRY[name]  # the page's tables: the family's headline Dice and its distance, per region
    cols = [c.format(r=r.lower()) for c in (family.headline, family.distance) for r in regions]
    cols = [c for c in cols if rows and c in rows[0]]
    if not cols:
        return None
    return {"name": name, "title": HEADLINE[name][1], "columns": cols,
            "rows": [{"case": r["case"], "values": [r[c] for c in cols]} for r in rows],
            "means": [_mean_ci([r[c] for r in rows]) for c in cols]}


def _headline(row: dict, family: str, regions: list[str]) -> float:
    """A case's mean headline Dice over the regions (NaN left out): what 'worst first' sorts by."""
    v = [row.get(HEADLINE[family][0].format(r=r.lower())) for r in regions]
    v = [x for x in v if isinstance(x, float) and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _evaluation(folder: Path, stem: str, summary: dict, regions: list[str]) -> dict:
    rows = _read_rows(folder / f"{stem}.csv") if (folder / f"{stem}.csv").exists() else []
    families = [f for f in (_family(n, rows, regions) for n in summary.get("metrics", [])) if f]
    first = summary.get("metrics", ["legacy"])[0]
    order = sorted(rows, key=lambda r: (math.inf if math.isnan(s := _headline(r, first, regions)) else s, r["case"]))
    pictures = folder / f"png{stem[len(summary.get('split', stem)):]}"
    overlays, missing = [], []
    for r in order:
        png = pictures / f"{r['case']}.png"
        if png.exists():
            overlays.append({"case": r["case"], "score": _headline(r, first, regions), "src": _png(png.read_bytes())})
        else:
            missing.append(r["case"])
    gains = [{"column": c, "mean": g["mean_gain"], "low": g["ci95"][0], "high": g["ci95"][1], "cases": g["cases"]}
             for c, g in summary.get("postprocessing_gain", {}).items()]
    return {"stem": stem, "split": summary.get("split", stem), "cases": [r["case"] for r in rows],
            "tta": summary.get("test_time_augmentation"), "models": summary.get("models"),
            "checkpoints": summary.get("checkpoints", []), "grid": summary.get("grid"), "families": families,
            "sorted_by": HEADLINE[first][1], "overlays": overlays, "no_overlay": missing,
            "postprocessing": summary.get("postprocessing", []), "gains": gains}


def _evaluations(run_dir: Path, regions: list[str]) -> list[dict]:
    """Every evaluation of the run, the test split's first."""
    found = read_evaluations(run_dir)
    order = sorted(found, key=lambda stem: (not stem.startswith("test"), stem))
    return [_evaluation(eval_dir(run_dir), stem, found[stem], regions) for stem in order]


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect(run_dir: str | Path) -> dict:
    """Everything the page shows, read from the run folder (what the template renders)."""
    from train.runs import holds_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not holds_run(run_dir):
        raise ReportError(f"{run_dir} is not a run folder: it holds no checkpoint, {METRICS} or {KFOLD} "
                          "(python -m train writes one)")
    parts = _parts(run_dir)
    first = parts[0][1]
    config = _json(first / CONFIG) or {}
    regions = config.get("regions") or list(REGIONS)
    plan = _json(first / PLAN)
    evaluations = _evaluations(run_dir, regions)
    rules = read_rules(run_dir)
    preprocessing = _json(first / PREPROCESSING)
    missing = []
    if not evaluations:
        missing.append(f"no evaluation yet: python -m evaluate --run-dir {run_dir} scores the test split and "
                       "refreshes this page")
    if plan is None:
        missing.append(f"no {PLAN} (a run trained before plans existed): the recipe shown is its {CONFIG}")
    return {"generator": GENERATOR, "run_dir": str(run_dir), "kind": "k-fold" if (run_dir / KFOLD).exists() else
            "single model", "regions": regions, "training": _training(parts), "evaluations": evaluations,
            "plan": plan, "config": config, "preprocessing": preprocessing,
            "recipe": _recipe(config, preprocessing or {}, rules), "rules": rules,
            "missing": missing}


def _recipe(config: dict, preprocessing: dict, rules: dict | None) -> list[dict]:
    """The model card's recipe (train.export.recipe): every step from source files to label map."""
    if not config:
        return []
    from train.config import TrainConfig
    from train.export import recipe

    return recipe(TrainConfig.from_dict(config), preprocessing.get("params", {}),
                  preprocessing.get("label_convention"), rules)


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("evaluate", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _format_number
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2)
    return env.get_template("report.html.j2").render(**context)


def _format_number(v, digits: int = 3) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _refuse_foreign(path: Path) -> None:
    """A report.html that is a link, or that another program wrote, is never replaced."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ReportError(f"{path} is a link or not a file; remove it to write the report")
    if path.exists():
        with open(path, errors="replace") as f:
            head = f.read(2048)
        if f'content="{GENERATOR}"' not in head:
            raise ReportError(f"{path} was not written by python -m evaluate report; move it away to write the "
                              "report")


def write_report(run_dir: str | Path) -> Path:
    """Render ``RUN/report.html`` (replacing only one this command wrote) and return its path."""
    context = collect(run_dir)
    out = Path(run_dir) / REPORT
    _refuse_foreign(out)
    return write_text(out, render(context))

