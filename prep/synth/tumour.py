"""The synthetic glioma: its drawn size and kind (``tumour_params``), soft maps of oedema, core, necrosis and
patchy enhancement in a box around its centre (``tumour_maps``), the resection cavity of a post-treatment case
(``cavity_map``), and the mass effect that pushes the anatomy aside (``mass_effect``). All sizes in mm."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fields import rotation, sigmoid, smooth_field

NO_ENHANCING_RATE = 0.05  # about 1 case in 20 has no enhancing tumour, as in real BraTS


MULTIFOCAL_RATE = 0.1  # about 1 case in 10 has a second lesion


@dataclass(frozen=True)
class TumourParams:
    """The drawn size and kind of a case's tumour (mm)."""

    r_core: float
    r_edema: float
    necrosis_fraction: float
    enhancing: bool
    multifocal: bool = False  # a second, smaller lesion elsewhere in the white matter


def tumour_params(seed: int, index: int) -> TumourParams:
    """Size and kind of case ``index``'s tumour, from a stream of its own (so it can be checked cheaply)."""
    rng = np.random.default_rng([seed, index, 1])
    r_core = float(np.exp(rng.uniform(np.log(4.0), np.log(24.0))))  # small to large tumours
    return TumourParams(
        r_core=r_core,
        r_edema=r_core * rng.uniform(1.2, 1.9) + rng.uniform(3.0, 12.0),
        necrosis_fraction=rng.uniform(0.25, 0.7),
        enhancing=bool(rng.random() >= NO_ENHANCING_RATE),
        multifocal=bool(rng.random() < MULTIFOCAL_RATE),
    )


def second_lesion(seed: int, index: int, first: TumourParams) -> TumourParams:
    """The smaller second lesion of a multifocal case, from a stream of its own."""
    rng = np.random.default_rng([seed, index, 3])
    r_core = first.r_core * rng.uniform(0.35, 0.7)
    return TumourParams(r_core=r_core, r_edema=r_core * rng.uniform(1.2, 1.8) + rng.uniform(2.0, 8.0),
                        necrosis_fraction=rng.uniform(0.2, 0.6), enhancing=first.enhancing)


def mass_effect(points: np.ndarray, centre: np.ndarray, amplitude: float, reach: float) -> np.ndarray:
    """Mass effect on MNI sampling points (N, 3): each point samples the anatomy nearer the lesion's centre,
    so the brain around the lesion appears pushed outwards (ventricles and sulci compressed and displaced).
    Radial displacement u(r) = A tanh(r / A) exp(-(r / R)^2): at most r (nothing crosses the centre), smooth,
    fading to nothing beyond the reach R (mm; MNI voxels are 1 mm)."""
    far = 2.6 * reach  # beyond it the displacement is under a quarter of a percent of A: leave those points be
    near = np.flatnonzero((np.abs(points[:, 0] - centre[0]) < far) & (np.abs(points[:, 1] - centre[1]) < far)
                          & (np.abs(points[:, 2] - centre[2]) < far))
    d = points[near] - centre
    r = np.sqrt((d * d).sum(1))
    u = amplitude * np.tanh(r / amplitude) * np.exp(-(r / reach) ** 2)
    out = points.copy()
    out[near] -= d * (u / np.maximum(r, 1e-6))[:, None]
    return out


def _enhancing(patches: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Where the viable core enhances (0..1), computed only inside the core (most of the box is not)."""
    out = np.zeros(core.shape, np.float32)
    inside = core > 0.01
    out[inside] = sigmoid(12.0 * (patches[inside] + 0.3))
    return out


def tumour_maps(rng: np.random.Generator, tp: TumourParams, wm: np.ndarray, brain: np.ndarray, csf: np.ndarray,
            spacing, centre=None):
    """Soft tumour maps in a box around ``centre`` (a voxel; default a random white-matter voxel): returns (box
    slices, soft maps). Enhancement is patchy: ``enhancing`` (0..1) says how much of the viable core enhances."""
    if centre is None:
        cand = np.flatnonzero((wm > 0.85).ravel())
        if cand.size == 0:
            cand = np.flatnonzero(brain.ravel())
        centre = np.array(np.unravel_index(cand[rng.integers(cand.size)], wm.shape))
    r_core, r_edema, nec_frac = tp.r_core, tp.r_edema, tp.necrosis_fraction
    half_mm = 1.7 * r_edema + 4.0
    half = np.ceil(half_mm / np.asarray(spacing)).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, wm.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))
    axes = rotation(rng, 180.0) @ np.diag(1.0 / rng.uniform(0.75, 1.3, 3))
    coords = [(np.arange(lo[d], hi[d]) - centre[d]) * spacing[d] for d in range(3)]
    g = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).astype(np.float32)  # mm offsets
    dist = np.linalg.norm(g @ axes.T.astype(np.float32), axis=-1)
    noise = smooth_field(rng, 4, 6, bshape, 1.0).numpy()  # shapes of core, necrosis, oedema; enhancing patches
    width = 0.8  # mm: partial-volume edge of each compartment
    r_c = dist / (1.0 + 0.28 * np.tanh(noise[0]))
    core = sigmoid((r_core - r_c) / width)
    r_n = dist / (1.0 + 0.35 * np.tanh(noise[1]))
    nec = sigmoid((r_core * nec_frac - r_n) / width)
    # Oedema spreads along white matter: there the effective distance is shorter, in CSF it stops.
    wm_box, brain_box, csf_box = wm[box], brain[box], csf[box]
    r_e = dist / (1.0 + 0.3 * np.tanh(noise[2])) / (0.45 + 0.75 * wm_box)
    edema = sigmoid((r_edema - r_e) / (2 * width))
    edema *= np.clip(1.5 - 2.0 * csf_box, 0.0, 1.0)
    inside = brain_box.astype(np.float32)
    # a patchy, not perfectly round rim: a smooth field decides where the viable core enhances (most of it)
    patches = noise[3]
    maps = {
        "edema": np.maximum(edema, core) * inside,
        "core": core * inside,
        "necrosis": nec * core * inside,
        "enhancing": _enhancing(patches, core),
    }
    return box, maps


def cavity_map(seed: int, index: int, tm: dict, box, spacing) -> np.ndarray:
    """Soft resection-cavity map in the tumour's box: a lumpy ellipsoid inside the core, off its centre, so
    residual tumour (enhancing rim, necrosis) stays on one side of it, as after a subtotal resection."""
    rng = np.random.default_rng([seed, index, 2])
    core = tm["core"]
    w = core.sum()
    if w <= 0:
        return np.zeros_like(core)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in core.shape], indexing="ij")
    centre = np.array([(g * core).sum() / w for g in grid])
    extent = np.array([np.sqrt(((g - c) ** 2 * core).sum() / w) for g, c in zip(grid, centre)])  # voxels
    r_core = float(np.mean(extent * np.asarray(spacing))) * 2.2  # mm (a uniform ball's radius is 2.24 std)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    cav_centre = centre + direction * 0.35 * r_core / np.asarray(spacing)
    off = np.stack([(g - c) * s for g, c, s in zip(grid, cav_centre, spacing)], -1)
    dist = np.linalg.norm(off * rng.uniform(0.8, 1.25, 3).astype(np.float32), axis=-1)
    noise = smooth_field(rng, 1, 5, core.shape, 1.0).numpy()[0]
    radius = r_core * rng.uniform(0.6, 0.85)
    return (sigmoid((radius - dist / (1.0 + 0.2 * np.tanh(noise))) / 0.8) * (core > 0.05)).astype(np.float32)
