"""``python -m benchmarks demo --run-dir RUN``: the demo run's test scores (what ``make demo``'s evaluate wrote to
RUN/eval/test.json, test.csv and test-tta.json) recorded as ``demo.json`` with the machine, so that the README's
demo table is generated from a results file like every other figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from train.runfolder import eval_dir, read_metrics

from .report import write_result

COLUMNS = ("dice_tc", "dice_wt", "dice_et", "brats2023_dice_tc", "brats2023_dice_wt", "brats2023_dice_et")


def record(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``out/demo.json`` from the run's test evaluation (plain, and with --tta where it was run)."""
    ev = eval_dir(run_dir)
    if not (ev / "test.json").exists():
        raise FileNotFoundError(f"--run-dir {run_dir}: no eval/test.json (run 'python -m evaluate --run-dir "
                                f"{run_dir} --split test' first, as make demo does)")
    payload: dict = {"command": "make demo", "run": str(run_dir)}
    for name, stem in (("plain", "test"), ("tta", "test-tta")):
        if not (ev / f"{stem}.json").exists():
            continue
        summary = json.loads((ev / f"{stem}.json").read_text())
        with open(ev / f"{stem}.csv") as f:
            rows = list(csv.DictReader(f))
        payload[name] = {"cases": summary["cases"], "postprocessing": summary["postprocessing"],
                         "means": {c: summary["scores"][c]["mean"] for c in COLUMNS if c in summary["scores"]},
                         "per_case": [{"case": r["case"], **{c: float(r[c]) for c in COLUMNS if c in r}}
                                      for r in rows]}
    payload["fingerprint"] = fingerprint(run_dir)
    return write_result(out, "demo", payload)


def fingerprint(run_dir: str | Path) -> dict:
    """What a change that should not change behaviour must leave as it is, byte for byte: the sha256 of every
    eval/*.csv and eval/pred*/*.nii.gz, and every epoch's losses from metrics.jsonl (timings left out)."""
    import hashlib

    run = Path(run_dir)

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    epochs = read_metrics(run)
    return {"eval": {p.name: digest(p) for p in sorted(eval_dir(run).glob("*.csv"))},
            "predictions": {f"{p.parent.name}/{p.name}": digest(p)
                            for p in sorted(eval_dir(run).glob("pred*/*.nii.gz"))},
            "losses": [[e.get("epoch"), e.get("train_loss"), e.get("val_loss")] for e in epochs]}
