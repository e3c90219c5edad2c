"""What this bundle's ``configs/inference.json`` needs beyond MONAI's own components: the cases of an input folder,
the regions' probabilities (TC, WT, ET[, RC]) as one BraTS label map with the model's postprocessing, and the
output file names (``<case-id>.nii.gz``).

It stands alone (numpy, nibabel, scipy, torch, MONAI): the bundle runs where the project that exported it is not
installed. ``model-card.json`` in ``models/`` describes every step.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np

# each modality's file name endings: BraTS 2021 (<id>_t1.nii.gz) and BraTS 2023+ (<id>-t1n.nii.gz)
ENDINGS = {"t1": ("_t1", "-t1n"), "t1ce": ("_t1ce", "-t1c"), "t2": ("_t2", "-t2w"), "flair": ("_flair", "-t2f")}
EXTENSIONS = (".nii.gz", ".nii")
# label values by meaning in each BraTS numbering
CONVENTIONS = {
    "brats2021": {"necrosis": 1, "edema": 2, "enhancing": 4},
    "brats2023": {"necrosis": 1, "edema": 2, "enhancing": 3},
    "brats2024": {"necrosis": 1, "edema": 2, "enhancing": 3, "cavity": 4},
}
ORDER = ("WT", "TC", "ET", "RC")  # postprocessing, outer regions first
REMOVES = {"WT": ("WT", "TC", "ET"), "TC": ("TC", "ET"), "ET": ("ET",), "RC": ("RC",)}

PROBLEMS: list[str] = []  # one line per case that could not be read, reported again at the end


def _split(name: str):
    """A file name -> (case id, modality) where it names one of ENDINGS, else None."""
    for ext in EXTENSIONS:
        if name.endswith(ext):
            stem = name[: -len(ext)]
            for modality, ends in ENDINGS.items():
                for end in ends:
                    if stem.endswith(end) and len(stem) > len(end):
                        return stem[: -len(end)], modality
    return None


def _problem(line: str) -> None:
    PROBLEMS.append(line)
    print(line, file=sys.stderr, flush=True)


def _checked(case_id: str, files: dict, modalities) -> list[str] | None:
    """The case's files in ``modalities`` order, or None (the reason printed) where one is missing, is not 3D,
    or lies on another grid than the first."""
    import nibabel as nib

    missing = [m for m in modalities if m not in files]
    if missing:
        _problem(f"case {case_id}: no {', '.join(missing)} image (" + ", ".join(
            f"{case_id}{ENDINGS[m][0]}.nii.gz or {case_id}{ENDINGS[m][1]}.nii.gz" for m in missing) + ")")
        return None
    paths = [str(files[m]) for m in modalities]
    headers = []
    for p in paths:  # every voxel decoded now, before any inference: a truncated file is found here, not mid-run
        try:
            h = nib.load(p)
            np.asanyarray(h.dataobj)
        except Exception as e:  # noqa: BLE001 (a damaged file: its reason, in one line)
            _problem(f"case {case_id}: {Path(p).name} cannot be read ({type(e).__name__}: {e})")
            return None
        headers.append(h)
    for m, h in zip(modalities, headers):
        if len(h.shape) != 3:
            _problem(f"case {case_id}: {Path(files[m]).name} is {len(h.shape)}D {tuple(h.shape)}; one 3D image per "
                     f"modality is needed")
            return None
    first = headers[0]
    for m, h in zip(modalities[1:], headers[1:]):
        if h.shape != first.shape or not np.allclose(h.affine, first.affine, atol=1e-3):
            _problem(f"case {case_id}: {modalities[0]} and {m} lie on different grids ({first.shape} vs {h.shape}, "
                     f"or their affines differ); every modality must share one grid")
            return None
    return paths


def _stop(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(1)


def _check_output(root: Path, output_dir: str) -> Path:
    """The output folder, before any case is read: outside the input folder (through links), created, and
    writable (a file written and removed); else one line and status 1."""
    out = Path(output_dir)
    resolved, src = out.resolve(), root.resolve()
    if resolved == src or src in resolved.parents:
        _stop(f"output {output_dir} lies inside the input {root}: choose a folder outside it")
    probe = out / f".write-test-{uuid.uuid4().hex}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        _stop(f"output {output_dir}: cannot be written ({e.strerror or type(e).__name__})")
    return out


def cases(dataset_dir: str, modalities, output_dir: str | None = None, overwrite: bool = False) -> list[dict]:
    """Every case under ``dataset_dir``: one folder per case, or the files side by side (``<id>-t1n.nii.gz``, ...,
    or ``<id>_t1.nii.gz``, ...). Each case's images are read in full and checked before any inference: a case that
    cannot be predicted is one line on stderr and is left out; the others are predicted (``finish`` then ends the
    run with status 1). A case whose ``<id>.nii.gz`` is already in ``output_dir`` is kept as it is and named,
    unless ``overwrite``. Nothing to predict: one line, status 1. So is an output folder inside the input or one
    that cannot be written, found before any case is read."""
    root = Path(dataset_dir)
    if not root.is_dir():
        _stop(f"{dataset_dir}: no such folder")
    out = _check_output(root, output_dir) if output_dir is not None else None
    found: dict[str, dict] = {}
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for f in sorted(folder.iterdir()):
            named = _split(f.name) if f.is_file() else None
            if named is not None:
                found.setdefault(named[0], {})[named[1]] = f
    items, kept = [], []
    for case_id in sorted(found):
        if out is not None and not overwrite and (out / f"{case_id}.nii.gz").exists():
            kept.append(f"{case_id}.nii.gz")
            continue
        paths = _checked(case_id, found[case_id], list(modalities))
        if paths is not None:
            items.append({"image": paths, "case_id": case_id})
    if kept:
        print(f"kept {len(kept)} file(s) already in {output_dir}, not replaced (overwrite replaces them): "
              f"{', '.join(kept)}", file=sys.stderr, flush=True)
    if not items and not kept:
        _stop(f"{dataset_dir}: nothing to predict (no case with every one of {', '.join(modalities)}"
              f"{'; ' + str(len(PROBLEMS)) + ' case(s) unreadable' if PROBLEMS else ''})")
    if not items:  # every case already written (or unreadable): nothing left for the model
        finish()
        raise SystemExit(0)
    return items


def output_name(metadict: dict, saver) -> dict:
    """SaveImaged's file name: ``<case-id>`` (from the first modality's file name), as BraTS submissions are named."""
    source = metadict.get("filename_or_obj", "case")
    source = source[0] if isinstance(source, (list, tuple)) else source
    named = _split(Path(str(source)).name)
    return {"subject": named[0] if named else Path(str(source)).name.split(".")[0], "idx": None}


def _label(regions: dict, values: dict) -> np.ndarray:
    """Nested as BraTS defines them: WT oedema, then TC necrosis, then ET enhancing (ET inside TC inside WT);
    RC, where the model has it, the cavity only outside the tumour."""
    out = np.zeros(regions["WT"].shape, np.uint8)
    if "RC" in regions:
        out[regions["RC"]] = values["cavity"]
    out[regions["WT"]] = values["edema"]
    out[regions["TC"]] = values["necrosis"]
    out[regions["ET"]] = values["enhancing"]
    return out


def _masks(label: np.ndarray, values: dict, names) -> dict:
    table = {"WT": (values["necrosis"], values["edema"], values["enhancing"]),
             "TC": (values["necrosis"], values["enhancing"]), "ET": (values["enhancing"],),
             "RC": (values.get("cavity", -1),)}
    return {n: np.isin(label, table[n]) for n in names}


def to_labels(regions: np.ndarray, names, values: dict, rules: dict | None, voxel_mm3: float) -> np.ndarray:
    """Thresholded regions (R, X, Y, Z) -> the label map (X, Y, Z) in ``values``' numbering, after the rules: per
    region, outer first, the 26-connected components under ``min_component_mm3`` removed from it and the regions
    inside it (never the region's largest); then ET under ``et_relabel_below_mm3`` in total made necrosis."""
    label = _label({n: np.asarray(r, bool) for n, r in zip(names, regions)}, values)
    rules = rules or {}
    minimum, relabel = rules.get("min_component_mm3") or {}, float(rules.get("et_relabel_below_mm3") or 0)
    if not any(minimum.values()) and not relabel:
        return label
    from scipy.ndimage import label as components

    r = _masks(label, values, names)
    for region in ORDER:
        k = float(minimum.get(region, 0) or 0)
        if not k or region not in r:
            continue
        parts, n = components(r[region], np.ones((3, 3, 3), bool))
        if not n:
            continue
        sizes = np.bincount(parts.ravel())
        small = sizes * voxel_mm3 < k
        small[0] = False
        small[1 + int(np.argmax(sizes[1:]))] = False
        gone = small[parts]
        for inner in REMOVES[region]:
            if inner in r:
                r[inner] &= ~gone
    if relabel and "ET" in r and 0 < r["ET"].sum() * voxel_mm3 < relabel:
        r["ET"][:] = False
    return _label(r, values)


class BraTSLabelsd:
    """The postprocessing's last step before saving: ``data[key]``, thresholded regions (R, X, Y, Z) on the source
    grid, becomes the label map (1, X, Y, Z, uint8) in the ``labels`` numbering, the model's rules applied."""

    def __init__(self, keys: str, regions, labels: str, rules: dict | None = None):
        if labels not in CONVENTIONS:
            raise ValueError(f"labels {labels!r}: one of {', '.join(CONVENTIONS)}")
        if "RC" in regions and "cavity" not in CONVENTIONS[labels]:
            raise ValueError(f"the model predicts the resection cavity (RC); {labels} labels have none: use brats2024")
        self.key, self.regions, self.values, self.rules = keys, list(regions), CONVENTIONS[labels], rules

    def __call__(self, data: dict) -> dict:
        import torch
        from monai.data import MetaTensor

        d = dict(data)
        pred = d[self.key]
        affine = np.asarray(pred.affine, np.float64) if hasattr(pred, "affine") else np.eye(4)
        voxel = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
        regions = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred) > 0
        label = torch.from_numpy(to_labels(regions, self.regions, self.values, self.rules, voxel))[None]
        d[self.key] = MetaTensor(label, meta=dict(pred.meta)) if hasattr(pred, "meta") else label
        return d


def finish() -> None:
    """End the run with status 1 where a case could not be predicted (each was named when found)."""
    if PROBLEMS:
        print(f"{len(PROBLEMS)} case(s) not predicted: " + "; ".join(PROBLEMS), file=sys.stderr)
        raise SystemExit(1)
