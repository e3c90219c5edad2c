"""Preprocessing of one case, shared by build-store and by ``evaluate predict``.

Data contract of the output: image float32 (C, X, Y, Z), channels in ``MODALITIES`` order (or the subset
asked for), axes in RAS, 1 x 1 x 1 mm voxels (or the spacing asked for), z-scored per channel over its
nonzero voxels (zeros stay zero), cropped to the bounding box of voxels nonzero in any modality plus
``margin`` voxels. Label uint8 (X, Y, Z) in the source label convention, resampled nearest-neighbour.
``geometry`` holds what maps the stored grid back onto the source grid (``to_source_grid``).

Orientation and resampling are MONAI's own (Orientation, Spacing, SpatialResample). Where the source is
axis-aligned and already at the target spacing (real BraTS files at 1 mm), orientation is an exact flip and
Spacing a no-op, so the crop is done first, on the source grid, and the transforms run on the smaller array;
the result is the same. Integer sources on that path are oriented with nibabel's axis permutation and flips
(the same values and affine as MONAI's Orientation, which a test checks), so building a 1 mm cohort imports
neither torch nor MONAI.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.conventions import (
    MODALITIES,
    REGIONS,
    ConventionError,
    convention_for_labels,
    label_values,
    region_masks,
    relabel,
)
from store.encoding import EncodedImage, encode_image, encode_integer_source
from store.records import SOURCE_GRID

from .discover import CaseFiles

TARGET_SPACING = (1.0, 1.0, 1.0)
CROP_MARGIN = 2  # voxels
FOREGROUND_SAMPLES = 10_000  # foreground voxel coordinates kept per region, as nnU-Net does per class


class CaseError(ValueError):
    """A case that cannot be preprocessed; the message is one line naming the case and the file."""


@dataclass
class Preprocessed:
    case_id: str
    image: np.ndarray | None  # float32 (C, X, Y, Z), RAS, 1 mm, normalized, cropped (None when ``encoded``)
    label: np.ndarray | None  # uint8 (X, Y, Z), source convention
    modalities: tuple[str, ...]
    geometry: dict  # source_affine, source_shape, resampled_affine, resampled_shape, crop_box, stored_affine
    normalization: dict  # modality -> {"mean", "std"} of the nonzero source voxels (after resampling)
    integer_source: bool = True  # source intensities were integers: one unit is 1 / std in z units
    encoded: EncodedImage | None = None  # the image in the store's int16 encoding (``preprocess(encode=True)``)
    label_convention: str | None = None  # the label's, from its values (a 2023-named case with RC is brats2024)

    @property
    def source_unit(self) -> list[float] | None:
        """One source intensity unit in z units per channel, for integer sources (None otherwise)."""
        if not self.integer_source:
            return None
        return [1.0 / self.normalization[m]["std"] if self.normalization[m]["std"] else 0.0 for m in self.modalities]


def _load(case_id: str, path: Path, what: str, channel: int | None = None, n_channels: int | None = None,
          cache: dict | None = None):
    """Read one NIfTI fully (so that truncation shows here); returns (array, affine). ``channel``: the volume of
    a 4D file to take (MSD images hold every modality), which must have ``n_channels``; ``cache`` keeps a 4D
    file read once for its other channels."""
    import nibabel as nib

    try:
        if cache is not None and path in cache:
            data, affine = cache[path]
        else:
            img = nib.load(str(path))
            data, affine = np.asanyarray(img.dataobj), img.affine
            if cache is not None:
                cache[path] = (data, affine)
    except Exception as e:  # nibabel raises many kinds for truncated or corrupt files
        raise CaseError(f"case {case_id}: corrupt or unreadable file {path.name} ({type(e).__name__}: {e})") from e
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        raise CaseError(f"case {case_id}: {what} file {path.name} holds {data.dtype} voxels (an RGB or other "
                        f"non-scalar image); expected one intensity per voxel")
    if channel is not None:
        if data.ndim != 4 or data.shape[3] != n_channels:
            raise CaseError(f"case {case_id}: {path.name} has shape {data.shape}, dataset.json lists {n_channels} "
                            f"channels (X, Y, Z, {n_channels}): a file of another dataset, or a damaged one")
        data = data[..., channel]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"case {case_id}: {what} file {path.name} is {data.ndim}D {data.shape}, expected 3D")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise CaseError(f"case {case_id}: {what} file {path.name} has {bad} NaN/Inf voxels")
    return data, np.asarray(affine, dtype=np.float64)


def load_sources(case: CaseFiles, modalities=MODALITIES, with_label: bool = True):
    """Load and validate a case's files: images (one (X, Y, Z) array per modality, in its source dtype; not
    stacked, as the exact path copies only the cropped brain), label or None, source affine, and the label's
    convention (the case's, or the one superseding it where the values need it: BraTS 2024's label 4)."""
    arrays, affines, cache = [], [], {}
    for m in modalities:
        if m not in case.images:
            raise CaseError(f"case {case.case_id}: missing modality {m}")
        channel = case.channels[m] if case.channels else None
        a, aff = _load(case.case_id, case.images[m], m, channel, case.n_channels, cache)
        arrays.append(a)
        affines.append(aff)
    ref_shape, ref_aff = arrays[0].shape, affines[0]
    for m, a, aff in zip(modalities, arrays, affines):
        if a.shape != ref_shape:
            raise CaseError(f"case {case.case_id}: {case.images[m].name} has shape {a.shape}, "
                            f"{case.images[modalities[0]].name} has {ref_shape}")
        if not np.allclose(aff, ref_aff, atol=1e-3):
            raise CaseError(f"case {case.case_id}: {case.images[m].name} has another affine than "
                            f"{case.images[modalities[0]].name}")
    label = None
    if with_label:
        if case.seg is None:
            raise CaseError(f"case {case.case_id}: missing seg")
        label, laff = _load(case.case_id, case.seg, "seg")
        if label.shape != ref_shape or not np.allclose(laff, ref_aff, atol=1e-3):
            raise CaseError(f"case {case.case_id}: {case.seg.name} does not match the images' grid")
        if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
            raise CaseError(f"case {case.case_id}: {case.seg.name} holds non-integer labels")
        if case.source_labels:  # MSD's values to BraTS 2021's, by dataset.json's label names
            stray = sorted(_values(label) - {int(k) for k in case.source_labels})
            if stray:
                raise CaseError(f"case {case.case_id}: {case.seg.name} has labels {stray} that dataset.json does "
                                f"not name")
            label = relabel(label, case.source_labels)
        try:
            convention = convention_for_labels(case.label_convention, _values(label))
        except ConventionError as e:
            raise CaseError(f"case {case.case_id}: {case.seg.name} has {e}") from None
        label = label.astype(np.uint8)
        return arrays, label, ref_aff, convention
    return arrays, label, ref_aff, None


def _values(label: np.ndarray) -> set[int]:
    """Distinct values of a label map (bincount for small integer types: ten times faster than unique)."""
    if label.dtype.kind in "iu" and label.size:
        lo, hi = int(label.min()), int(label.max())
        if hi - lo < 32:  # label maps: a few values, one comparison pass each (no index array at all)
            return {v for v in range(lo, hi + 1) if (label == v).any()}
    if label.dtype.kind in "iu" and label.dtype.itemsize <= 2 and label.size:
        lo = int(label.min())
        return {int(v) + lo for v in np.flatnonzero(np.bincount((label.ravel() - lo).astype(np.intp)))}
    return set(np.unique(label).astype(int).tolist())


def _is_axis_aligned_at(affine: np.ndarray, spacing) -> bool:
    """True when every voxel axis lies along a world axis and its RAS spacing is already ``spacing``."""
    lin = np.abs(affine[:3, :3])
    if not np.allclose(lin.sum(0), lin.max(0), atol=1e-6):
        return False
    ras_axis = lin.argmax(0)  # world axis of each voxel axis
    return bool(sorted(ras_axis) == [0, 1, 2]
                and np.allclose(lin.max(0), np.asarray(spacing, float)[ras_axis], atol=1e-5))


def _bbox(mask: np.ndarray, margin: int) -> list[list[int]]:
    """[[start, stop], ...] per axis of the True voxels, widened by ``margin`` and clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        any_ax = np.any(mask, axis=tuple(i for i in range(mask.ndim) if i != ax))
        nz = np.flatnonzero(any_ax)
        box.append([max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[ax])])
    return box


