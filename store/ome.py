"""OME-Zarr (NGFF 0.5) metadata of a case group, so that viewers place its arrays in world coordinates and show
its label map as a label layer (``labels/seg``) over the image."""

from __future__ import annotations

from .conventions import LABEL_CONVENTIONS

NGFF = "0.5"
# colours of the BraTS classes in the label layer, RGBA 0-255 (those of the project's pictures: necrosis red,
# oedema green, enhancing yellow, resection cavity blue)
CLASS_RGBA = {"necrosis": [214, 39, 40, 255], "edema": [44, 160, 44, 255], "enhancing": [255, 221, 0, 255],
              "cavity": [31, 119, 180, 255]}
MEANING_NAMES = {"necrosis": "necrotic / non-enhancing tumour core", "edema": "peritumoral oedema / SNFH",
                 "enhancing": "enhancing tumour", "cavity": "resection cavity"}


def _space(attrs: dict) -> tuple[list, list, list]:
    spacing = [float(v) for v in attrs["spacing_mm"]]
    origin = [float(row[3]) for row in attrs["stored_affine"][:3]]
    return spacing, origin, [{"name": n, "type": "space", "unit": "millimeter"} for n in "xyz"]


def _level(name: str, path: str, axes: list, scale: list, translation: list) -> dict:
    return {"name": name, "axes": axes, "datasets": [{"path": path, "coordinateTransformations": [
        {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]}]}


def ome_metadata(attrs: dict, label_beside: bool) -> dict:
    """OME-Zarr (NGFF 0.5) multiscales of a case group, so viewers (napari, neuroglancer) place its arrays in
    RAS millimetres: one level, ``image`` on axes c, x, y, z, scale = the stored spacing, translation = the stored
    grid's origin (its affine is axis-aligned RAS: world = origin + index * spacing). ``label_beside`` (format 1's
    ``label`` array beside the image): the label map as a second multiscales entry on x, y, z; otherwise the image
    alone (format 2 lists its label in ``labels``, ``label_layer``)."""
    spacing, origin, space = _space(attrs)
    multiscales = [_level("image", "image", [{"name": "c", "type": "channel"}, *space], [1.0, *spacing],
                          [0.0, *origin])]
    if label_beside:
        multiscales.append(_level("label", "label", space, spacing, origin))
    return {"version": NGFF, "multiscales": multiscales}


def label_layer(attrs: dict, name: str) -> dict[str, dict]:
    """The OME attributes of the groups of a format-2 label layer: ``labels`` (naming the layer) and
    ``labels/<name>`` (its multiscales on x, y, z with the image's scale and translation, its level at "0"; the
    ``image-label`` colours and properties of the case's label convention; its source image two levels up)."""
    spacing, origin, space = _space(attrs)
    conv = LABEL_CONVENTIONS[attrs["label_convention"]]
    classes = [(int(v), n, next(m for m in CLASS_RGBA if conv.get(m) == int(v))) for v, n in conv["labels"].items()]
    image_label = {
        "version": NGFF,
        "colors": [{"label-value": v, "rgba": CLASS_RGBA[m]} for v, _, m in classes],
        "properties": [{"label-value": v, "class": n, "meaning": MEANING_NAMES[m],
                        "convention": attrs["label_convention"]} for v, n, m in classes],
        "source": {"image": "../../"},
    }
    return {"labels": {"version": NGFF, "labels": [name]},
            f"labels/{name}": {"version": NGFF, "multiscales": [_level(name, "0", space, spacing, origin)],
                               "image-label": image_label}}
