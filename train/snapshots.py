"""Snapshots of a run (``--snapshot-at MIN ...``): the run as it stands at given minutes of wall time, each kept as
a run folder of its own (``<run>/at-<MIN>min``) that ``evaluate`` and ``evaluate predict`` read like any run, so a
single training run gives the model it had at several moments (the race against nnU-Net scores three of them).

A snapshot is taken at the end of the last epoch that ends before its minute (the trainer projects the end of the
next epoch and its validation, as for ``--time-limit``), after a validation, so its ``best.pt`` is the model that
evaluation would pick at that moment. A run that stops earlier (time limit, early stopping, last epoch) takes every
snapshot still due at its end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .runfolder import BEST, CONFIG, METRICS, PREPROCESSING

COPIED = (BEST, CONFIG, PREPROCESSING, METRICS)


def folder(run_dir: str | Path, minutes: float) -> Path:
    """The run folder of the snapshot at ``minutes``."""
    return Path(run_dir) / f"at-{minutes:g}min"


def due(pending, end_of_next_s: float) -> list[float]:
    """The snapshot minutes in ``pending`` that the next epoch (ending at ``end_of_next_s`` wall seconds) would pass:
    the epoch just ended is the last before them."""
    return [m for m in pending if end_of_next_s > 60 * m]


def take(run_dir: str | Path, minutes: float, epoch: int, wall_s: float) -> Path:
    """Copy the run's model, config, preprocessing and metrics so far into the snapshot's folder, with
    ``snapshot.json`` (the minute asked for, the epoch and the wall seconds it stands at). The folder is written
    under a temporary name and renamed: a snapshot is whole or absent."""
    run_dir = Path(run_dir)
    out = folder(run_dir, minutes)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in COPIED:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, tmp / name)
    (tmp / "snapshot.json").write_text(json.dumps({"at_min": minutes, "epoch": epoch + 1, "wall_s": wall_s}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
