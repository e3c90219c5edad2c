"""A realistic synthetic BraTS-like cohort, built on nilearn's bundled MNI152 1 mm anatomy.

Each case: the MNI152 T1, grey/white-matter maps and brain mask (CSF = mask - GM - WM) warped by a random
scaling, rotation and smooth deformation onto a BraTS-like grid (240 x 240 x 155 at 1 mm, LPS affine as in
real BraTS files); a glioma placed in the white matter with an irregular shape (necrotic core, enhancing
rim, oedema that spreads along white matter); clinical contrasts per modality; a per-case intensity scale,
a smooth multiplicative bias field and Rician noise; zero outside the brain (skull-stripped).

Every case draws from its own generator seeded by (seed, case index), so the same seed gives byte-identical
files whatever the number of workers.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from store.conventions import LABEL_CONVENTIONS

from .discover import LAYOUTS

FULL_SHAPE = (240, 240, 155)
FOV_MM = (240.0, 240.0, 155.0)

# Mean intensity of each tissue relative to white matter (= 1) per modality: clinical appearance.
# T1: tumour and oedema mildly hypointense (oedema barely visible); T1ce: enhancing rim bright, necrosis dark;
# T2: oedema, necrosis and CSF bright; FLAIR: oedema bright, CSF dark. RC, the resection cavity of BraTS 2024
# post-treatment cases: fluid, dark on T1 and T1ce, bright on T2, partly suppressed on FLAIR.
CONTRAST = {
    #         WM    GM    CSF   ED    ET    NCR   NET   RC
    "t1":   (1.00, 0.72, 0.30, 0.93, 0.78, 0.50, 0.80, 0.33),
    "t1ce": (1.00, 0.75, 0.30, 0.93, 2.10, 0.40, 0.80, 0.33),
    "t2":   (1.00, 1.35, 3.20, 2.40, 1.80, 2.90, 2.20, 3.00),
    "flair": (1.00, 1.25, 0.25, 1.90, 1.60, 1.30, 1.70, 0.55),
}
TISSUES = ("wm", "gm", "csf", "ed", "et", "ncr", "net", "rc")
# White-matter intensity of each modality before the per-case gain (int16 units, like scanner output).
WM_LEVEL = {"t1": 700.0, "t1ce": 800.0, "t2": 420.0, "flair": 520.0}
# How much of the MNI T1 template's fine texture (deep grey nuclei, cortex) each modality shows.
TEXTURE = {"t1": 1.0, "t1ce": 0.9, "t2": -0.8, "flair": -0.6}
NOISE_SIGMA = 0.03  # Rician noise sigma, relative to white matter
NO_ENHANCING_RATE = 0.05  # about 1 case in 20 has no enhancing tumour, as in real BraTS
MULTIFOCAL_RATE = 0.1  # about 1 case in 10 has a second lesion


@dataclass(frozen=True)
class SynthConfig:
    out: Path
    cases: int = 8
    seed: int = 0
    layout: str = "brats2021"
    shape: tuple[int, int, int] = FULL_SHAPE
    workers: int = 1


LAYOUT_CHOICES = ("brats2021", "brats2023", "brats2024", "brats2019", "msd")
# the Medical Segmentation Decathlon's Task01_BrainTumour: one 4D image per case in this channel order, and labels
# 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour (BraTS 2021's 2, 1, 4)
MSD_ORDER = ("flair", "t1", "t1ce", "t2")
MSD_FROM_2021 = {0: 0, 2: 1, 1: 2, 4: 3}
MSD_DATASET = {
    "name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images (synthetic)",
    "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}


def case_id(layout: str, index: int) -> str:
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "brats2019":
        return f"BraTS19_SYN_{index:05d}_1"
    return f"BraTS-GLI-{index:05d}-{'100' if layout == 'brats2024' else '000'}"  # 2024: a post-treatment timepoint


def convention_of(layout: str) -> str:
    """The label convention of a synthetic layout (BraTS 2018-2020 label as 2021 does: 1, 2, 4)."""
    return "brats2021" if layout in ("brats2019", "msd") else layout


def file_layout(layout: str) -> str:
    """The file naming of a layout's cohorts (BraTS 2024 names its files as 2023 does, 2018-2020 as 2021)."""
    return {"brats2024": "brats2023", "brats2019": "brats2021"}.get(layout, layout)


