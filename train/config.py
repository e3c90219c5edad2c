"""The training configuration: one frozen dataclass, filled by the CLI, saved as ``config.json`` in the run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from store.conventions import REGIONS

from .runfolder import write_json

# Fields that may differ when a run is resumed (they do not change what is computed per epoch).
RESUMABLE_CHANGES = {"epochs", "resume", "workers", "run_dir", "dist_timeout", "overwrite", "time_limit",
                     "snapshot_at"}


@dataclass(frozen=True)
class TrainConfig:
    store: str = "data/brats.zarr"
    modalities: tuple[str, ...] = ("t1", "t2", "flair")
    regions: tuple[str, ...] = REGIONS  # the model's output channels, in this order
    run_dir: str = "runs/default"
    epochs: int = 100
    patience: int = 10
    min_delta: float = 0.0
    val_every: int = 1
    patch_size: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    amp: bool = False
    cache: str = "ram"
    cache_rate: float = 1.0
    workers: int = 2
    fold: int | None = None
    folds: int | None = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # a used run folder is moved aside (never deleted) and the run starts over
    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 2
    dropout: float = 0.2
    fg_fraction: float = 1 / 3
    augmentation: str = "seed"  # the preset: seed (train.augment) or nnunet (train.nnunet_augment)
    sw_batch_size: int = 2
    # inference (train.plan's inference section): the sliding window's overlap and blending (MONAI's mode), the
    # probability above which a voxel is in a region
    overlap: float = 0.5
    blending: str = "constant"
    threshold: float = 0.5
    t0: int = 10
    eta_min: float = 1e-6
    max_val_cases: int | None = None
    steps_per_epoch: int | None = None  # None: ceil(training cases / (processes * batch size))
    dist_timeout: float = 300.0  # seconds a collective may wait for the other ranks
    # the architecture and recipe (train.models); the defaults are the seed's
    model: str = "unet"
    deep_supervision: bool = False
    loss: str = "dice"
    optimizer: str = "adamw"
    schedule: str = "cosine-restarts"
    time_limit: float | None = None  # minutes of wall time; training stops before an epoch that would pass it
    snapshot_at: tuple[float, ...] = ()  # minutes of wall time at which the run is kept as it stands (train.snapshots)

    def to_dict(self) -> dict:
        """JSON types only (tuples become lists), as saved in config.json and in checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def differences(self, other: TrainConfig) -> dict:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES}
