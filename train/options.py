"""The training command's options, shared by both ``train`` commands: its parser, the ``TrainConfig`` it fills,
and the printed form of a config (the ``python -m train`` command that gives it, as the model card records)."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import fields

from .config import TrainConfig as D  # every default below is the dataclass's: one source
from .models import LOSSES, MODELS, OPTIMIZERS, SCHEDULES  # no torch: --help stays fast


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a MONAI 3D network (TC, WT, ET) on a brats-zarr store: by default the seed's recipe (UNet, "
        "DiceLoss on sigmoid outputs, AdamW, cosine annealing with warm restarts stepped per epoch); --model, --loss, "
        "--optimizer and --schedule choose others. Early stopping on validation loss, sliding-window validation, "
        "checkpoints best.pt and last.pt (with the architecture to rebuild the network), TensorBoard logs and "
        "metrics.jsonl (wall seconds with every validation) in --run-dir. 'python -m train export --help' exports a "
        "trained run as ONNX, TorchScript, a MONAI bundle or a BraTS submission image's build context; 'python -m "
        "train plan --help' writes a plan sized to a store and a device for --plan.",
    )
    _data_options(p)
    p.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast where supported, else fp16 "
                   "with a GradScaler on CUDA; on the CPU bf16 autocast where the CPU has native bf16, else it says "
                   "so and runs in float32")
    p.add_argument("--epochs", type=int, default=D.epochs, help="maximum epochs (default: %(default)s)")
    p.add_argument("--patience", type=int, default=D.patience,
                   help="validations without a better loss before stopping (default: %(default)s)")
    p.add_argument("--min-delta", type=float, default=D.min_delta,
                   help="a validation loss must beat the best by more than this to count (default: %(default)s)")
    p.add_argument("--val-every", type=int, default=D.val_every, help="validate every N epochs (default: %(default)s)")
    p.add_argument("--patch-size", type=int, nargs=3, default=list(D.patch_size), metavar=("X", "Y", "Z"),
                   help="training patch and sliding-window size in voxels (default: "
                   f"{' '.join(map(str, D.patch_size))})")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="patches per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=D.lr, help="learning rate (default: %(default)s)")
    p.add_argument("--cache", choices=["ram", "none", "gpu"], default=D.cache,
                   help="ram: decoded cases in shared memory; none: patches read from the Zarr chunks; gpu: cases "
                   "resident on the device (default: %(default)s)")
    p.add_argument("--cache-rate", type=float, default=D.cache_rate,
                   help="share of cases the ram cache holds (default: %(default)s)")
    p.add_argument("--augmentation", choices=["seed", "nnunet"], default=D.augmentation,
                   help="seed: the seed's set (rot90, flips, intensity scale and shift, noise, bias field) on the "
                   "patch; nnunet: nnU-Net v2.8.1's default chain (rotation and scaling resampled, noise, blur, "
                   "brightness, contrast, low resolution, gamma, mirroring) on an enlarged read (205^3 for 128^3); "
                   "both batched on the device (default: %(default)s)")
    p.add_argument("--workers", type=int, default=D.workers,
                   help="loader threads assembling batches ahead of the step; 0 assembles each batch in the "
                   "training loop (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, help="train fold K of the store's k folds (into the run folder)")
    g.add_argument("--folds", type=int, help="train every fold 0..N-1 into RUN_DIR/fold-K and write kfold.json")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=D.device,
                   help="auto: CUDA when present (default: %(default)s)")
    p.add_argument("--run-dir", default=D.run_dir, help="output folder (default: %(default)s)")
    g2 = p.add_mutually_exclusive_group()
    g2.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last.pt")
    g2.add_argument("--overwrite", action="store_true",
                    help="--run-dir holds an earlier run: move it aside to RUN_DIR.old-N (nothing is deleted) and "
                    "start over; without --resume or --overwrite a used run folder is refused")
    p.add_argument("--seed", type=int, default=D.seed, help="seed of weights, patches and augmentation (default: 0)")
    p.add_argument("--model", choices=list(MODELS), default=D.model,
                   help="the network (MONAI): " + "; ".join(f"{k}: {v.note}" for k, v in MODELS.items())
                   + " (default: %(default)s)")
    p.add_argument("--channels", type=int, nargs="+", default=None,
                   help="model size: unet and dynunet, feature channels per level (the count is the depth); "
                   "segresnet, channels doubling per level from its init_filters; swinunetr, one feature size (a "
                   "multiple of 12). Defaults: " + "; ".join(f"{k} {' '.join(map(str, v.default_channels))}"
                                                            for k, v in MODELS.items()))
    p.add_argument("--deep-supervision", action="store_true",
                   help="dynunet only: the loss also over the decoder's lower-resolution outputs, weights halving "
                   "per level, as nnU-Net weighs them")
    p.add_argument("--loss", choices=LOSSES, default=D.loss,
                   help="on sigmoid outputs per region: dice (the seed's), dicece (Dice + binary cross-entropy, as "
                   "nnU-Net), dicefocal (default: %(default)s)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=D.optimizer,
                   help="adamw (the seed's) or sgd (Nesterov, momentum 0.99, as nnU-Net) (default: %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default=D.schedule,
                   help="learning rate per epoch: cosine-restarts (the seed's, T_0 10), poly (lr x (1 - epoch / "
                   "epochs)^0.9, as nnU-Net), cosine (one cosine over --epochs) (default: %(default)s)")
    _budget_options(p)
    return p


def _data_options(p: argparse.ArgumentParser) -> None:
    """What is trained on and for: the store, a plan, the input modalities and the output regions."""
    p.add_argument("--store", default=D.store, help="store path (default: %(default)s)")
    p.add_argument("--plan", metavar="FILE", help="train the plan in FILE (python -m train plan writes one; a run's "
                   "plan.json is one too): its modalities, regions, patch, batch, network, augmentation, loss, "
                   "optimiser, schedule and inference become the defaults, so flags given beside it still win; a plan "
                   "made for another store (modalities, spacing or labels) is refused"),
    p.add_argument("--modalities", nargs="+", default=list(D.modalities), metavar="M",
                   help=f"input channels among t1 t1ce t2 flair (default: {' '.join(D.modalities)})")
    p.add_argument("--regions", nargs="+", metavar="R",
                   help=f"output channels: {' '.join(D.regions)} (default), and RC (resection cavity) on a BraTS "
                   "2024 store")


def _budget_options(p: argparse.ArgumentParser) -> None:
    """How long and how much: the time limit, snapshots, validation cases, steps per epoch, collective timeouts."""
    p.add_argument("--time-limit", type=float, metavar="MIN",
                   help="minutes of wall time: training stops cleanly (validation run, checkpoints written) when "
                   "the next epoch and its validation would pass the limit, so runs compare at equal time (default: "
                   "none)")
    p.add_argument("--snapshot-at", type=float, nargs="+", default=list(D.snapshot_at), metavar="MIN",
                   help="keep the run as it stands at these minutes of wall time: at the end of the last epoch before "
                   "each (validated then), best.pt, config and metrics are copied to RUN_DIR/at-<MIN>min, a run "
                   "folder evaluate and predict read; a run that ends earlier takes them at its end (default: none)")
    p.add_argument("--max-val-cases", type=int, help="validate on at most this many cases (quick runs)")
    p.add_argument("--steps-per-epoch", type=int, metavar="N",
                   help="optimizer steps per epoch on every process (default: training cases / (processes x "
                   "batch size), rounded up, so each case is seen about once per epoch)")
    p.add_argument("--dist-timeout", type=float, default=D.dist_timeout, metavar="S",
                   help="under torchrun: seconds a collective may wait for the other processes before the job "
                   "stops with an error naming the rank and the step (default: %(default)s)")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict | None]:
    """The command's flags and the plan they name (``--plan``), whose values are the flags' defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.plan:
        return args, None
    from .plan import config_values, read_plan

    plan = read_plan(args.plan)
    parser.set_defaults(**{k: list(v) if isinstance(v, (list, tuple)) else v
                           for k, v in config_values(plan).items()})
    return parser.parse_args(argv), plan


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the parsed flags give: every field the parser has a flag for from its flag, the others (and
    flags left unset: regions, channels) from the dataclass's defaults."""
    given = vars(args)
    kw = {f.name: tuple(given[f.name]) if isinstance(given[f.name], list) else given[f.name]
          for f in fields(D) if f.name in given and given[f.name] is not None}
    kw["channels"] = tuple(args.channels or MODELS[args.model].default_channels)
    kw["snapshot_at"] = tuple(sorted(args.snapshot_at))
    kw.update(fold=args.fold, folds=args.folds)
    return D(**kw)


def training_command(cfg) -> str:
    """The ``python -m train`` command that gives ``cfg`` (a TrainConfig): every flag whose value differs from its
    default, spelled as the parser spells it."""
    values, parts = cfg.to_dict(), ["python", "-m", "train"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest not in values or action.dest in ("resume", "overwrite"):
            continue
        v, default = values[action.dest], action.default
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(default, list):
            default = tuple(default)
        if v is None or v == default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(v, tuple):
            parts += [flag, *map(str, v)]
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(x) for x in parts)
