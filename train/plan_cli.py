"""``python -m train plan``: write a plan for a store, sized to a device by measured training steps
(train.planner); its ``--help`` imports no torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ConfigError


def build_plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train plan",
        description="Write a plan for a store: the patch and the network's depth from the store's fingerprint (its "
        "cases' shapes and spacing) as nnU-Net's planner derives them, then the largest batch (from 2; else a "
        "smaller patch) whose training step's peak memory, measured by trial steps on the device, fits --memory. "
        "'python -m train --plan FILE' trains it.")
    p.add_argument("--store", required=True, help="the store to plan for")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the trial steps run and training will run (default: %(default)s)")
    p.add_argument("--memory", type=float, metavar="GB",
                   help="the budget: on cuda, torch's peak allocation (default 8, nnU-Net's target); on cpu, the "
                   "training process's peak resident memory (default: half of this machine's memory)")
    p.add_argument("--modalities", nargs="+", metavar="M", help="input channels (default: every modality of the "
                   "store)")
    p.add_argument("--model", choices=["unet", "dynunet"], default="unet",
                   help="the network whose depth and widths are planned (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="plan for mixed precision (python -m train --amp)")
    p.add_argument("--out", default="plan.json", help="the plan file (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    return p


def default_memory_gb(device: str) -> float:
    if device == "cuda":
        return 8.0
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30 / 2


def main(argv: list[str]) -> int:
    args = build_plan_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.memory is not None and args.memory <= 0:
            raise ConfigError(f"--memory must be a positive number of GB, not {args.memory:g}")
        if out.exists() and not args.overwrite:
            raise ConfigError(f"--out {out} exists: pass --overwrite to replace it, or another --out")
        from store import FormatError, open_store

        from .planner import plan_for_store
        from .runfolder import write_json

        try:
            store = open_store(args.store)
        except (FileNotFoundError, FormatError) as e:
            raise ConfigError(str(e)) from None
        budget = args.memory or default_memory_gb(args.device)
        plan = plan_for_store(store, budget, args.device, args.modalities, args.model, args.amp)
    except ConfigError as e:
        print(f"python -m train plan: error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, plan)
    s = plan["sizing"]
    print(f"wrote {out}: patch {'x'.join(map(str, plan['training']['patch_size']))}, batch "
          f"{plan['training']['batch_size']}, {s['levels']} levels {json.dumps(plan['network']['channels'])}; "
          f"measured peak {s['peak_mb']:.0f} MB of {s['budget_gb']:g} GB on {s['device']}")
    return 0
