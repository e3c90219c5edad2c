"""Small programs the distributed tests launch under torchrun (``python -m tests.dist_probe KIND ...``).

- ``validate STORE``: the trainer's validation of a fixed, seeded model on the store's val split; rank 0
  prints the reduced figures as JSON.
- ``timeout``: rank 1 never joins rank 0's collective; rank 0 must stop with the trainer's error.
"""

from __future__ import annotations

import json
import sys
import time


def _validate(store_path: str) -> int:
    import torch

    from store import open_store
    from train.config import TrainConfig
    from train.device import amp_context
    from train.distributed import Dist
    from train.models import build, make_loss
    from train.validation import validate

    dist = Dist.from_env(timeout_s=60)
    dist.init(use_cuda=False)
    cfg = TrainConfig(store=store_path, channels=(4, 8, 16), patch_size=(16, 16, 16), device="cpu")
    torch.manual_seed(1)
    model = build(cfg)
    store = open_store(store_path)
    autocast, _, _ = amp_context(cfg, torch.device("cpu"))
    ids = store.splits["train"]  # more cases than ranks, an odd number of them
    v = validate(model, store, ids, cfg, torch.device("cpu"), autocast, make_loss(cfg), dist)
    v.pop("_example")
    if dist.is_writer:
        print("RESULT " + json.dumps(v))
    dist.close()
    return 0


def _timeout() -> int:
    from train.distributed import CollectiveError, Dist

    dist = Dist.from_env(timeout_s=3)
    dist.init(use_cuda=False)
    if dist.rank == 1:
        time.sleep(60)  # alive, but never makes the call rank 0 waits in
        return 0
    dist.position = "epoch 1, step 2/3"
    try:
        dist.sum([1.0], "the epoch's loss reduction")
    except CollectiveError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from train.distributed import end_process

    kind = sys.argv[1]
    end_process(_validate(sys.argv[2]) if kind == "validate" else _timeout())
