"""``python -m prep``: make the synthetic cohort, build the Zarr store.

Heavy libraries (torch, MONAI, Dask) are imported inside the commands so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from .synth import FULL_SHAPE, SynthConfig, synth_cohort

    cfg = SynthConfig(
        out=Path(args.out),
        cases=args.cases,
        seed=args.seed,
        layout=args.layout,
        shape=tuple(args.shape) if args.shape else FULL_SHAPE,
        workers=args.workers,
    )
    t0 = time.perf_counter()
    try:
        ids = synth_cohort(cfg)
    except ValueError as e:
        print(f"prep synth: error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"wrote {len(ids)} {cfg.layout} cases of shape {'x'.join(map(str, cfg.shape))} to {cfg.out} "
          f"in {dt:.1f} s ({dt / len(ids):.2f} s per case with {cfg.workers} worker(s))")
    for cid in ids[:3]:
        print(f"  {cfg.out / cid}")
    if len(ids) > 3:
        print(f"  ... and {len(ids) - 3} more")
    if args.preview:
        from .discover import discover
        from .preview import save_case_preview

        cohort = discover(cfg.out)
        case = next(c for c in cohort.cases if c.case_id == ids[0])
        path = save_case_preview(case, args.preview, title=f"{case.case_id} (synthetic, seed {cfg.seed})")
        print(f"preview of {case.case_id}: {path}")
    return 0


def _discover(args: argparse.Namespace) -> int:
    from .discover import DiscoveryError, discover

    try:
        cohort = discover(args.source, require_seg=not args.no_seg)
    except DiscoveryError as e:
        print(f"prep discover: error: {e}", file=sys.stderr)
        return 2
    summary = {
        "root": str(cohort.root),
        "layout": cohort.layout,
        "label_convention": cohort.label_convention,
        "cases": len(cohort.cases),
        "problems": cohort.problems,
    }
    print(json.dumps(summary, indent=2))
    return 1 if cohort.problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prep",
        description="Prepare BraTS data: make a synthetic cohort, check a cohort folder, build the Zarr store.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "synth",
        help="write a realistic synthetic BraTS-like cohort",
        description="Write a synthetic BraTS-like cohort on real MNI152 anatomy, in the BraTS folder layout "
        "(4 modalities + seg, int16 images, uint8 labels, LPS affine like real BraTS files).",
    )
    s.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    s.add_argument("--cases", type=int, default=8, help="number of cases (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, byte-identical files (default: 0)")
    s.add_argument("--layout", choices=["brats2021", "brats2023"], default="brats2021",
                   help="file naming and label convention: 2021 (1 NCR, 2 ED, 4 ET) or 2023 (1 NETC, 2 SNFH, "
                   "3 ET) (default: %(default)s)")
    s.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="grid size in voxels; the field of view stays 240x240x155 mm, so smaller grids have "
                   "coarser voxels (default: 240 240 155, 1 mm)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes (default: %(default)s)")
    s.add_argument("--preview", metavar="PNG", help="also save middle slices of the first case as a PNG")
    s.set_defaults(func=_synth)

    d = sub.add_parser("discover", help="list and validate the cases in a cohort folder",
                       description="Find the cases in a BraTS 2021 or 2023 folder and report every bad case.")
    d.add_argument("--source", default="data/raw", help="cohort folder (default: %(default)s)")
    d.add_argument("--no-seg", action="store_true", help="segmentations are not required (unlabelled data)")
    d.set_defaults(func=_discover)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
