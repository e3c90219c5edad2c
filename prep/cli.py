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
        confounders=not args.no_confounders,
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
    from .synth.layouts import grade_of

    for i, cid in enumerate(ids[:3]):
        where = ("imagesTs" if i % 5 == 4 else "imagesTr") if cfg.layout == "msd" else grade_of(cfg.layout, i) or ""
        print(f"  {cfg.out / where / cid}")
    if len(ids) > 3:
        print(f"  ... and {len(ids) - 3} more")
    if args.preview and cfg.layout == "msd":
        print("preview: drawn for the BraTS layouts only (an MSD case is one 4D file)")
    elif args.preview:
        from .discover import discover
        from .synth.preview import save_case_preview
        from .synth.tumour import tumour_params

        cohort = discover(cfg.out)
        # a multifocal case where the cohort has one: it shows everything the generator does
        shown = next((i for i in range(len(ids)) if tumour_params(cfg.seed, i).multifocal), 0)
        case = next(c for c in cohort.cases if c.case_id == ids[shown])
        lesions = "two lesions" if tumour_params(cfg.seed, shown).multifocal else "one lesion"
        path = save_case_preview(case, args.preview, title=f"{case.case_id} (synthetic, seed {cfg.seed}, {lesions}; "
                                 f"slices through the largest)")
        print(f"preview of {case.case_id}: {path}")
        if cfg.confounders:
            from .synth.preview import save_confounders_preview

            shown = Path(args.preview)
            path = save_confounders_preview(cfg.seed, cfg.shape, shown.with_name(f"{shown.stem}-confounders.png"),
                                            cfg.layout)
            print(f"preview of the confounders: {path}")
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
        "tasks": sorted({c.task for c in cohort.cases}),
        "grades": {g: sum(c.grade == g for c in cohort.cases) for g in ("HGG", "LGG") if any(c.grade == g for c in
                                                                                          cohort.cases)},
        "problems": cohort.problems,
    }
    print(json.dumps(summary, indent=2))
    return 1 if cohort.problems else 0


def _spacing(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise SystemExit("prep build-store: error: --spacing takes one or three positive sizes in mm")
    return tuple(float(v) for v in values)


def _build_store(args: argparse.Namespace) -> int:
    from .build import BuildConfig, run_cli

    if args.workers < 0:
        print("prep build-store: error: --workers must be 0 or more", file=sys.stderr)
        return 2
    cfg = BuildConfig(source=args.source, store=args.store, workers=args.workers, scheduler=args.scheduler,
                      split_seed=args.split_seed, overwrite=args.overwrite, crop_margin=args.crop_margin,
                      spacing=_spacing(args.spacing), publish_every_s=args.publish_every, stratify=args.stratify)
    if args.publish_every < 0:
        print("prep build-store: error: --publish-every must be 0 or more seconds", file=sys.stderr)
        return 2
    rc = run_cli(cfg)
    if rc != 2:
        from store.cli import print_info

        print_info(cfg.store)
    return rc


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
    s.add_argument("--layout", choices=["brats2021", "brats2023", "brats2024", "brats2019", "msd"], default="brats2021",
                   help="file naming and label convention: 2021 (1 NCR, 2 ED, 4 ET), 2023 (1 NETC, 2 SNFH, "
                   "3 ET), 2024 post-treatment (2023 naming, plus 4 RC: a resection cavity beside residual "
                   "tumour), or 2019 as downloaded (2021 naming and labels, BraTS19_ ids, cases in HGG/ and LGG/ "
                   "folders, one in four LGG), or msd: the Medical Segmentation Decathlon's Task01_BrainTumour "
                   "(dataset.json, imagesTr/BRATS_001.nii.gz 4D FLAIR, T1w, t1gd, T2w, labelsTr/ 1 oedema, 2 "
                   "non-enhancing, 3 enhancing; one case in five unlabelled in imagesTs/) (default: %(default)s)")
    s.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="grid size in voxels; the field of view stays 240x240x155 mm, so smaller grids have "
                   "coarser voxels (default: 240 240 155, 1 mm)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes (default: %(default)s)")
    s.add_argument("--preview", metavar="PNG", help="also save middle slices of the first case as a PNG, and "
                   "beside it <PNG stem>-confounders.png: each confounder on one case")
    s.add_argument("--no-confounders", action="store_true", help="the clean cohort: no enhancing vessels, "
                   "non-tumour FLAIR/T2 hyperintensities, thick-slice acquisitions or skull-strip residue (by "
                   "default each is drawn per case with its probability, docs/data.md; the labels are the same "
                   "either way)")
    s.set_defaults(func=_synth)

    b = sub.add_parser(
        "build-store",
        help="preprocess a cohort into the Zarr store (Dask, one task per case)",
        description="Preprocess every case once (MONAI: orientation RAS, 1 mm spacing, z-score per channel over "
        "nonzero voxels, crop to the brain) into a versioned Zarr store, one Dask task per case. Resumable: "
        "unchanged cases are skipped, a killed build finishes what is left. Bad cases are skipped with a "
        "one-line reason and the exit status is 1.",
    )
    b.add_argument("--source", default="data/raw", help="cohort folder (cases at any depth), BraTS 2018-2021 or "
                   "2023+ layout, or an MSD Task01_BrainTumour folder (default: %(default)s)")
    b.add_argument("--store", default="data/brats.zarr", help="store path: a folder, or any URL Zarr accepts "
                   "(default: %(default)s)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=2, help="local Dask workers, one thread each; 0 runs in this "
                   "process without Dask, for debugging (default: %(default)s)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://host:8786")
    b.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split and the folds "
                   "(default: %(default)s)")
    b.add_argument("--overwrite", action="store_true", help="replace a store built with other parameters")
    b.add_argument("--stratify", choices=["grade"], help="grade: keep the HGG/LGG ratio in every split and fold "
                   "(BraTS 2018-2020 as downloaded, cases under HGG/ and LGG/ folders; every case needs a grade)")
    b.add_argument("--spacing", type=float, nargs="+", default=[1.0], metavar="MM",
                   help="voxel size of the store in mm, one value or three (default: 1); 2 gives the reduced-scale "
                   "cohort for quick experiments")
    b.add_argument("--crop-margin", type=int, default=2, help="voxels kept around the brain's bounding box "
                   "(default: %(default)s)")
    b.add_argument("--publish-every", type=float, default=1.0, metavar="S",
                   help="publish the cases finished meanwhile at most every S seconds, in one atomic root-metadata "
                   "write (0: each case as it finishes); a kill loses at most S seconds of finished cases, which "
                   "the next build redoes (default: %(default)s)")
    b.set_defaults(func=_build_store)

    d = sub.add_parser("discover", help="list and validate the cases in a cohort folder",
                       description="Find the cases in a cohort folder (BraTS 2018-2024 at any depth, MSD Task01) "
                       "and report every bad case, the tasks and the grades.")
    d.add_argument("--source", default="data/raw", help="cohort folder (default: %(default)s)")
    d.add_argument("--no-seg", action="store_true", help="segmentations are not required (unlabelled data)")
    d.set_defaults(func=_discover)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
