"""Where the training patches lie: seeded positions for every batch of an epoch, drawn before any data is read
(the foreground oversampling as nnU-Net's), and the window of a patch cut from a case, zero where it overhangs.
``train.loader`` reads the patches these name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PatchSpec:
    case: int  # index into the loader's case list
    start: tuple[int, int, int]  # corner on the stored grid; may overhang (then zero-padded)


def _start_range(shape, patch) -> list[tuple[int, int]]:
    """Allowed corner positions per axis: inside the case, or centred-ish overhang where the case is smaller."""
    return [(0, s - p) if s >= p else (s - p, 0) for s, p in zip(shape, patch)]


class PatchSampler:
    """Seeded patch positions for an epoch: cases in shuffled order, as the seed's loader, one pass over them
    per epoch by default; with ``batches`` an epoch is that many batches, drawn from as many shuffled passes as
    it takes (so every rank of a distributed run can run the same number of steps)."""

    def __init__(self, shapes: list[tuple[int, int, int]], foreground: list[np.ndarray], patch, batch_size: int,
                 fg_fraction: float = 1 / 3, seed: int = 0, batches: int | None = None):
        self.shapes = shapes
        self.fg = foreground  # per case: int32 (N, 4) region, x, y, z
        self.patch = tuple(int(p) for p in patch)
        self.batch_size = batch_size
        self.fg_fraction = fg_fraction
        self.seed = seed
        self.batches = batches

    def batches_per_epoch(self) -> int:
        return self.batches or max(1, math.ceil(len(self.shapes) / self.batch_size))

    def n_foreground(self) -> int:
        return int(round(self.batch_size * self.fg_fraction))

    def epoch(self, epoch: int) -> list[list[PatchSpec]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = self.batches_per_epoch() * self.batch_size
        order = np.concatenate([rng.permutation(len(self.shapes)) for _ in range(math.ceil(n / len(self.shapes)))])
        batches = []
        for b in range(self.batches_per_epoch()):
            specs = []
            for i in range(self.batch_size):
                c = int(order[b * self.batch_size + i])
                force_fg = i >= self.batch_size - self.n_foreground()
                specs.append(PatchSpec(c, self._start(rng, c, force_fg)))
            batches.append(specs)
        return batches

    def _start(self, rng, c: int, force_fg: bool) -> tuple[int, int, int]:
        ranges = _start_range(self.shapes[c], self.patch)
        fg = self.fg[c]
        if force_fg and len(fg):
            regions = np.unique(fg[:, 0])
            r = regions[rng.integers(len(regions))]
            pts = fg[fg[:, 0] == r]
            centre = pts[rng.integers(len(pts)), 1:]
            return tuple(int(np.clip(x - p // 2, lo, hi)) for x, p, (lo, hi) in zip(centre, self.patch, ranges))
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)


def crop_pad(arr, start, patch, out=None):
    """Window ``patch`` at ``start`` of the last three axes of ``arr`` (numpy or torch), zero where it overhangs.

    With ``out`` (same kind, shape (..., *patch)) the window is written there: one pass over the data."""
    shape = arr.shape[-3:]
    src = tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, patch, shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    lead = arr.shape[:-3]
    inside = all(a.stop - a.start == p for a, p in zip(src, patch))
    if out is None:
        if isinstance(arr, torch.Tensor):
            out = (torch.empty if inside else torch.zeros)((*lead, *patch), dtype=arr.dtype, device=arr.device)
        else:
            out = (np.empty if inside else np.zeros)((*lead, *patch), dtype=arr.dtype)
    elif not inside:
        out[...] = 0
    out[(..., *dst)] = arr[(..., *src)]
    return out


def region(start, patch, shape) -> tuple[slice, ...]:
    """The part of the window ``patch`` at ``start`` that lies inside ``shape``, as slices."""
    return tuple(slice(max(s, 0), min(s + p, n)) for s, p, n in zip(start, patch, shape))
