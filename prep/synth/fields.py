"""Smooth random fields for the synthetic cohort: rotations, smooth noise, and control points upsampled
trilinearly to a grid (deformations, bias fields)."""

from __future__ import annotations

import numpy as np


def rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def smooth_field(rng: np.random.Generator, channels: int, coarse: int, shape, sigma: float):
    """Smooth random field (channels, *shape): normals on a coarse grid, upsampled trilinearly (torch)."""
    import torch
    import torch.nn.functional as F

    c = torch.from_numpy(rng.normal(0.0, sigma, (1, channels, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(c, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0]


def hat(n: int, k: int) -> np.ndarray:
    """(n, k) linear-interpolation weights from k control points spread over n samples (align corners)."""
    x = np.linspace(0.0, k - 1.0, n)
    return np.clip(1.0 - np.abs(x[:, None] - np.arange(k)[None, :]), 0.0, None).astype(np.float32)


def coarse_field(ctrl: np.ndarray, shape, stride: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Trilinear upsampling of control points (C, k, k, k) spread over the grid ``shape``, on a ``stride`` times
    coarser grid: (field (M, C) over the coarse grid's flat indices, coarse shape)."""
    half = tuple((n + stride - 1) // stride for n in shape)
    hx, hy, hz = (hat(n, k) for n, k in zip(half, ctrl.shape[1:]))
    g = np.einsum("cabk,zk,yb->ayzc", ctrl, hz, hy, optimize=True).reshape(ctrl.shape[1], -1)
    return (hx @ g).reshape(-1, ctrl.shape[0]), half


def field_at(ctrl: np.ndarray, shape, flat: np.ndarray, ijk=None, stride: int = 2, coarse=None) -> np.ndarray:
    """Trilinear upsampling of control points (C, k, k, k) spread over the grid ``shape``, evaluated at the
    flat voxel indices ``flat``; returns (N, C). ``coarse``: ``coarse_field``'s result, when already made.

    The field is computed on a ``stride`` times coarser grid and read at the nearest node: with control points
    tens of mm apart the error is a few hundredths of the field's amplitude, at 1 / stride^3 of the cost.
    """
    field, half = coarse if coarse is not None else coarse_field(ctrl, shape, stride)
    i, j, k = np.unravel_index(flat, shape) if ijk is None else ijk  # integer voxel indices
    return field[np.ravel_multi_index((i // stride, j // stride, k // stride), half)]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function of ``x`` (any shape), elementwise."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
