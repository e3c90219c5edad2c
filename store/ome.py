"""OME-Zarr (NGFF 0.5) metadata of a case group, so that viewers place its arrays in world coordinates."""

from __future__ import annotations


def ome_metadata(attrs: dict, has_label: bool) -> dict:
    """OME-Zarr (NGFF 0.5) multiscales of a case group, so viewers (napari, neuroglancer) place its arrays in
    RAS millimetres: one level each, ``image`` on axes c, x, y, z and ``label`` on x, y, z, scale = the stored
    spacing, translation = the stored grid's origin (its affine is axis-aligned RAS: world = origin + index *
    spacing)."""
    spacing = [float(v) for v in attrs["spacing_mm"]]
    origin = [float(row[3]) for row in attrs["stored_affine"][:3]]
    space = [{"name": n, "type": "space", "unit": "millimeter"} for n in "xyz"]

    def level(path: str, axes: list, scale: list, translation: list) -> dict:
        return {"name": path, "axes": axes, "datasets": [{"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]}]}

    multiscales = [level("image", [{"name": "c", "type": "channel"}, *space], [1.0, *spacing], [0.0, *origin])]
    if has_label:
        multiscales.append(level("label", space, spacing, origin))
    return {"version": "0.5", "multiscales": multiscales}