def _ras_grid(affine: np.ndarray, shape) -> tuple[np.ndarray, list[int]]:
    """Affine and shape of an axis-aligned grid once reoriented to RAS (what MONAI's Orientation gives)."""
    import nibabel.orientations as nio

    tr = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    ras_aff = affine @ nio.inv_ornt_aff(tr, shape)
    ras_shape = [0, 0, 0]
    for src_ax, (dst_ax, _) in enumerate(tr):
        ras_shape[int(dst_ax)] = int(shape[src_ax])
    return ras_aff, ras_shape


def _metatensor(arr, affine):
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(affine, dtype=torch.float64),
                      meta={"space": "RAS"})


def _orient_resample(img, label, affine, spacing):
    """MONAI Orientation RAS then Spacing (bilinear image, nearest label): (image, label) MetaTensors."""
    from monai.transforms import Orientation, Spacing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notices about the labels argument
        orient = Orientation(axcodes="RAS")
        x = orient(_metatensor(img, affine))
        y = orient(_metatensor(label[None], affine)) if label is not None else None
        x = Spacing(pixdim=spacing, mode="bilinear", padding_mode=SOURCE_GRID["padding_mode"])(x)
        if y is not None:
            y = Spacing(pixdim=spacing, mode="nearest", padding_mode=SOURCE_GRID["padding_mode"])(y)
    return x, y


