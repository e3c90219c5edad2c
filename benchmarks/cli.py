"""``python -m benchmarks``: the throughput of every stage, as JSON and PNG under ``--out``."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

BENCHES = {
    "synth": "CPU seconds per synthetic case (goal <= 2 s at full size)",
    "prep": "store build vs NIfTI decode at 1 and 2 workers, store bytes, worker memory, time per build step, the "
            "command's fixed start-up on 8 cases (with --peers: nnU-Net v2 on the same cases)",
    "loader": "augmented samples/s: seed chain, MONAI CacheDataset/PersistentDataset, ram/none/gpu",
    "train": "steps/s and data-wait share, real loader vs a fixed batch on the device",
    "infer": "seconds per case: whole predict path vs bare sliding window",
    "scale": "store cost as it grows to 1,251 cases (build rate, root bytes, open, verify, first batch); S3 vs local "
             "patches/s",
    "store-format": "bytes, read/write times of candidate dtypes, chunks, codecs, file layouts (FORMAT.md tables)",
    "modalities": "the seed's experiment with error bars: T1 vs T1+T2+FLAIR vs T1+T1ce+T2+FLAIR, 3 seeds each, "
                  "test Dice/HD95 per region (legacy and brats2023) and paired bootstrap intervals, each run's "
                  "postprocessing tuned on validation and its gain with its interval (under an hour on 2 cores)",
    "models": "each architecture (unet with the seed's recipe, segresnet, dynunet with deep supervision, swinunetr, "
              "each with its recommended recipe) x 3 seeds, every run trained for the same wall time (3 min) on "
              "120 cases at 2 mm: test Dice/HD95 and brats2023 Dice, paired bootstrap intervals against the seed's "
              "UNet, samples/s, peak memory, parameters, validation Dice against wall seconds (under an hour on 2 "
              "cores)",
    "readers": "the Zarr engines (this project's reader, tensorstore, zarr-python with zarrs) on the same patches: "
               "--cache none patches/s with 1 and 2 loader threads, ram cache fill, S3 patches/s, requests per patch",
    "nnunet": "the race: nnU-Net v2 (the peers extra) trained on BraTS's regions with a trainer whose schedule "
              "fills W, beside our default recipe (and --augmentation nnunet), each side's whole pipeline (prepare, "
              "train, predict) within W per seed, 40 test cases scored by evaluate score without and with mirroring; "
              "per-region paired intervals, the spread over seeds, our anytime curve, where the time goes, the "
              "load measured; in parts (one --seeds value at a time), each part saved (on 2 CPU cores at the "
              "defaults: about 50 minutes per seed)",
    "augment": "nnU-Net's default augmentation chain: augmented 4-channel samples/s of nnU-Net's own data path "
               "(its loader and multi-process augmenter over its preprocessed cases, one process per core; needs "
               "the peers extra), of batchgeneratorsv2 (one process, one per core) and MONAI on enlarged regions in "
               "memory, and of this project's loader with --augmentation nnunet per cache mode",
    "augment-dice": "the seed's augmentation against nnU-Net's (--augmentation nnunet) at equal wall time: the "
                    "models benchmark's UNet and recipe with each, 3 seeds, 3 min per run on its 120 cases at 2 mm "
                    "(confounders on): test Dice/HD95 and brats2023 Dice, paired bootstrap intervals per region "
                    "(about 30 minutes on 2 cores)",
    "plan": "python -m train plan beside nnU-Net v2's planner (the peers extra) on the synthetic cohort at 1, 2 and 4 "
            "mm: patch, batch and depth of each, our measured peak (the CPU) beside nnU-Net's static VRAM estimate "
            "(about 5 minutes on 2 cores)",
    "demo": "record the demo run's test scores (--run-dir RUN: its eval/test.json, test.csv, test-tta.json) as "
            "demo.json, from which the README's demo table is generated",
    "predict-cluster": "evaluate predict --source in one process against a local Dask cluster of 1 and 2 one-thread "
                       "workers (--workers): seconds per case of each whole command on the benchmark cohort's "
                       "full-size cases (goals: 2 workers >= 1.7x the cases/s of 1; 1 worker <= 1.1x one process)",
    "report": "the run's HTML report (--run-dir RUN; python -m evaluate report): render time, bytes, and headless "
              "Chromium's load time with the network refused (goals: under 2 s, at most 5 MB), with a screenshot",
    "table": "regenerate the tables of docs/performance.md and the README's headline table from the JSON results",
}
ALL = ("synth", "prep", "loader", "train", "infer")


# the options that apply to some stages only (the others take --quick, --size, --out and --work)
STAGE_OPTIONS = {"--amp": ("train", "infer", "modalities"), "--peers": ("prep",), "--systems": ("nnunet",),
                 "--spacing": ("nnunet",), "--budget": ("nnunet",), "--full": ("modalities",),
                 "--seeds": ("modalities", "models", "augment-dice", "nnunet"),
                 "--time-limit": ("models", "augment-dice"),
                 "--epochs": ("modalities",), "--run-dir": ("demo", "report")}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; with ``stage``, the parser ``python -m benchmarks STAGE --help`` shows: that stage's
    description and only the options it takes."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks" + (f" {stage}" if stage else ""),
        description=(f"{stage}: {BENCHES[stage]}. Writes <out>/{stage}.json and .png." if stage in BENCHES
                     else "Measure each stage's throughput (median of repeats after a warm-up) and write "
                     "<out>/<name>.json and <out>/<name>.png, with the machine recorded beside the figures. 'all' "
                     f"runs {', '.join(ALL)}; the other stages run by name. 'python -m benchmarks STAGE --help' "
                     "gives a stage's own options."),
    )
    p.add_argument("name", choices=[*BENCHES, "all"], help="; ".join(f"{k}: {v}" for k, v in BENCHES.items())
                   if stage is None else f"{stage}")
    add = p.add_argument

    def p_add(flag, *args, **kwargs):  # an option of some stages only, left out of another stage's help
        if stage is None or stage == "all" or stage in STAGE_OPTIONS.get(flag, (stage,)):
            add(flag, *args, **kwargs)

    p.add_argument = p_add
    p.add_argument("--quick", action="store_true", help="small cases and few repeats (all: under 3 minutes on 2 "
                   "cores)")
    p.add_argument("--size", choices=["full", "quick", "tiny"], help="input size (default: full, or quick with "
                   "--quick; tiny is for the tests)")
    p.add_argument("--amp", action="store_true", help="train/infer/modalities: mixed precision")
    p.add_argument("--peers", action="store_true", help="prep: also time nnU-Net v2's fingerprint, planning and "
                   "preprocessing on the same cases (needs pip install -e '.[peers]'; without it, says so and "
                   "measures the rest)")
    p.add_argument("--spacing", type=float, metavar="MM", help="nnunet: the cohort's voxel size, its grid the BraTS "
                   "field of view at that spacing (default: 4 on a CPU, 60 x 60 x 39; 1 on a GPU)")
    p.add_argument("--budget", type=float, metavar="MIN", help="nnunet: W, the whole-pipeline wall time of each side "
                   "and seed: preparation, training and prediction (default: 15)")
    p.add_argument("--systems", nargs="+", choices=["nnunet", "ours", "ours-nnunet-aug"],
                   help="nnunet: the parts to run for each seed (parts already saved for the same cohort and budget "
                   "are kept; the report is made from every part saved) (default: all three)")
    p.add_argument("--full", action="store_true", help="modalities: 1 mm cases and 128^3 patches (for a GPU)")
    p.add_argument("--seeds", type=int, nargs="+", help="modalities, models, augment-dice: the seeds each arm trains "
                   "with (default: 0 1 2; with --quick, modalities 0 1 and models 0)")
    p.add_argument("--time-limit", type=float, metavar="MIN", help="models, augment-dice: minutes of training per run "
                   "(default: 3; 0.15 with --quick)")
    p.add_argument("--epochs", type=int, help="modalities: epochs per run instead of the scale's own (a shorter "
                   "budget, said in the table)")
    p.add_argument("--run-dir", help="demo, report: the demo's run folder (make demo: runs/demo)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    p.add_argument("--work", help="folder for the benchmark cohorts (default: a temporary folder)")
    p.add_argument = add
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if a in BENCHES), None) if {"-h", "--help"} & set(argv) else None
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.epochs and args.name != "modalities":
        parser.error("--epochs applies to the modalities benchmark only")
    if args.seeds and args.name not in ("modalities", "models", "augment-dice", "nnunet"):
        parser.error("--seeds applies to the modalities, models, augment-dice and nnunet benchmarks only")
    if args.time_limit is not None and (args.name not in ("models", "augment-dice") or args.time_limit <= 0):
        parser.error("--time-limit applies to the models and augment-dice benchmarks only, as a positive number of "
                     "minutes")
    nnunet_flags = {"--budget": args.budget, "--spacing": args.spacing, "--systems": args.systems}
    if args.name != "nnunet" and any(v is not None for v in nnunet_flags.values()):
        parser.error(f"{', '.join(k for k, v in nnunet_flags.items() if v is not None)} applies to the nnunet "
                     "benchmark only")
    args.spacing = 4.0 if args.spacing is None else args.spacing
    args.budget = 15.0 if args.budget is None else args.budget
    args.systems = args.systems or ["nnunet", "ours", "ours-nnunet-aug"]
    if args.spacing <= 0:
        parser.error(f"--spacing must be a positive number of millimetres, not {args.spacing:g}")
    if (args.run_dir is None) != (args.name not in ("demo", "report")):
        parser.error("--run-dir goes with the demo and report benchmarks, which need it")
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of minutes, not {args.budget:g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = args.size or ("quick" if args.quick else "full")
    names = list(ALL) if args.name == "all" else [args.name]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="brats-bench-"))
    from . import report
    from .scope import changed, isolated, settings

    report.INVOCATION["command"] = shlex.join(["python", "-m", "benchmarks", *argv])
    try:
        for name in names:
            report.COHORTS.clear()
            before = settings()
            with isolated():
                _stage(name, out, work, size, args)
            if leak := changed(before, settings()):  # a stage leaves the process as it found it ("measured alone")
                raise RuntimeError(f"benchmark {name} changed process-wide settings: {leak}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.name == "all":
        from .table import render

        print(render(out))
    return 0


def _stage(name: str, out: Path, work: Path, size: str, args) -> None:
    """Run one benchmark stage (its process-wide settings are scoped by the caller)."""
    if name == "synth":
        from . import synth_bench

        synth_bench.run(out, size)
    elif name == "prep":
        from . import prep_bench

        prep_bench.run(out, size, peers=args.peers)
    elif name == "loader":
        from . import loader_bench

        loader_bench.run(out, work, size)
    elif name == "train":
        from . import train_bench

        train_bench.run(out, work, size, amp=args.amp)
    elif name == "infer":
        from . import infer_bench

        infer_bench.run(out, work, size, amp=args.amp)
    elif name == "scale":
        from . import scale_bench

        scale_bench.run(out, work, size)
    elif name == "store-format":
        _store_format(out, size != "full")
    elif name == "modalities":
        from . import modalities

        modalities.run(out, work / "modalities", quick=size != "full" and not args.full, full=args.full,
                       epochs=args.epochs, seeds=tuple(args.seeds) if args.seeds else None, amp=args.amp)
    elif name in ("models", "augment-dice"):
        from . import models_bench

        arms = models_bench.ARCHITECTURES if name == "models" else models_bench.AUGMENTATIONS
        models_bench.run(out, work / "models", size=size, seeds=tuple(args.seeds) if args.seeds else None,
                         minutes=args.time_limit, arm_names=arms, name=name)
    elif name == "readers":
        from . import readers_bench

        readers_bench.run(out, work, size)
    elif name == "nnunet":
        from . import nnunet_bench, report

        nnunet_bench.run(out, work / "nnunet", budget_min=args.budget, spacing=args.spacing,
                         seeds=tuple(args.seeds) if args.seeds else (0, 1, 2), systems=tuple(args.systems),
                         cases=nnunet_bench.CASES if size == "full" else 60, command=report.INVOCATION["command"])
    elif name == "augment":
        from . import augment_bench

        augment_bench.run(out, work, size)
    elif name == "plan":
        from . import plan_bench

        plan_bench.run(out, work, size)
    elif name == "demo":
        from .demo_record import record

        print(f"wrote {record(args.run_dir, out)}")
    elif name == "predict-cluster":
        from . import cluster_bench

        cluster_bench.run(out, work, size)
    elif name == "report":
        from . import report_bench

        print(f"wrote {report_bench.run(out, args.run_dir)}")
    elif name == "table":
        from .table import update_page, update_readme

        update_page(out)
        update_readme(out)


def _store_format(out: Path, quick: bool) -> None:
    from prep.discover import discover
    from prep.synth import FULL_SHAPE, SynthConfig, synth_cohort

    from . import report, store_format

    with tempfile.TemporaryDirectory() as d:
        shape = (120, 120, 78) if quick else FULL_SHAPE
        synth_cohort(SynthConfig(out=Path(d), cases=2 if quick else 3, seed=99, shape=shape, workers=2),
                     progress=False)
        report.cohort_record(d)
        store_format.run(out, discover(d).cases, quick=quick)
