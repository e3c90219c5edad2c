"""The bad inputs of a training run, refused before any work starts: modalities, regions, splits, labels, patch
size, cache mode, GPUs per node and the ram cache's memory."""

from __future__ import annotations

import numpy as np

from store.conventions import trainable_regions

from .config import TrainConfig
from .distributed import Dist
from .errors import ConfigError


def case_cache_bytes(shape, n_modalities: int) -> int:
    """Bytes one decoded case takes in the ram or gpu cache: float16 channels plus the uint8 label."""
    return (2 * n_modalities + 1) * int(np.prod(shape))


def check_inputs(cfg: TrainConfig, store, train_ids: list[str], val_ids: list[str]) -> None:
    """Every bad input named by the CLI contract, before any work starts."""
    from .loader import CACHE_MODES

    if err := store.modality_error(cfg.modalities):
        raise ConfigError(err)
    allowed = trainable_regions(store.label_convention)
    if bad := [r for r in cfg.regions if r not in allowed]:
        raise ConfigError(f"--regions {' '.join(bad)}: a {store.label_convention} store trains "
                          f"{', '.join(allowed)}")
    if not train_ids:
        raise ConfigError("no training cases in this split")
    if not val_ids:
        raise ConfigError("no validation cases in this split (the store's 'val' is empty); use --fold K")
    unlabelled = [c for c in train_ids + val_ids if not store.case(c).has_label]
    if unlabelled:
        raise ConfigError(f"the store holds no labels for {len(unlabelled)} training/validation cases "
                          f"(e.g. {unlabelled[0]}); training needs labels")
    shapes = [store.case(c).shape for c in train_ids]
    if not any(all(s >= p for s, p in zip(shape, cfg.patch_size)) for shape in shapes):
        largest = max(shapes, key=lambda s: np.prod(s))
        raise ConfigError(f"--patch-size {' '.join(map(str, cfg.patch_size))} is larger than every training case "
                          f"(largest {'x'.join(map(str, largest))}); choose a smaller patch")
    if cfg.cache not in CACHE_MODES:
        raise ConfigError(f"--cache must be ram, none or gpu, not {cfg.cache!r}")


def check_gpu_ranks(cfg: TrainConfig, dist: Dist, device_count: int) -> None:
    """``--cache gpu`` (indeed any CUDA run) needs one GPU per process on the node."""
    if cfg.cache == "gpu" and dist.local_world > device_count:
        raise ConfigError(f"--cache gpu with {dist.local_world} processes on this node, which has {device_count} "
                          f"GPU(s): start at most {device_count} processes per node (--nproc-per-node)")


def check_cache_memory(cfg: TrainConfig, store, train_ids: list[str], dist: Dist,
                       available: int | None) -> int:
    """Refuse a ``--cache ram`` cohort that would not fit in this node's memory, before anything is cached.

    Needed: every case the node's ranks cache (their shards, ``cache_rate`` of each), as float16
    channels plus the uint8 label. ``available``: the least MemAvailable any of the node's ranks saw. Returns
    the bytes needed on the node."""
    if cfg.cache != "ram":
        return 0
    shapes = {c: store.case(c).shape for c in set(train_ids)}
    need = 0
    for r in dist.node_ranks:
        shard = dist.shard(train_ids, r)
        cached = shard[: int(len(shard) * cfg.cache_rate)]
        need += sum(case_cache_bytes(shapes[c], len(cfg.modalities)) for c in cached)
    if available is not None and need > 0.9 * available:
        raise ConfigError(f"--cache ram needs {need / 2**30:.2f} GiB on this node for "
                          f"{len(set(train_ids))} training cases ({dist.local_world} process(es)), and "
                          f"{available / 2**30:.2f} GiB is available; use --cache none (patches read from the "
                          f"store), a smaller --cache-rate, or more nodes")
    return need
