"""``python -m train``: mixed-precision 3D UNet training from the store (single run, one fold, or k folds).

Launch with ``torchrun --nproc-per-node N -m train ...`` for DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import sys

from .options import config_from_args, parse_args  # no torch: --help stays fast


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        from .export_cli import build_export_parser

        export_args = build_export_parser().parse_args(argv[1:])  # before torch: --help answers at once
        from .export import run_command

        return run_command(export_args)
    if argv[:1] == ["plan"]:
        from .plan_cli import main as plan_main

        return plan_main(argv[1:])
    from .errors import ConfigError

    try:
        args, plan = parse_args(argv)
    except ConfigError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    from store import FormatError

    from .checkpoints import CheckpointError
    from .distributed import CollectiveError, Dist
    from .experiment import check_flags, run

    dist = Dist.from_env(timeout_s=cfg.dist_timeout if cfg.dist_timeout > 0 else 300.0)
    try:
        check_flags(cfg)
        if dist.enabled:
            import torch

            dist.init(use_cuda=torch.cuda.is_available() and cfg.device != "cpu")
        run(cfg, dist, plan)
    except (ConfigError, FormatError, FileNotFoundError, KeyError, ImportError) as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 2
    except (CollectiveError, CheckpointError) as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not dist.enabled:
            raise
        # a collective inside DDP's backward pass failed or timed out
        print(f"python -m train: error: {dist.describe_failure('a gradient all-reduce', e)}", file=sys.stderr)
        return 1
    finally:
        dist.close()
    return 0