def normalize_nonzero(arr: np.ndarray, modalities) -> tuple[np.ndarray, dict]:
    """Z-score each channel of ``arr`` (C, X, Y, Z) over its nonzero voxels, zeros kept: MONAI's
    NormalizeIntensity(nonzero=True, channel_wise=True) formula (population std, std 0 -> 1), about ten times faster
    than MONAI's masked indexing on a full case; tests check it equals MONAI's."""
    out = np.empty_like(arr, dtype=np.float32)
    norm = {}
    for c, m in enumerate(modalities):
        a = np.ascontiguousarray(arr[c])
        zero = a == 0
        n = a.size - int(np.count_nonzero(zero))
        mean, std = 0.0, 1.0
        if n:  # population mean and std from float64 sums over the whole channel (zeros add nothing): no gather
            flat = a.reshape(-1)
            mean = float(flat.sum(dtype=np.float64)) / n
            var = float(np.einsum("i,i->", flat, flat, dtype=np.float64)) / n - mean * mean
            # where the spread is tiny next to the mean the difference cancels: the two-pass std (exactly 0 for
            # a constant channel, as MONAI gives)
            std = var ** 0.5 if var > 1e-6 * mean * mean else float(a[~zero].std(dtype=np.float64))
        norm[m] = {"mean": mean, "std": std}
        o = out[c]
        np.subtract(a, np.float32(mean), out=o)
        np.divide(o, np.float32(std or 1.0), out=o)
        np.copyto(o, 0.0, where=zero)
    return out, norm


def integer_nonzero_stats(a: np.ndarray) -> tuple[float, float] | None:
    """Mean and population std of the nonzero voxels of an integer array (any axes), from exact integer sums (the std
    of a constant channel is exactly 0, as MONAI gives); None where the int64 sum of squares could overflow."""
    n = int(np.count_nonzero(a))
    if not n:
        return 0.0, 1.0
    peak = max(-int(a.min()), int(a.max()))
    if peak * peak * a.size >= 2**63:  # int16 sources are far from it: 2**31 voxels of 2**15 squared
        return None
    s = int(a.sum(dtype=np.int64))
    flat = a.reshape(-1)
    ss = int(np.einsum("i,i->", flat, flat, dtype=np.int64))
    return s / n, max(n * ss - s * s, 0) ** 0.5 / n


