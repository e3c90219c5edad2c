"""``python -m store``: summarize or verify a store."""

from __future__ import annotations

import argparse
import sys


def _human(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_info(path: str) -> int:
    from . import open_store

    s = open_store(path)
    n = len(s)
    size = s.nbytes_on_disk()
    sp = s.splits
    print(f"store      {s.path}")
    print(f"format     brats-zarr v{s.format_version}")
    print(f"cases      {n}" + (f" ({len(s.failures)} failed in the last build)" if s.failures else ""))
    print(f"modalities {', '.join(s.modalities)}")
    print(f"labels     {s.label_convention}")
    from collections import Counter

    from .conventions import task_of

    index = s.attrs.get("index", {})
    layouts = Counter(rec["layout"] for rec in index.values() if rec.get("layout"))
    tasks = Counter(rec.get("task") or task_of(cid) for cid, rec in index.items())
    grades = Counter(rec["grade"] for rec in index.values() if rec.get("grade"))
    if layouts:
        print("layouts    " + ", ".join(f"{k} {v}" for k, v in sorted(layouts.items())))
    print("tasks      " + ", ".join(f"{t.upper()} {k}" for t, k in sorted(tasks.items())))
    if grades:
        print("grades     " + ", ".join(f"{g} {k}" for g, k in sorted(grades.items())))
    print(f"splits     train {len(sp['train'])}, val {len(sp['val'])}, test {len(sp['test'])}, "
          f"{len(sp['folds'])} folds over train+val")
    for g, per in (sp.get("stratified") or {}).items():
        print(f"  {g:<8} " + ", ".join(f"{k} {v}" for k, v in per.items()) + " (patients, stratified)")
    print(f"on disk    {_human(size)}" + (f" ({_human(size // n)} per case)" if size and n else ""))
    return 0


def _info(args) -> int:
    return print_info(args.path)


def _verify(args) -> int:
    from . import open_store
    from .format import CURRENT, newer
    from .verify import verify_store

    store = open_store(args.path)
    faults = verify_store(store, progress=True)
    for f in faults:
        print(f, file=sys.stderr)
    for later in newer(store.format):  # an older store reads; what it lacks is said, not a fault
        print(f"note: this store is format {store.format.version}, the current is {CURRENT.version}; it lacks "
              f"{later.adds} ('python -m prep build-store --overwrite' rebuilds it)")
    print(f"{'FAULTS: ' + str(len(faults)) if faults else 'ok'}")
    return 1 if faults else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m store", description="Inspect a brats-zarr store.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    i = sub.add_parser("info", help="summary: cases, modalities, splits, bytes on disk, format")
    i.add_argument("path", nargs="?", default="data/brats.zarr", help="store (default: %(default)s)")
    i.set_defaults(func=_info)
    v = sub.add_parser("verify", help="check every case against the contract; exit 1 on any fault")
    v.add_argument("path", nargs="?", default="data/brats.zarr", help="store (default: %(default)s)")
    v.set_defaults(func=_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"python -m store: error: {e}", file=sys.stderr)
        return 2
