"""Synthetic cohort speed: CPU seconds of one core per case (goal: at most 2 s at full size)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .report import bar_chart, summarize, write_result


def run(out_dir: Path, size: str = "full") -> dict:
    from .scope import isolated

    with isolated(threads=1):  # one core's seconds, and nothing left changed for the stages after this one
        return _run(out_dir, size)


def _run(out_dir: Path, size: str) -> dict:
    from prep.synth.generator import FULL_SHAPE, _anatomy, write_case

    shape = {"full": FULL_SHAPE, "quick": (120, 120, 78), "tiny": (40, 40, 28)}[size]
    n = {"full": 8, "quick": 3, "tiny": 2}[size]
    _anatomy()  # loading the templates is a once-per-process cost, not a per-case one
    cpu, wall = [], []
    with tempfile.TemporaryDirectory() as d:
        write_case(Path(d), 999, 0, shape)  # warm-up
        for i in range(n):
            c0, w0 = time.process_time(), time.perf_counter()
            write_case(Path(d), i, 0, shape)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    res = {
        "shape": list(shape),
        "cases": n,
        "cpu_s_per_case": summarize(cpu),
        "wall_s_per_case": summarize(wall),
        "goal": "at most 2 s of one core per full-size case",
        "threads": 1,
    }
    write_result(out_dir, "synth", res)
    bar_chart(out_dir / "synth.png", f"synth, {'x'.join(map(str, shape))} per case, 1 thread", "seconds",
              {"cpu s/case": res["cpu_s_per_case"], "wall s/case": res["wall_s_per_case"]}, log=False)
    print(f"synth {'x'.join(map(str, shape))}: median {res['cpu_s_per_case']['median']:.2f} CPU s per case "
          f"(min {res['cpu_s_per_case']['min']:.2f}, max {res['cpu_s_per_case']['max']:.2f}, {n} cases)")
    return res