def preprocess(case: CaseFiles, modalities=MODALITIES, with_label: bool = True, margin: int = CROP_MARGIN,
               spacing=TARGET_SPACING, encode: bool = False) -> Preprocessed:
    """Load, validate, orient to RAS, resample to ``spacing`` mm (default 1 mm), crop to the brain, z-score
    per channel over nonzero voxels.

    ``encode``: return the image in the store's int16 encoding (``encoded``; ``image`` is None). Where the
    sources are integers on an axis-aligned grid at the target spacing (BraTS files at 1 mm), no float image is
    made at all: the z-score of an integer source in source units is an integer shift per channel
    (``store.encoding.encode_integer_source``), done on the cropped, oriented integers."""
    arrays, label, src_aff, convention = load_sources(case, modalities, with_label)
    src_shape = arrays[0].shape
    integer = all(a.dtype.kind in "iu" for a in arrays)
    nonzero = arrays[0] != 0
    for a in arrays[1:]:
        nonzero |= a != 0
    if not nonzero.any():
        raise CaseError(f"case {case.case_id}: empty brain mask (no nonzero voxel in any modality)")
    spacing = tuple(float(v) for v in spacing)
    if _is_axis_aligned_at(src_aff, spacing):
        # Exact path: crop on the source grid, then orient (a flip/permutation) and Spacing (a no-op).
        box = _bbox(nonzero, margin)
        sl = tuple(slice(a, b) for a, b in box)
        pre_aff = src_aff.copy()
        pre_aff[:3, 3] = src_aff[:3, :3] @ np.array([b[0] for b in box]) + src_aff[:3, 3]
        lab = label[sl] if label is not None else None
        crops = [a[sl] for a in arrays]  # views: only the brain is ever copied
        if encode and integer:
            pre = _encode_integers(case, modalities, crops, lab, pre_aff, src_aff, src_shape, spacing)
            if pre is not None:
                pre.label_convention = convention
                return pre
        x, y = _orient_resample(np.stack(crops).astype(np.float32), lab, pre_aff, spacing)
        resampled_aff, resampled_shape, crop_box = _exact_grid(src_aff, src_shape, x.affine.numpy(), x.shape[1:])
    else:
        x, y = _orient_resample(np.stack(arrays).astype(np.float32), label, src_aff, spacing)
        import torch

        resampled_aff = x.affine.numpy()
        resampled_shape = list(x.shape[1:])
        crop_box = _bbox(np.asarray(torch.any(x != 0, dim=0)), margin)
        sl = (slice(None), *(slice(a, b) for a, b in crop_box))
        x = x[sl]
        y = y[sl] if y is not None else None
    arr = np.asarray(x.as_tensor() if hasattr(x, "as_tensor") else x, dtype=np.float32)
    image, norm = normalize_nonzero(arr, modalities)
    lab_arr = _label_array(y)
    pre = Preprocessed(case.case_id, image, lab_arr, tuple(modalities),
                       _geometry(src_aff, src_shape, resampled_aff, resampled_shape, crop_box, spacing), norm,
                       integer_source=integer, label_convention=convention)
    if encode:
        pre.encoded, pre.image = encode_image(image, pre.source_unit), None
    return pre


def _label_array(y) -> np.ndarray | None:
    if y is None:
        return None
    return np.ascontiguousarray(np.asarray(y.as_tensor() if hasattr(y, "as_tensor") else y)[0]
                                .round().astype(np.uint8))


def _exact_grid(src_aff, src_shape, crop_aff, crop_shape) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """On the exact path the full resampled grid is the source grid oriented to RAS; the oriented crop (affine
    ``crop_aff``, shape ``crop_shape``) lies in it at a whole-voxel offset: (resampled affine, resampled shape,
    crop box)."""
    resampled_aff, resampled_shape = _ras_grid(src_aff, src_shape)
    offset = np.rint(np.linalg.solve(resampled_aff, crop_aff)[:3, 3]).astype(int)
    return resampled_aff, resampled_shape, [[int(o), int(o) + int(n)] for o, n in zip(offset, crop_shape)]


def _geometry(src_aff, src_shape, resampled_aff, resampled_shape, crop_box, spacing) -> dict:
    stored_aff = resampled_aff.copy()
    stored_aff[:3, 3] = resampled_aff[:3, :3] @ np.array([b[0] for b in crop_box]) + resampled_aff[:3, 3]
    return {
        "source_affine": src_aff.tolist(),
        "source_shape": list(src_shape),
        "resampled_affine": resampled_aff.tolist(),
        "resampled_shape": list(resampled_shape),
        "crop_box": crop_box,
        "stored_affine": stored_aff.tolist(),
        "spacing_mm": list(spacing),
        "orientation": "RAS",
    }


def _encode_integers(case, modalities, crops, lab, pre_aff, src_aff, src_shape, spacing) -> Preprocessed | None:
    """The exact path for integer sources, straight to the store's encoding: each cropped integer channel
    oriented to RAS (axis permutation and flips; Spacing is a no-op on this grid), copied once into the stored
    (C, X, Y, Z) layout (NIfTI arrays are Fortran-ordered: this copy is the transpose), per-channel statistics
    from integer sums, an integer shift per channel. None where a channel does not fit the source-unit encoding
    or its exact sums (the float path takes it)."""
    import nibabel.orientations as nio

    # the orientation to RAS of an axis-aligned grid is a permutation and flips of the axes: exactly what MONAI's
    # Orientation computes, done as numpy views (no torch, no MONAI: a build worker on 1 mm sources starts in a
    # fraction of the time)
    to_ras = nio.ornt_transform(nio.io_orientation(pre_aff), nio.axcodes2ornt("RAS"))
    first = nio.apply_orientation(crops[0], to_ras)
    values = np.empty((len(crops), *first.shape), np.result_type(*crops))
    for c, crop in enumerate(crops):
        np.copyto(values[c], nio.apply_orientation(crop, to_ras))
    lab_ras = nio.apply_orientation(lab, to_ras)[None] if lab is not None else None
    crop_aff = pre_aff @ nio.inv_ornt_aff(to_ras, crops[0].shape)
    stats = [integer_nonzero_stats(values[c]) for c in range(len(modalities))]
    if None in stats:
        return None
    encoded = encode_integer_source(values, [m for m, _ in stats], [s for _, s in stats])
    if encoded is None:
        return None
    resampled_aff, resampled_shape, crop_box = _exact_grid(src_aff, src_shape, crop_aff, values.shape[1:])
    norm = {m: {"mean": mean, "std": std} for m, (mean, std) in zip(modalities, stats)}
    return Preprocessed(case.case_id, None, _label_array(lab_ras), tuple(modalities),
                        _geometry(src_aff, src_shape, resampled_aff, resampled_shape, crop_box, spacing), norm,
                        integer_source=True, encoded=encoded)


