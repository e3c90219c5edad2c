"""The on-disk format: its name, versions, array layout and codecs. See FORMAT.md for the written contract.

Each format version is a class with ``version`` and ``matches(attrs)``; the reader detects the version from
the store's own root metadata.
"""

from __future__ import annotations

FORMAT_NAME = "brats-zarr"
CASES_GROUP = "cases"


class FormatError(ValueError):
    """A store that does not follow the contract, or one this code cannot read."""


class FormatV1:
    version = 1
    # Chunking and codec chosen by measurement (FORMAT.md, "Why these choices").
    # int16 in steps of one source intensity unit (value * scale[c] = z-score); 0 is background.
    image_dtype = "int16"
    # where a case's label map lives (inside its group)
    label_path = "label"
    label_layer = None  # no OME-Zarr label layer
    # one modality per chunk: a subset of modalities reads only its channels. Readers take the chunk shape and
    # codec from each array's metadata, so stores written with other chunks (earlier 128^3) read the same.
    image_chunks = (1, 64, 64, 64)
    label_chunks = (64, 64, 64)
    # blocksize "chunk": one blosc block per chunk (smaller, and faster both ways, than blosc's default blocks)
    codec = {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": "chunk"}
    # Root attributes every v1 store has.
    root_keys = ("format", "format_version", "modalities", "label_convention", "params", "index", "failures",
                 "splits")
    # Case attributes every v1 case has.
    case_keys = ("case_id", "modalities", "label_convention", "source_files", "source_sha256", "source_affine",
                 "source_shape", "resampled_affine", "resampled_shape", "crop_box", "stored_affine", "spacing_mm",
                 "orientation", "shape", "image_scale", "normalization", "label_counts", "region_counts",
                 "foreground_counts", "params_hash", "content_crc32")

    @classmethod
    def matches(cls, attrs: dict) -> bool:
        return attrs.get("format") == FORMAT_NAME and attrs.get("format_version") == cls.version


class FormatV2(FormatV1):
    """Version 1 with the label map as an OME-Zarr 0.5 label layer, ``labels/seg`` (its one level at
    ``labels/seg/0``), so that OME-Zarr viewers show the segmentation over the image; the arrays, chunks, codec and
    every attribute are version 1's."""

    version = 2
    label_path = "labels/seg/0"
    label_layer = "seg"
    # what a store of an earlier version lacks (store verify says it)
    adds = ("the OME-Zarr label layer (labels/seg): OME-Zarr viewers (napari's ome-zarr plugin) show its images "
            "without the segmentation")


FORMATS = (FormatV1, FormatV2)
CURRENT = FormatV2


def newer(fmt) -> list:
    """The formats after ``fmt``: what a store of format ``fmt`` lacks is what each of them ``adds``."""
    return [f for f in FORMATS if f.version > fmt.version]


def detect(attrs: dict):
    """The format class of a store's root attributes; a clear error for anything else."""
    for f in FORMATS:
        if f.matches(attrs):
            return f
    if attrs.get("format") != FORMAT_NAME:
        raise FormatError("not a brats-zarr store (root attribute 'format' missing or different)")
    raise FormatError(f"brats-zarr format version {attrs.get('format_version')!r} is not supported by this code "
                      f"(supported: {[f.version for f in FORMATS]})")
