"""What misleads real BraTS models, added to a synthetic case after its images are made: enhancing vessels,
non-tumour FLAIR/T2 hyperintensities, thick-slice acquisition and skull-strip residue. None is ever labelled and
none touches a labelled voxel: the labels stay exactly those of the clean case.

Each confounder is drawn per case from a generator of its own, seeded by (seed, case index, 7), after everything
else, so the clean case (``--no-confounders``) is byte for byte what it was, and the same seed gives the same bytes
whatever the number of workers. Probabilities and strengths (intensities relative to the case's white matter in
each modality, which is 1), in brackets the probability per case:

- cortical vessels (0.9): 3-8 branching trees of tubes (radius 0.6-1.2 mm; trunks of 30-90 mm, branches of
  10-30 mm, 1.2 m at most) along the cortex and in its sulci; T1ce 1.7-2.3, T1 x1.0-1.1 of the tissue there;
- dural sinuses (0.8): the superior sagittal sinus along the top and back of the midline and the transverse
  sinuses from its end (radius 2-3.5 mm, just inside the brain mask); T1ce 1.8-2.5;
- choroid plexus (0.8): a glomus (radius 3-5 mm) in each lateral ventricle's atrium; T1ce 1.6-2.2, T1 0.5;
- periventricular caps (0.7): white matter within 2-5 mm of the ventricles' frontal and occipital horns; T2
  1.7-2.1, FLAIR 1.5-1.8, T1 x0.95;
- white-matter foci (0.8): 1-5 blobs (radius 1.5-4 mm) in deep white matter, 8-20 in a quarter of these cases;
  T2 1.7-2.2, FLAIR 1.5-1.9, T1 x0.93;
- thick slices (0.35): one modality (two in a third of these cases) acquired in slabs of 3-6 mm along one axis
  and resampled back linearly (skipped where the grid is as coarse as the slab);
- skull-strip residue (0.3): a rim of 1-2 mm just outside the brain mask over 10-40% of its surface; T1 1.3,
  T1ce 1.6, T2 0.8, FLAIR 1.1.

Vessels, choroid plexus and hyperintensities keep 2 mm from any labelled voxel; residue lies outside the brain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODS = ("t1", "t1ce", "t2", "flair")
# probability per case of each confounder (module docstring)
PROBABILITY = {"vessels": 0.9, "sinuses": 0.8, "choroid": 0.8, "caps": 0.7, "foci": 0.8, "thick": 0.35,
               "residue": 0.3}
MARGIN_MM = 2.0  # distance kept from every labelled voxel
NOISE = 0.03  # the noise of added structures, relative to white matter (as the case's own)
# MNI152 world coordinates (mm) of the lateral ventricles' atria (choroid plexus glomus), frontal and occipital horns
ATRIA_MNI = ((-27.0, -40.0, 14.0), (27.0, -40.0, 14.0))
HORNS_MNI = ((-14.0, 14.0, 8.0), (14.0, 14.0, 8.0), (-24.0, -62.0, 6.0), (24.0, -62.0, 6.0))


@dataclass
class Confounded:
    """What was added to a case: per confounder, the flat grid indices it changed (or, for thick slices, the
    modalities, axis and thickness); empty where the case drew none."""

    masks: dict = field(default_factory=dict)  # name -> flat indices (int64)
    thick: list = field(default_factory=list)  # [(modality, axis, mm)]


def _wm_levels(images: dict, brain) -> dict:
    """Each modality's white-matter intensity in this case (median over voxels of nearly pure white matter)."""
    pure = brain.idx[brain.wm > 0.9]
    return {m: float(np.median(images[m].ravel()[pure])) if pure.size else 1.0 for m in MODS}


def _grown(mask: np.ndarray, steps) -> np.ndarray:
    """``mask`` (bool) grown by a box of ``steps[a]`` voxels each side along each axis a: one maximum filter per
    axis, far cheaper than a 3D structuring element."""
    from scipy.ndimage import maximum_filter1d

    m = mask.view(np.uint8)
    for axis, k in enumerate(steps):
        m = maximum_filter1d(m, 2 * k + 1, axis=axis)
    return m > 0