def to_source_grid(arr: np.ndarray, geometry: dict, mode: str = "nearest") -> np.ndarray:
    """Map an array on the stored grid ((X, Y, Z) or (C, X, Y, Z)) back onto the source grid.

    Uncrop into the resampled grid (zeros outside), then MONAI SpatialResample from the resampled RAS 1 mm
    grid onto the source affine and shape: inverse resampling and inverse orientation in one step, padded as
    MONAI's Spacing pads on the way in (border: a source voxel beyond the resampled grid's edge takes the edge's
    value), so that it gives what MONAI's Invertd gives when it inverts Spacing and Orientation one by one.
    """
    import torch
    from monai.transforms import SpatialResample

    squeeze = arr.ndim == 3
    a = arr[None] if squeeze else arr
    full = np.zeros((a.shape[0], *geometry["resampled_shape"]), dtype=np.float32)
    box = geometry["crop_box"]
    full[(slice(None), *(slice(b[0], b[1]) for b in box))] = a
    src_aff, res_aff = np.asarray(geometry["source_affine"]), np.asarray(geometry["resampled_affine"])
    if _is_axis_aligned_at(src_aff, np.abs(np.diag(res_aff)[:3])):
        # The resampled grid is the source grid reoriented (no resampling happened on the way in), so the
        # way back is the exact inverse permutation and flips: what SpatialResample would compute, 10x faster.
        ras_aff, _ = _ras_grid(src_aff, geometry["source_shape"])
        if np.allclose(ras_aff, res_aff, atol=1e-4):
            import nibabel.orientations as nio

            back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(src_aff))
            res = np.stack([nio.apply_orientation(c, back) for c in full])
            res = res.astype(arr.dtype) if mode == "nearest" else res
            return res[0] if squeeze else res
    img = _metatensor(full, res_aff)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = SpatialResample(mode=mode, padding_mode=SOURCE_GRID["padding_mode"])(
            img, dst_affine=torch.as_tensor(np.asarray(geometry["source_affine"]), dtype=torch.float64),
            spatial_size=tuple(geometry["source_shape"]),
        )
    res = np.asarray(out.as_tensor() if hasattr(out, "as_tensor") else out)
    if mode == "nearest":
        res = np.rint(res).astype(arr.dtype)
    return res[0] if squeeze else res


def label_statistics(label: np.ndarray, convention: str, rng: np.random.Generator,
                     samples: int = FOREGROUND_SAMPLES) -> tuple[dict, dict, np.ndarray]:
    """Voxel counts per label and per region, and up to ``samples`` foreground coordinates per region.

    Returns (label_counts, region_counts, coords) with coords int32 (N, 4): region index, x, y, z.
    """
    counts = np.bincount(label.ravel(), minlength=256)
    label_counts = {str(int(v)): int(counts[v]) for v in np.flatnonzero(counts)}
    for v in label_values(convention):
        label_counts.setdefault(str(v), 0)
    regions = region_masks(label, convention)
    region_counts = {}
    coords = []
    for r, name in enumerate(REGIONS):
        idx = np.flatnonzero(regions[r])
        region_counts[name] = int(idx.size)
        if idx.size > samples:
            idx = np.sort(rng.choice(idx, samples, replace=False))
        xyz = np.stack(np.unravel_index(idx, label.shape), axis=1)
        coords.append(np.concatenate([np.full((idx.size, 1), r), xyz], axis=1))
    return label_counts, region_counts, np.concatenate(coords).astype(np.int32)


__all__ = ["CaseError", "Preprocessed", "integer_nonzero_stats", "label_statistics", "preprocess",
           "to_source_grid"]
