"""Every name inside a run folder, spelled here once: the trainer, k-fold, snapshots, postprocessing tuning,
evaluation, export and the benchmarks write and read a run's files through these (no torch: any layer may ask).

A run folder holds ``config.json`` (the TrainConfig), ``plan.json`` (its recipe, train.plan), ``invocation.json``
(what ran it), ``best.pt`` and ``last.pt`` (checkpoints),
``metrics.jsonl`` (one line per epoch), ``preprocessing.json`` (how the store was built), ``tb/`` (TensorBoard);
a k-fold run holds ``kfold.json`` and one run folder per fold (``fold-K``); evaluation adds
``postprocessing.json`` (tuned rules) and ``eval/`` (scores, pictures, predictions); ``python -m evaluate report``
writes ``report.html``."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = "config.json"
PLAN = "plan.json"
INVOCATION = "invocation.json"
BEST = "best.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"
PREPROCESSING = "preprocessing.json"
KFOLD = "kfold.json"
POSTPROCESSING = "postprocessing.json"
EVAL = "eval"
TENSORBOARD = "tb"
FOLD_GLOB = "fold-*"
REPORT = "report.html"


def fold_name(k: int) -> str:
    """The folder of fold ``k`` inside a k-fold run folder."""
    return f"fold-{k}"


def eval_dir(run_dir: str | Path) -> Path:
    """Where evaluation writes a run's scores, pictures and predictions."""
    return Path(run_dir) / EVAL


def write_json(path: str | Path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON at ``path``, atomically: written to a hidden temporary file beside it, then renamed, so a
    reader never meets half a file and a killed write leaves the earlier one whole."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path``, atomically (a hidden temporary file beside it, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every epoch's record of ``metrics.jsonl``, in order."""
    text = (Path(run_dir) / METRICS).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


BEFORE_POSTPROCESSING = "-before-postprocessing"  # an evaluation's scores before its rules: <stem>-before-...


def read_evaluations(run_dir: str | Path) -> dict[str, dict]:
    """Every evaluation of a run, ``eval/<stem>.json`` (``<split>`` or ``<split>-tta``) -> its summary, in stem
    order; the scores before postprocessing and unreadable files left out. What export's model card and the run
    report read, so no reader outside evaluate spells evaluate's file names."""
    out = {}
    for f in sorted(eval_dir(run_dir).glob("*.json")):
        if f.stem.endswith(BEFORE_POSTPROCESSING):
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "scores" in data:
            out[f.stem] = data
    return out


def read_rules(run_dir: str | Path) -> dict | None:
    """The run's tuned postprocessing record (``postprocessing.json``), or None where it has none."""
    path = Path(run_dir) / POSTPROCESSING
    return json.loads(path.read_text()) if path.exists() else None