def _near_label(label: np.ndarray, brain, spacing) -> np.ndarray:
    """The grid voxels within MARGIN_MM of a labelled voxel (X, Y, Z), the labels included (a box, per axis); the
    labels lie in the brain, so they are looked for among its voxels."""
    near = np.zeros(label.shape, bool)
    tumour = label.ravel()[brain.idx] > 0
    if not tumour.any():
        return near
    where = np.stack([a[tumour] for a in brain.ijk], -1)
    steps = [max(1, int(np.ceil(MARGIN_MM / s))) for s in spacing]
    lo = np.maximum(where.min(0) - steps, 0)
    hi = np.minimum(where.max(0) + np.array(steps) + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    near[box] = _grown(label[box] > 0, steps)
    return near


def _stamp(points_mm: np.ndarray, radii_mm: np.ndarray, spacing, shape) -> tuple[np.ndarray, np.ndarray]:
    """Balls of ``radii_mm`` at ``points_mm`` (N, 3, grid mm) as (flat indices, occupancy 0-1), soft over the last
    half voxel; overlapping balls take the larger occupancy."""
    sp = np.asarray(spacing, float)
    flat_all, occ_all = [], []
    for r in np.unique(np.round(radii_mm, 1)):
        sel = np.round(radii_mm, 1) == r
        reach = np.ceil((r + 0.5 * sp) / sp).astype(int)
        off = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij"), -1).reshape(-1, 3)
        centre_vox = points_mm[sel] / sp
        base = np.rint(centre_vox).astype(int)
        vox = (base[:, None, :] + off[None]).reshape(-1, 3)
        d = np.linalg.norm((vox - np.repeat(centre_vox, len(off), 0)) * sp, axis=1)
        occ = np.clip((r + 0.5 * sp.min() - d) / sp.min(), 0.0, 1.0)
        inside = (occ > 0) & np.all((vox >= 0) & (vox < np.array(shape)), axis=1)
        flat_all.append(np.ravel_multi_index(tuple(vox[inside].T), shape))
        occ_all.append(occ[inside])
    if not flat_all:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    flat, occ = np.concatenate(flat_all), np.concatenate(occ_all)
    order = np.lexsort((-occ, flat))
    flat, occ = flat[order], occ[order]
    first = np.r_[True, flat[1:] != flat[:-1]]
    return flat[first], occ[first].astype(np.float32)


def _paint(images, levels, rng, flat, occ, targets: dict, factors: dict | None = None) -> None:
    """Blend the voxels ``flat`` (occupancy ``occ``) towards ``targets`` (modality -> intensity relative to white
    matter), or scale them by ``factors`` (modality -> multiplier), with noise like the case's own."""
    for m in MODS:
        img = images[m].reshape(-1)
        v = img[flat].astype(np.float32)
        if m in targets:
            goal = targets[m] * levels[m] + rng.normal(0.0, NOISE * levels[m], flat.size)
            v = v * (1 - occ) + goal * occ
        elif factors and m in factors:
            v = v * (1 + occ * (factors[m] - 1))
        else:
            continue
        img[flat] = np.clip(np.rint(v), 1, np.iinfo(np.int16).max).astype(np.int16)


def _walk_trees(rng, ok: np.ndarray, spacing, count: int) -> np.ndarray:
    """Centre points (grid mm) of ``count`` branching random walks through the voxels ``ok`` (a boolean grid):
    1 mm steps with momentum, trunks of 30-90 mm, a branch of 10-30 mm every 25 mm on average, 1200 mm at most."""
    sp = np.asarray(spacing, float)
    shape = np.array(ok.shape)
    starts = np.flatnonzero(ok.ravel())
    if starts.size == 0:
        return np.zeros((0, 3))
    points = []
    stack = [(np.array(np.unravel_index(starts[rng.integers(starts.size)], ok.shape)) * sp,
              rng.normal(size=3), rng.uniform(30, 90)) for _ in range(count)]
    while stack and len(points) < 1200:
        p, direction, length = stack.pop()
        direction = direction / (np.linalg.norm(direction) + 1e-9)
        for _ in range(int(length)):
            nxt = None
            for attempt in range(12):  # wider turns after each miss
                d = direction + rng.normal(0.0, 0.3 + 0.1 * attempt, 3)
                d /= np.linalg.norm(d) + 1e-9
                q = p + d
                v = np.rint(q / sp).astype(int)
                if np.all((v >= 0) & (v < shape)) and ok[tuple(v)]:
                    nxt, direction = q, d
                    break
            if nxt is None:
                break
            p = nxt
            points.append(p)
            if rng.random() < 1 / 25 and len(stack) < 64:
                stack.append((p.copy(), direction + rng.normal(0.0, 1.0, 3), rng.uniform(10, 30)))
    return np.array(points).reshape(-1, 3)


class _Positions:
    """The brain voxels' positions on the grid in mm, made only for the voxels asked for: ``grid[sel]`` (len(sel),
    3) float32, ``grid.mean(0)`` (3,)."""

    def __init__(self, brain, spacing):
        self.ijk, self.sp = brain.ijk, np.asarray(spacing, np.float32)

    def __getitem__(self, sel) -> np.ndarray:
        return np.stack([a[sel] for a in self.ijk], -1).astype(np.float32) * self.sp

    def mean(self, axis: int = 0) -> np.ndarray:
        return np.array([a.mean() for a in self.ijk], np.float32) * self.sp


def _vessels(rng, brain, ok_voxel, spacing):
    """Cortical vessel trees along the cortex and in its sulci (grey matter and CSF beside it), as (points mm,
    radii mm)."""
    ok = np.zeros(brain.shape, bool)
    sel = ok_voxel & (brain.gm + brain.csf > 0.6) & (brain.gm > 0.05)
    ok.ravel()[brain.idx[sel]] = True
    points = _walk_trees(rng, ok, spacing, int(rng.integers(3, 9)))
    return points, np.full(len(points), rng.uniform(0.6, 1.2))


def _edge_points(grid_mm, angle, radius, lo, hi, step=3.0):
    """Per angle bin in [lo, hi) degrees, the grid point of largest radius: the brain's edge in that direction."""
    out = []
    for a in np.arange(lo, hi, step):
        sel = np.flatnonzero((angle >= a) & (angle < a + step))
        if sel.size:
            out.append(grid_mm[sel[np.argmax(radius[sel])]])
    return np.array(out).reshape(-1, 3)


def _sinuses(rng, grid, mni, spacing):
    """The superior sagittal sinus (midline, from the front of the top over the back) and the transverse sinuses
    (from its end, laterally along the back), just inside the brain's edge: (points mm, radii mm)."""
    centre = grid.mean(0)
    cy, cz = -18.0, 18.0
    half = max(1.5, float(max(spacing)))
    mid = np.flatnonzero(np.abs(mni[:, 0]) < half)
    my, mz = mni[mid, 1], mni[mid, 2]
    theta = np.degrees(np.arctan2(mz - cz, my - cy)) % 360
    edge = _edge_points(grid[mid], theta, np.hypot(my - cy, mz - cz), 50.0, 200.0)
    if len(edge) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    back_z = mz[np.argmax(np.where(theta < 200.0, theta, -1))]
    level = np.flatnonzero(np.abs(mni[:, 2] - back_z) < half)
    lx, ly = mni[level, 0], mni[level, 1]
    phi = np.degrees(np.arctan2(ly - cy, lx)) % 360  # straight back: 270
    lateral = [_edge_points(grid[level], phi, np.hypot(lx, ly - cy), lo, lo + 60.0) for lo in (195.0, 285.0)]
    edge = np.concatenate([edge, *lateral])
    r = rng.uniform(2.0, 3.5)
    inward = centre - edge
    inward /= np.linalg.norm(inward, axis=1, keepdims=True) + 1e-9
    points = _densify(edge + inward * (r + 0.5), float(min(spacing)))
    return points, np.full(len(points), r)


def _densify(points: np.ndarray, step: float) -> np.ndarray:
    """A polyline's points with others between them every ``step`` mm (the edge points lie a bin apart)."""
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:]):
        n = int(np.ceil(np.linalg.norm(b - a) / step))
        if 0 < n < 40:  # consecutive points of one curve (a jump is the start of the next)
            out.append(a + (b - a) * (np.arange(1, n + 1) / n)[:, None])
        else:
            out.append(b[None])
    return np.concatenate(out) if len(points) else points


