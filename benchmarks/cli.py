"""``python -m benchmarks``: the throughput of every stage, as JSON and PNG under ``--out``."""

from __future__ import annotations

import argparse
from pathlib import Path

BENCHES = {
    "synth": "CPU seconds per synthetic case (goal <= 2 s at full size)",
    "prep": "store build vs NIfTI decode at 1 and 2 workers, store bytes, worker memory",
    "store-format": "bytes and read/write times of candidate dtypes, chunks and codecs (FORMAT.md table)",
}


def _store_format(out: Path, quick: bool) -> None:
    import tempfile

    from prep.discover import discover
    from prep.synth import FULL_SHAPE, SynthConfig, synth_cohort

    from . import store_format

    with tempfile.TemporaryDirectory() as d:
        shape = (120, 120, 78) if quick else FULL_SHAPE
        synth_cohort(SynthConfig(out=Path(d), cases=2 if quick else 3, seed=99, shape=shape, workers=2),
                     progress=False)
        store_format.run(out, discover(d).cases, quick=quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure each stage's throughput (median of repeats after a warm-up) and write "
        "<out>/<name>.json and <out>/<name>.png, with the machine recorded beside the figures.",
    )
    p.add_argument("name", choices=[*BENCHES, "all"], help="; ".join(f"{k}: {v}" for k, v in BENCHES.items()))
    p.add_argument("--quick", action="store_true", help="small inputs and few repeats, for a quick look")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    names = list(BENCHES) if args.name == "all" else [args.name]
    for name in names:
        if name == "synth":
            from . import synth_bench

            synth_bench.run(out, quick=args.quick)
        elif name == "prep":
            from . import prep_bench

            prep_bench.run(out, quick=args.quick)
        elif name == "store-format":
            _store_format(out, args.quick)
    return 0
