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

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from store.conventions import LABEL_CONVENTIONS

from .fields import coarse_field, field_at, rotation, smooth_field
from .layouts import LAYOUT_CHOICES, convention_of, write_layout_case, write_msd_dataset
from .tumour import cavity_map, mass_effect, second_lesion, tumour_maps, tumour_params

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


@dataclass(frozen=True)
class SynthConfig:
    out: Path
    cases: int = 8
    seed: int = 0
    layout: str = "brats2021"
    shape: tuple[int, int, int] = FULL_SHAPE
    workers: int = 1
    confounders: bool = True  # prep.synth.confounders: vessels, non-tumour hyperintensities, thick slices, residue


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


def _sample_points(vol, points: np.ndarray, shape_in) -> np.ndarray:
    """Trilinear samples of ``vol`` (1, C, X, Y, Z) at fractional voxel ``points`` (N, 3); returns (C, N)."""
    import torch
    import torch.nn.functional as F

    g = torch.from_numpy(points.astype(np.float32))
    scale = torch.tensor([2.0 / (n - 1) for n in shape_in], dtype=torch.float32)
    g = (g * scale - 1.0).flip(-1)  # grid_sample wants (z, y, x) order, normalised to [-1, 1]
    out = F.grid_sample(vol, g[None, None, None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, :, 0, 0].numpy()


class _Warp:
    """Random scaling, rotation and smooth deformation from the output grid into MNI152 voxel space."""

    def __init__(self, rng: np.random.Generator, shape, affine: np.ndarray):
        _, mni_aff, mni_centre, _ = _anatomy()
        self.shape = shape
        out_centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
        scale = rng.uniform(0.9, 1.04, 3)  # brain size varies; 155 mm of z must still hold it
        rot = rotation(rng, 6.0)
        shift = rng.normal(0.0, 3.0, 3)
        inv_mni = np.linalg.inv(mni_aff)
        # output voxel -> output world -> MNI world (inverse scaling and rotation) -> MNI voxel
        m = rot @ np.diag(1.0 / scale)
        self.lin = inv_mni[:3, :3] @ m @ affine[:3, :3]
        self.off = inv_mni[:3, :3] @ (m @ (affine[:3, 3] - out_centre) + mni_centre + shift) + inv_mni[:3, 3]
        # smooth displacement (mm == MNI voxels): normals on a 5^3 control grid, trilinear in between
        self.disp = rng.normal(0.0, 2.5, (3, 5, 5, 5)).astype(np.float32)
        self._disp_field = coarse_field(self.disp, shape, 2)  # read twice: brain candidates, then brain voxels

    def __call__(self, flat: np.ndarray, idx=None) -> np.ndarray:
        """Flat output voxel indices (N,) (``idx``: the same as voxel index arrays, when known) -> MNI voxel
        coordinates (N, 3)."""
        idx = np.unravel_index(flat, self.shape) if idx is None else idx
        ijk = np.stack(idx, -1).astype(np.float32)
        affine_part = ijk @ self.lin.T.astype(np.float32) + self.off.astype(np.float32)
        return affine_part + field_at(self.disp, self.shape, flat, idx, coarse=self._disp_field)


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


@dataclass
class _Brain:
    """The brain voxels of one case's grid: flat indices ``idx`` and voxel indices ``ijk`` into the grid, and per
    voxel (1D arrays in ``idx`` order) the template T1, the grey-matter, white-matter and CSF fractions (summing
    to 1) and the MNI voxel coordinates (N, 3) it samples."""

    shape: tuple[int, int, int]
    idx: np.ndarray
    ijk: tuple
    t1_tpl: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    points: np.ndarray

    def full(self, values: np.ndarray, dtype=np.float32) -> np.ndarray:
        """``values`` (one per brain voxel) on the whole grid (X, Y, Z), zero elsewhere."""
        out = np.zeros(int(np.prod(self.shape)), dtype)
        out[self.idx] = values
        return out.reshape(self.shape)


def _lesion_centres(seed: int, index: int, count: int) -> list[np.ndarray]:
    """MNI voxel centres of a case's ``count`` lesions in deep white matter, a second one well apart from the
    first; from a stream of their own, drawn before the anatomy is sampled so it can be pushed aside around them."""
    lrng = np.random.default_rng([seed, index, 4])
    wmv = _mni_white_matter()
    centres = [wmv[lrng.integers(len(wmv))]]
    for _ in range(count - 1):
        far = wmv[np.linalg.norm(wmv - centres[0], axis=1) > 45.0]
        centres.append(far[lrng.integers(len(far))] if len(far) else wmv[lrng.integers(len(wmv))])
    return centres


def _warped_brain(warp: _Warp, shape, centres_mni, lesions) -> _Brain:
    """The anatomy sampled through ``warp`` at the voxels that can hold brain, pushed aside by each lesion's mass
    effect; tissue fractions normalised (CSF = mask - GM - WM)."""
    vol = _anatomy()[0]
    cand = _brain_candidates(warp, shape)
    cand_ijk = np.unravel_index(cand, shape)
    points = warp(cand, cand_ijk)
    for c, lp in zip(centres_mni, lesions):
        points = mass_effect(points, c, amplitude=0.45 * lp.r_core + 0.15 * lp.r_edema, reach=lp.r_edema + 15.0)
    t1_tpl, gm, wm, mask = _sample_points(vol, points, vol.shape[2:])
    keep = mask > 0.5
    idx, t1_tpl, gm, wm, mask, points = cand[keep], t1_tpl[keep], gm[keep], wm[keep], mask[keep], points[keep]
    ijk = tuple(a[keep] for a in cand_ijk)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    total = np.maximum(gm + wm + csf, 1e-6)
    return _Brain(shape, idx, ijk, t1_tpl, gm / total, wm / total, csf / total, points)


def _place_lesions(rng, seed: int, index: int, layout: str, spacing, brain: _Brain, lesions, centres):
    """The label map (X, Y, Z) of the lesions at ``centres`` (voxels) and, per lesion, where it lies among the
    brain voxels and how much of each tissue each of them holds (for the intensities)."""
    shape = brain.shape
    pos = np.full(int(np.prod(shape)), -1, np.int64)  # each grid voxel's place in the brain's 1D arrays
    pos[brain.idx] = np.arange(brain.idx.size)
    pos = pos.reshape(shape)
    wm_full, csf_full, inside = brain.full(brain.wm), brain.full(brain.csf), pos >= 0
    enhancing = lesions[0].enhancing
    conv = LABEL_CONVENTIONS[convention_of(layout)]
    label = np.zeros(shape, np.uint8)
    parts = []
    for k, (lp, centre) in enumerate(zip(lesions, centres)):
        box, tm = tumour_maps(rng, lp, wm_full, inside, csf_full, spacing, centre)
        cav = cavity_map(seed, index, tm, box, spacing) if layout == "brats2024" and k == 0 else None
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
        lb[~inside[box]] = 0
        pb = pos[box]
        sel = pb >= 0
        parts.append({
            "at": pb[sel], "ed_w": tm["edema"][sel], "core_w": tm["core"][sel],
            "nec_share": tm["necrosis"][sel] / np.maximum(tm["core"][sel], 1e-6),
            "enh_w": tm["enhancing"][sel] if enhancing else np.zeros(int(sel.sum()), np.float32),
            "hetero": 1.0 + smooth_field(rng, 1, 8, pb.shape, 0.08).numpy()[0][sel],
            "cav_w": cav[sel] if cav is not None else None,
        })
    return label, parts


def _images(rng, brain: _Brain, parts: list) -> dict:
    """modality -> int16 (X, Y, Z): each voxel's tissue mixture and the template's texture in each modality's
    contrast, the lesions' compartments over it, a per-case gain, a smooth bias field and Rician noise; zero
    outside the brain."""
    import torch

    shape, idx = brain.shape, brain.idx
    tpl_wm = _anatomy()[3]
    gain = rng.uniform(0.7, 1.3)
    bias_ctrl = rng.normal(0.0, 0.12, (4, 4, 4, 4)).astype(np.float32)
    # 4 control points a side: very smooth; exp taken on the coarse grid (the same values read at each voxel)
    coarse_bias, coarse_shape = coarse_field(bias_ctrl, shape, 4)
    bias = np.ascontiguousarray(field_at(bias_ctrl, shape, idx, brain.ijk, stride=4,
                                         coarse=(np.exp(coarse_bias), coarse_shape)).T)
    wm, gm, csf = brain.wm, brain.gm, brain.csf
    tpl_pred = wm + gm * CONTRAST["t1"][1] + csf * CONTRAST["t1"][2]
    texture = 0.5 * (brain.t1_tpl / tpl_wm - tpl_pred)
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
        images[mod] = brain.full(np.clip(np.rint(img), 1, np.iinfo(np.int16).max), np.int16)
    return images


def make_case(index: int, seed: int, shape=FULL_SHAPE, layout: str = "brats2021", confounders: bool = True,
              details: dict | None = None):
    """Generate one case: dict modality -> int16 (X, Y, Z), label uint8 (X, Y, Z), affine (4, 4).

    The work happens only at voxels that can hold brain (about a fifth of the grid) and in the tumour's box.
    ``confounders``: add what misleads real models (prep.synth.confounders), drawn from a stream of their own after
    everything else (off: the same bytes as a cohort made without them, labels the same either way). ``details``,
    when given, receives what was added where (``"confounders"``: prep.synth.confounders.Confounded).
    """
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    affine = brats_affine(shape)
    spacing = np.abs(np.diag(affine)[:3])
    warp = _Warp(rng, shape, affine)
    tp = tumour_params(seed, index)
    lesions = [tp] + ([second_lesion(seed, index, tp)] if tp.multifocal else [])
    centres_mni = _lesion_centres(seed, index, len(lesions))
    brain = _warped_brain(warp, shape, centres_mni, lesions)
    # each lesion's centre on the output grid: the brain voxel that samples nearest its MNI centre
    centres = [np.array(np.unravel_index(brain.idx[_nearest(brain.points, c)], shape)) for c in centres_mni]
    label, parts = _place_lesions(rng, seed, index, layout, spacing, brain, lesions, centres)
    images = _images(rng, brain, parts)
    if confounders:
        from .confounders import add_confounders

        added = add_confounders(seed, index, images, label, brain, spacing, _anatomy()[1])
        if details is not None:
            details["confounders"] = added
    return images, label, affine


def write_case(out: Path, index: int, seed: int, shape=FULL_SHAPE, layout: str = "brats2021",
               confounders: bool = True) -> str:
    """Generate case ``index`` and write it in ``layout`` under ``out``; returns the case id."""
    images, label, affine = make_case(index, seed, shape, layout, confounders)
    return write_layout_case(Path(out), layout, index, images, label, affine)


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
        write_msd_dataset(cfg.out, cfg.cases)
    args = [(cfg.out, i, cfg.seed, cfg.shape, cfg.layout, cfg.confounders) for i in range(cfg.cases)]
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
    (cfg.out / MANIFEST).write_text(json.dumps(manifest(cfg), indent=1) + "\n")
    return ids


MANIFEST = "synth.json"


def manifest(cfg: SynthConfig) -> dict:
    """What made a synthetic cohort, written beside its cases as ``synth.json``: the generator's settings
    (confounders on or off among them) and its version, the SHA-256 of the generator's source files (any change to
    the generator changes it)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {"generator": "prep.synth", "generator_sha256": digest.hexdigest(), "cases": cfg.cases, "seed": cfg.seed,
            "layout": cfg.layout, "shape": list(cfg.shape), "confounders": cfg.confounders}