def _near(mni, targets, within: float) -> np.ndarray:
    """Per voxel: whether its MNI position (N, 3) is within ``within`` mm of any of ``targets``."""
    out = np.zeros(len(mni), bool)
    for t in targets:
        t = np.asarray(t, np.float32)
        band = np.flatnonzero(np.abs(mni[:, 1] - t[1]) < within)  # a slab first: a few percent of the voxels
        d2 = ((mni[band] - t) ** 2).sum(1)
        out[band[d2 < within * within]] = True
    return out


def _choroid(rng, brain, grid, mni, ok_voxel):
    """A glomus in each lateral ventricle's atrium: (points, radii) of one ball each, in ventricle CSF."""
    points = []
    for atrium in ATRIA_MNI:
        sel = np.flatnonzero((brain.csf > 0.7) & ok_voxel & _near(mni, [atrium], 14.0))
        if sel.size:
            points.append(grid[sel[np.argmin(np.linalg.norm(mni[sel] - np.array(atrium), axis=1))]])
    points = np.array(points).reshape(-1, 3)
    return points, rng.uniform(3.0, 5.0, len(points))


def _caps(rng, brain, grid, mni, ok_voxel):
    """White matter within 3-6 mm of the ventricles' horns: (brain positions, occupancy)."""
    from scipy.spatial import cKDTree

    region = _near(mni, HORNS_MNI, 12.0)
    horn = np.flatnonzero(region & (brain.csf > 0.7))
    wm = np.flatnonzero(region & (brain.wm > 0.4) & ok_voxel)
    if horn.size == 0 or wm.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    reach = rng.uniform(2.0, 5.0)
    d, _ = cKDTree(grid[horn]).query(grid[wm], distance_upper_bound=reach + 1.0)
    occ = np.clip(1.0 - (d - reach), 0.0, 1.0)  # full within reach, fading over the next millimetre
    keep = occ > 0
    return wm[keep], occ[keep].astype(np.float32)