def grade_of(layout: str, index: int) -> str | None:
    """BraTS 2018-2020 cohorts come as HGG/ and LGG/ folders; one synthetic case in four is LGG (BraTS 2019: 76 of
    335)."""
    return ("LGG" if index % 4 == 3 else "HGG") if layout == "brats2019" else None


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """A BraTS-like LPS affine: voxel axes point to -x, -y, +z (as in real BraTS files), FOV 240x240x155 mm."""
    sp = np.array(FOV_MM) / np.array(shape)
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    aff[1, 3] = (shape[1] - 1) * sp[1]
    return aff


@lru_cache(maxsize=1)
def _anatomy():
    """MNI152 1 mm anatomy as a (1, 4, X, Y, Z) float32 tensor [T1, GM, WM, mask] and its affine (cached)."""
    import torch
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    maps = [
        np.asanyarray(t1.dataobj, dtype=np.float32),
        np.asanyarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32),
        np.asanyarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32),
        np.asanyarray(datasets.load_mni152_brain_mask(resolution=1).dataobj, dtype=np.float32),
    ]
    # channels last: the four values a sample point reads at each neighbour lie together (grid_sample twice as
    # fast as with channels first)
    vol = torch.from_numpy(np.stack(maps)[None]).contiguous(memory_format=torch.channels_last_3d)
    mask = maps[3] > 0
    centre_vox = np.argwhere(mask).mean(0)
    centre_world = t1.affine[:3, :3] @ centre_vox + t1.affine[:3, 3]
    # T1 template level of pure white matter, to express the template's texture relative to WM.
    wm_level = float(np.median(maps[0][maps[2] > 0.95]))
    return vol, t1.affine.astype(np.float64), centre_world, wm_level


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _smooth_field(rng: np.random.Generator, channels: int, coarse: int, shape, sigma: float):
    """Smooth random field (channels, *shape): normals on a coarse grid, upsampled trilinearly (torch)."""
    import torch
    import torch.nn.functional as F

    c = torch.from_numpy(rng.normal(0.0, sigma, (1, channels, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(c, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0]


def _sample_points(vol, points: np.ndarray, shape_in) -> np.ndarray:
    """Trilinear samples of ``vol`` (1, C, X, Y, Z) at fractional voxel ``points`` (N, 3); returns (C, N)."""
    import torch
    import torch.nn.functional as F

    g = torch.from_numpy(points.astype(np.float32))
    scale = torch.tensor([2.0 / (n - 1) for n in shape_in], dtype=torch.float32)
    g = (g * scale - 1.0).flip(-1)  # grid_sample wants (z, y, x) order, normalised to [-1, 1]
    out = F.grid_sample(vol, g[None, None, None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].numpy()


def _hat(n: int, k: int) -> np.ndarray:
    """(n, k) linear-interpolation weights from k control points spread over n samples (align corners)."""
    x = np.linspace(0.0, k - 1.0, n)
    return np.clip(1.0 - np.abs(x[:, None] - np.arange(k)[None, :]), 0.0, None).astype(np.float32)


def _coarse_field(ctrl: np.ndarray, shape, stride: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Trilinear upsampling of control points (C, k, k, k) spread over the grid ``shape``, on a ``stride`` times
    coarser grid: (field (M, C) over the coarse grid's flat indices, coarse shape)."""
    half = tuple((n + stride - 1) // stride for n in shape)
    hx, hy, hz = (_hat(n, k) for n, k in zip(half, ctrl.shape[1:]))
    g = np.einsum("cabk,zk,yb->ayzc", ctrl, hz, hy, optimize=True).reshape(ctrl.shape[1], -1)
    return (hx @ g).reshape(-1, ctrl.shape[0]), half


def _field_at(ctrl: np.ndarray, shape, flat: np.ndarray, ijk=None, stride: int = 2, coarse=None) -> np.ndarray:
    """Trilinear upsampling of control points (C, k, k, k) spread over the grid ``shape``, evaluated at the
    flat voxel indices ``flat``; returns (N, C). ``coarse``: ``_coarse_field``'s result, when already made.

    The field is computed on a ``stride`` times coarser grid and read at the nearest node: with control points
    tens of mm apart the error is a few hundredths of the field's amplitude, at 1 / stride^3 of the cost.
    """
    field, half = coarse if coarse is not None else _coarse_field(ctrl, shape, stride)
    i, j, k = np.unravel_index(flat, shape) if ijk is None else ijk  # integer voxel indices
    return field[np.ravel_multi_index((i // stride, j // stride, k // stride), half)]


class _Warp:
    """Random scaling, rotation and smooth deformation from the output grid into MNI152 voxel space."""

    def __init__(self, rng: np.random.Generator, shape, affine: np.ndarray):
        _, mni_aff, mni_centre, _ = _anatomy()
        self.shape = shape
        out_centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
        scale = rng.uniform(0.9, 1.04, 3)  # brain size varies; 155 mm of z must still hold it
        rot = _rotation(rng, 6.0)
        shift = rng.normal(0.0, 3.0, 3)
        inv_mni = np.linalg.inv(mni_aff)
        # output voxel -> output world -> MNI world (inverse scaling and rotation) -> MNI voxel
        m = rot @ np.diag(1.0 / scale)
        self.lin = inv_mni[:3, :3] @ m @ affine[:3, :3]
        self.off = inv_mni[:3, :3] @ (m @ (affine[:3, 3] - out_centre) + mni_centre + shift) + inv_mni[:3, 3]
        # smooth displacement (mm == MNI voxels): normals on a 5^3 control grid, trilinear in between
        self.disp = rng.normal(0.0, 2.5, (3, 5, 5, 5)).astype(np.float32)
        self._disp_field = _coarse_field(self.disp, shape, 2)  # read twice: brain candidates, then brain voxels

    def __call__(self, flat: np.ndarray, idx=None) -> np.ndarray:
        """Flat output voxel indices (N,) (``idx``: the same as voxel index arrays, when known) -> MNI voxel
        coordinates (N, 3)."""
        idx = np.unravel_index(flat, self.shape) if idx is None else idx
        ijk = np.stack(idx, -1).astype(np.float32)
        affine_part = ijk @ self.lin.T.astype(np.float32) + self.off.astype(np.float32)
        return affine_part + _field_at(self.disp, self.shape, flat, idx, coarse=self._disp_field)


def _brain_candidates(warp: _Warp, shape) -> np.ndarray:
    """Flat indices of output voxels that may hold brain: the mask warped at stride 2, dilated by one."""
    from scipy import ndimage

    vol = _anatomy()[0]
    coarse = [np.arange(0, n, 2) for n in shape]
    flat = np.ravel_multi_index(np.meshgrid(*coarse, indexing="ij"), shape).ravel()
    m = _sample_points(vol[:, 3:4], warp(flat), vol.shape[2:])[0]
    m = ndimage.binary_dilation(m.reshape([len(c) for c in coarse]) > 0.02, iterations=1)
    full = m.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: shape[0], : shape[1], : shape[2]]
    return np.flatnonzero(full.ravel())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


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


@lru_cache(maxsize=1)
def _mni_white_matter() -> np.ndarray:
    """MNI voxel coordinates (N, 3) of deep white matter (template WM > 0.9, away from the brain's edge), where
    lesions are centred."""
    from scipy import ndimage

    vol = _anatomy()[0][0].numpy()
    deep = ndimage.binary_erosion(vol[3] > 0.5, iterations=12)
    return np.argwhere((vol[2] > 0.9) & deep).astype(np.float32)


def _nearest(points: np.ndarray, centre: np.ndarray) -> int:
    """Index of the point (N, 3) nearest ``centre``, looking first within 10 mm along the first axis."""
    near = np.flatnonzero(np.abs(points[:, 0] - centre[0]) < 10.0)
    if near.size == 0:
        near = np.arange(len(points))
    return int(near[np.argmin(((points[near] - centre) ** 2).sum(1))])


def _mass_effect(points: np.ndarray, centre: np.ndarray, amplitude: float, reach: float) -> np.ndarray:
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
    out[inside] = _sigmoid(12.0 * (patches[inside] + 0.3))
    return out


def _tumour(rng: np.random.Generator, tp: TumourParams, wm: np.ndarray, brain: np.ndarray, csf: np.ndarray,
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
    axes = _rotation(rng, 180.0) @ np.diag(1.0 / rng.uniform(0.75, 1.3, 3))
    coords = [(np.arange(lo[d], hi[d]) - centre[d]) * spacing[d] for d in range(3)]
    g = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).astype(np.float32)  # mm offsets
    dist = np.linalg.norm(g @ axes.T.astype(np.float32), axis=-1)
    noise = _smooth_field(rng, 4, 6, bshape, 1.0).numpy()  # shapes of core, necrosis, oedema; enhancing patches
    width = 0.8  # mm: partial-volume edge of each compartment
    r_c = dist / (1.0 + 0.28 * np.tanh(noise[0]))
    core = _sigmoid((r_core - r_c) / width)
    r_n = dist / (1.0 + 0.35 * np.tanh(noise[1]))
    nec = _sigmoid((r_core * nec_frac - r_n) / width)
    # Oedema spreads along white matter: there the effective distance is shorter, in CSF it stops.
    wm_box, brain_box, csf_box = wm[box], brain[box], csf[box]
    r_e = dist / (1.0 + 0.3 * np.tanh(noise[2])) / (0.45 + 0.75 * wm_box)
    edema = _sigmoid((r_edema - r_e) / (2 * width))
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


def _cavity(seed: int, index: int, tm: dict, box, spacing) -> np.ndarray:
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
    noise = _smooth_field(rng, 1, 5, core.shape, 1.0).numpy()[0]
    radius = r_core * rng.uniform(0.6, 0.85)
    return (_sigmoid((radius - dist / (1.0 + 0.2 * np.tanh(noise))) / 0.8) * (core > 0.05)).astype(np.float32)


def make_case(index: int, seed: int, shape=FULL_SHAPE, layout: str = "brats2021"):
    """Generate one case: dict modality -> int16 (X, Y, Z), label uint8 (X, Y, Z), affine (4, 4).

    The work happens only at voxels that can hold brain (about a fifth of the grid) and in the tumour's box.
    """
    import torch

    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    affine = brats_affine(shape)
    spacing = np.abs(np.diag(affine)[:3])
    vol, _, _, tpl_wm = _anatomy()
    warp = _Warp(rng, shape, affine)
    tp = tumour_params(seed, index)
    lesions = [tp] + ([second_lesion(seed, index, tp)] if tp.multifocal else [])
    # lesion centres in deep MNI white matter (a second lesion well apart from the first), chosen before the
    # anatomy is sampled, so that the anatomy can be pushed aside around them
    lrng = np.random.default_rng([seed, index, 4])
    wmv = _mni_white_matter()
    centres_mni = [wmv[lrng.integers(len(wmv))]]
    for _ in lesions[1:]:
        far = wmv[np.linalg.norm(wmv - centres_mni[0], axis=1) > 45.0]
        centres_mni.append(far[lrng.integers(len(far))] if len(far) else wmv[lrng.integers(len(wmv))])
    cand = _brain_candidates(warp, shape)
    cand_ijk = np.unravel_index(cand, shape)
    points = warp(cand, cand_ijk)
    for c, lp in zip(centres_mni, lesions):
        points = _mass_effect(points, c, amplitude=0.45 * lp.r_core + 0.15 * lp.r_edema, reach=lp.r_edema + 15.0)
    t1_tpl, gm, wm, mask = _sample_points(vol, points, vol.shape[2:])
    keep = mask > 0.5
    idx, t1_tpl, gm, wm, mask, points = cand[keep], t1_tpl[keep], gm[keep], wm[keep], mask[keep], points[keep]
    ijk = tuple(a[keep] for a in cand_ijk)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    total = np.maximum(gm + wm + csf, 1e-6)
    gm, wm, csf = gm / total, wm / total, csf / total
    # each lesion's centre on the output grid: the brain voxel that samples nearest its MNI centre
    centres = [np.array(np.unravel_index(idx[_nearest(points, c)], shape)) for c in centres_mni]

    # Full-grid views the tumour needs: white matter, CSF, brain, and each voxel's place in the 1D arrays.
    n = int(np.prod(shape))
    pos = np.full(n, -1, np.int64)
    pos[idx] = np.arange(idx.size)
    pos = pos.reshape(shape)
    wm_full = np.zeros(n, np.float32)
    wm_full[idx] = wm
    csf_full = np.zeros(n, np.float32)
    csf_full[idx] = csf
    brain = (pos >= 0)
    enhancing = tp.enhancing
    conv = LABEL_CONVENTIONS[convention_of(layout)]
    label = np.zeros(shape, np.uint8)
    parts = []  # per lesion: where it is and how much of each tissue every voxel holds, for the intensities
    for k, (lp, centre) in enumerate(zip(lesions, centres)):
        box, tm = _tumour(rng, lp, wm_full.reshape(shape), brain, csf_full.reshape(shape), spacing, centre)
        cav = _cavity(seed, index, tm, box, spacing) if layout == "brats2024" and k == 0 else None
        # Labels from the soft maps (0.5 threshold): ET inside TC inside WT, nothing outside the brain; where the
        # rim does not enhance the core is non-enhancing (NCR/NET, NETC)
        lb = label[box]
        core = tm["core"] > 0.5
        lb[(tm["edema"] > 0.5) & (lb == 0)] = conv["edema"]
        lb[core] = conv["necrosis"]
        if enhancing:
            lb[core & (tm["enhancing"] > 0.5)] = conv["enhancing"]
        lb[core & (tm["necrosis"] > 0.5 * tm["core"])] = conv["necrosis"]
        if cav is not None:
            lb[cav > 0.5] = conv["cavity"]
        lb[~brain[box]] = 0
        pb = pos[box]
        sel = pb >= 0
        parts.append({
            "at": pb[sel], "ed_w": tm["edema"][sel], "core_w": tm["core"][sel],
            "nec_share": tm["necrosis"][sel] / np.maximum(tm["core"][sel], 1e-6),
            "enh_w": tm["enhancing"][sel] if enhancing else np.zeros(int(sel.sum()), np.float32),
            "hetero": 1.0 + _smooth_field(rng, 1, 8, pb.shape, 0.08).numpy()[0][sel],
            "cav_w": cav[sel] if cav is not None else None,
        })
    gain = rng.uniform(0.7, 1.3)
    bias_ctrl = rng.normal(0.0, 0.12, (4, 4, 4, 4)).astype(np.float32)
    # 4 control points a side: very smooth; exp taken on the coarse grid (the same values read at each voxel)
    coarse_bias, coarse_shape = _coarse_field(bias_ctrl, shape, 4)
    bias = np.ascontiguousarray(_field_at(bias_ctrl, shape, idx, ijk, stride=4,
                                          coarse=(np.exp(coarse_bias), coarse_shape)).T)
    tpl_pred = wm + gm * CONTRAST["t1"][1] + csf * CONTRAST["t1"][2]
    texture = 0.5 * (t1_tpl / tpl_wm - tpl_pred)
    images = {}
    # torch draws normals about twice as fast as numpy on one core; its generator is seeded from the case's
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    mods = ("t1", "t1ce", "t2", "flair")
    # tissue mixture plus the template's own fine structure, signed per modality: one product for all four
    weights = np.array([[dict(zip(TISSUES, CONTRAST[m]))[t] for t in ("wm", "gm", "csf")] + [TEXTURE[m]]
                        for m in mods], np.float32)
    mixed = weights @ np.stack([wm, gm, csf, texture.astype(np.float32)])
    for m_i, mod in enumerate(mods):
        c = dict(zip(TISSUES, CONTRAST[mod]))
        img = mixed[m_i]
        for part in parts:
            at, enh = part["at"], part["enh_w"]
            viable = c["et"] * enh + c["net"] * (1 - enh)  # enhancing where the rim enhances, else non-enhancing
            core_val = viable * (1 - part["nec_share"]) + c["ncr"] * part["nec_share"]
            v = img[at] * (1 - part["ed_w"]) + c["ed"] * part["ed_w"] * part["hetero"]
            img[at] = v * (1 - part["core_w"]) + core_val * part["core_w"] * part["hetero"]
            if part["cav_w"] is not None:  # the cavity's fluid replaces whatever tissue the tumour had there
                cw = part["cav_w"]
                img[at] = img[at] * (1 - cw) + c["rc"] * cw * part["hetero"]
        level = WM_LEVEL[mod] * gain * rng.uniform(0.9, 1.1)
        img *= bias[m_i] * level
        noise = torch.randn((2, idx.size), generator=noise_gen).numpy() * np.float32(NOISE_SIGMA * level)
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
        out = np.zeros(n, np.int16)
        out[idx] = np.clip(np.rint(img), 1, np.iinfo(np.int16).max)
        images[mod] = out.reshape(shape)
    return images, label, affine


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    # NIfTI stores Fortran order: one transposing copy here is a third of what nibabel's slice-by-slice conversion
    # of a C-ordered array costs, for the same bytes
    img = nib.Nifti1Image(np.asfortranarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # gzip container (wbits 31) with mtime 0, so the same seed gives byte-identical files; run-length
    # deflate is both faster and smaller than level-1 deflate on skull-stripped volumes
    z = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    return z.compress(img.to_bytes()) + z.flush()


def write_case(out: Path, index: int, seed: int, shape=FULL_SHAPE, layout: str = "brats2021") -> str:
    """Generate case ``index`` and write it in the BraTS layout under ``out``; returns the case id."""
    cid = case_id(layout, index)
    images, label, affine = make_case(index, seed, shape, layout)
    if layout == "msd":  # one case in five unlabelled, in imagesTs, as the MSD ships its test cases
        return _write_msd_case(Path(out), cid, images, label, affine, test=index % 5 == 4)
    grade = grade_of(layout, index)
    folder = Path(out) / grade / cid if grade else Path(out) / cid
    folder.mkdir(parents=True, exist_ok=True)
    lay = LAYOUTS[file_layout(layout)]
    names = {v: k for k, v in lay["suffixes"].items()}
    files = {names[m]: (img, affine) for m, img in images.items()}
    files["seg"] = (label, affine)
    for suffix, (arr, aff) in files.items():
        path = folder / f"{cid}{lay['sep']}{suffix}.nii.gz"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(_nifti_bytes(arr, aff))
        os.replace(tmp, path)  # never a half-written file under the final name
    return cid


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never a half-written file under the final name


def _write_msd_case(out: Path, cid: str, images: dict, label: np.ndarray, affine, test: bool) -> str:
    """An MSD Task01 case: imagesTr/<id>.nii.gz (X, Y, Z, 4) float32 in ``MSD_ORDER``, labelsTr/<id>.nii.gz in
    MSD's values; a test case only imagesTs/<id>.nii.gz."""
    stack = np.stack([images[m] for m in MSD_ORDER], axis=-1).astype(np.float32)
    _write_atomic(out / ("imagesTs" if test else "imagesTr") / f"{cid}.nii.gz", _nifti_bytes(stack, affine))
    if not test:
        lut = np.zeros(256, np.uint8)
        for k, v in MSD_FROM_2021.items():
            lut[k] = v
        _write_atomic(out / "labelsTr" / f"{cid}.nii.gz", _nifti_bytes(lut[label], affine))
    return cid


def _init_worker():
    import torch

    torch.set_num_threads(1)


def synth_cohort(cfg: SynthConfig, progress: bool = True) -> list[str]:
    """Write ``cfg.cases`` cases in parallel over ``cfg.workers`` processes; returns the case ids."""
    from concurrent.futures import ProcessPoolExecutor

    from store.progress import progress_bar

    if cfg.layout not in LAYOUT_CHOICES:
        raise ValueError(f"unknown layout {cfg.layout!r}; choose one of {', '.join(LAYOUT_CHOICES)}")
    if cfg.cases < 1:
        raise ValueError("--cases must be at least 1")
    if len(cfg.shape) != 3 or min(cfg.shape) < 8:
        raise ValueError(f"--shape needs three sizes of at least 8 voxels, got {cfg.shape}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.layout == "msd":
        import json

        test = [case_id("msd", i) for i in range(cfg.cases) if i % 5 == 4]
        train = [case_id("msd", i) for i in range(cfg.cases) if i % 5 != 4]
        meta = {**MSD_DATASET, "numTraining": len(train), "numTest": len(test),
                "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
                "test": [f"./imagesTs/{c}.nii.gz" for c in test]}
        _write_atomic(cfg.out / "dataset.json", json.dumps(meta, indent=4).encode())
    args = [(cfg.out, i, cfg.seed, cfg.shape, cfg.layout) for i in range(cfg.cases)]
    bar = progress_bar(cfg.cases, "synth", "case", enabled=progress)
    ids = []
    if cfg.workers <= 1:
        _init_worker()
        for a in args:
            ids.append(write_case(*a))
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker) as ex:
            for cid in ex.map(write_case, *zip(*args)):
                ids.append(cid)
                bar.update()
    bar.close()
    return ids