def _foci(rng, brain, grid, ok_voxel):
    """Scattered white-matter foci: few in most cases (1-5), many in some (8-20): (points, radii)."""
    deep = np.flatnonzero((brain.wm > 0.85) & ok_voxel)
    if deep.size == 0:
        return np.zeros((0, 3)), np.zeros(0)
    n = int(rng.integers(8, 21) if rng.random() < 0.25 else rng.integers(1, 6))
    return grid[deep[rng.integers(deep.size, size=n)]], rng.uniform(1.5, 4.0, n)


def _thick(img: np.ndarray, axis: int, mm: float, spacing) -> np.ndarray:
    """``img`` as if acquired in slabs of ``mm`` along ``axis`` and resampled back linearly to its grid (the blur
    of a 2D acquisition); zero stays zero (outside the brain, as after skull stripping)."""

    others = [a for a in range(img.ndim) if a != axis]
    inside = img > 0
    if not inside.any():
        return img
    box = [slice(None)] * img.ndim
    for a in others:  # only the brain's extent across the slabs (zero stays zero): a third of the grid's work
        hit = np.flatnonzero(inside.any(axis=tuple(b for b in range(img.ndim) if b != a)))
        box[a] = slice(hit[0], hit[-1] + 1)
    out = img.copy()
    out[tuple(box)] = _slabs(img[tuple(box)], axis, mm / float(spacing[axis]))
    return out


def _slabs(img: np.ndarray, axis: int, n: float) -> np.ndarray:
    """``img`` averaged over slabs of ``n`` voxels along ``axis`` and interpolated back linearly; zero stays zero."""
    from scipy.ndimage import uniform_filter1d

    v = img.astype(np.float32)
    slabs_at = np.arange((n - 1) / 2, img.shape[axis], n)
    slab = np.take(uniform_filter1d(v, max(1, int(round(n))), axis=axis, mode="nearest"),
                   np.clip(np.rint(slabs_at).astype(int), 0, img.shape[axis] - 1), axis=axis)
    c = np.clip((np.arange(img.shape[axis]) - (n - 1) / 2) / n, 0, len(slabs_at) - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, len(slabs_at) - 1)
    w = (c - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(img.ndim)])
    out = np.take(slab, lo, axis=axis) * (1 - w) + np.take(slab, hi, axis=axis) * w
    return np.where(img > 0, np.clip(np.rint(out), 1, np.iinfo(np.int16).max), 0).astype(img.dtype)


def _residue(rng, brain, spacing, near: np.ndarray):
    """A rim of 1-2 mm just outside the brain mask over part of its surface, away from the voxels ``near`` a
    label: flat grid indices."""
    from scipy import ndimage

    lo = np.maximum(np.array([a.min() for a in brain.ijk]) - 4, 0)
    hi = np.minimum(np.array([a.max() for a in brain.ijk]) + 5, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    inside = np.zeros(brain.shape, bool)
    inside.ravel()[brain.idx] = True
    t = rng.uniform(1.0, 2.0)
    rim = _grown(inside[box], [max(1, int(round(t / s))) for s in spacing]) & ~inside[box]
    ctrl = rng.normal(size=(6, 6, 6))
    patch = ndimage.zoom(ctrl, [n / 6 for n in rim.shape], order=1)[tuple(slice(0, n) for n in rim.shape)]
    cover = rng.uniform(0.1, 0.4)
    rim &= (patch > np.quantile(patch, 1 - cover)) & ~near[box]
    where = np.argwhere(rim) + lo
    return np.ravel_multi_index(tuple(where.T), brain.shape)


def add_confounders(seed: int, index: int, images: dict, label: np.ndarray, brain, spacing, mni_affine) -> Confounded:
    """Add this case's confounders to ``images`` (modality -> int16 (X, Y, Z), changed in place) around ``label``
    (never changed, never touched); ``brain``: the case's brain voxels (prep.synth), ``mni_affine``: MNI152's
    voxel-to-world matrix. Returns what was added where."""
    rng = np.random.default_rng([seed, index, 7])
    draw = {name: rng.random() < p for name, p in PROBABILITY.items()}  # every draw made, whichever come true
    levels = _wm_levels(images, brain)
    mni = brain.points.astype(np.float32) @ mni_affine[:3, :3].T.astype(np.float32) + \
        mni_affine[:3, 3].astype(np.float32)
    grid = _Positions(brain, spacing)
    near = _near_label(label, brain, spacing)
    ok = ~near.ravel()[brain.idx]  # per brain voxel: far enough from the labels
    allowed = np.zeros(brain.shape, bool)
    allowed.ravel()[brain.idx[ok]] = True
    done = Confounded()

    def stamped(name, points, radii, targets, factors=None):
        flat, occ = _stamp(points, radii, spacing, brain.shape)
        keep = allowed.ravel()[flat]
        flat, occ = flat[keep], occ[keep]
        _paint(images, levels, rng, flat, occ, targets, factors)
        done.masks[name] = flat

    if draw["vessels"]:
        p, r = _vessels(rng, brain, ok, spacing)
        stamped("vessels", p, r, {"t1ce": rng.uniform(1.7, 2.3)}, {"t1": rng.uniform(1.0, 1.1)})
    if draw["sinuses"]:
        p, r = _sinuses(rng, grid, mni, spacing)
        stamped("sinuses", p, r, {"t1ce": rng.uniform(1.8, 2.5)})
    if draw["choroid"]:
        p, r = _choroid(rng, brain, grid, mni, ok)
        stamped("choroid", p, r, {"t1": 0.5, "t1ce": rng.uniform(1.6, 2.2)})
    if draw["caps"]:
        at, occ = _caps(rng, brain, grid, mni, ok)
        flat = brain.idx[at]
        _paint(images, levels, rng, flat, occ, {"t2": rng.uniform(1.7, 2.1), "flair": rng.uniform(1.5, 1.8)},
               {"t1": 0.95})
        done.masks["caps"] = flat
    if draw["foci"]:
        p, r = _foci(rng, brain, grid, ok)
        stamped("foci", p, r, {"t2": rng.uniform(1.7, 2.2), "flair": rng.uniform(1.5, 1.9)}, {"t1": 0.93})
    if draw["residue"]:
        flat = _residue(rng, brain, spacing, near)
        _paint(images, levels, rng, flat, np.ones(flat.size, np.float32),
               {"t1": 1.3, "t1ce": 1.6, "t2": 0.8, "flair": 1.1})
        done.masks["residue"] = flat
    if draw["thick"]:
        chosen = rng.choice(MODS, size=2 if rng.random() < 1 / 3 else 1, replace=False)
        for m in chosen:
            axis, mm = int(rng.integers(3)), float(rng.uniform(3.0, 6.0))
            if mm / float(spacing[axis]) >= 1.5:  # coarser grids than the slab: nothing to simulate
                images[m] = _thick(images[m], axis, mm, spacing)
                done.thick.append((str(m), axis, mm))
    return done
