"""The store's encoding of images and the checks on what it holds: z-scores as int16 values times a scale per
channel (FORMAT.md), the one decode every image read goes through, and the checksums a build records."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np


class EncodedImage(NamedTuple):
    """An image as the store holds it: int16 values (C, X, Y, Z) and per-channel scales (z = value * scale)."""

    values: np.ndarray
    scale: list[float]


def encode_image(image: np.ndarray, source_unit=None) -> EncodedImage:
    """float32 z-scores (C, X, Y, Z) -> int16 and the per-channel scale (z = value * scale).

    ``source_unit[c]`` is one source intensity unit in z units (1 / std for integer sources): storing in those
    steps keeps exactly the information an integer source holds, at its entropy (FORMAT.md). Without it, or
    where the range would overflow int16, the channel's full range is spread over +-32000 steps.
    """
    scales = []
    out = np.empty(image.shape, np.int16)
    tmp = np.empty(image.shape[1:], np.float32)
    for c in range(image.shape[0]):
        peak = max(float(image[c].max()), -float(image[c].min())) if image[c].size else 0.0
        unit = float(source_unit[c]) if source_unit is not None and source_unit[c] else 0.0
        if unit <= 0 or peak / unit > 32000:
            unit = peak / 32000.0 if peak > 0 else 1.0
        scales.append(unit)
        np.divide(image[c], np.float32(unit), out=tmp)  # one channel at a time, into one buffer
        np.rint(tmp, out=tmp)
        out[c] = tmp
    return EncodedImage(out, scales)


def encode_integer_source(values: np.ndarray, means, stds) -> EncodedImage | None:
    """Integer source intensities (C, X, Y, Z), zero outside the brain, with each channel's mean and std over its
    nonzero voxels -> the encoding ``encode_image`` gives their z-scores in source units, computed exactly on
    the integers: value = x - rint(mean) where x != 0, else 0; scale = 1 / std (1 where std is 0, where every
    value is 0). An int16 ``values`` is encoded in place. None where a channel would not fit in +-32000 steps
    (then ``encode_image`` spreads its range instead)."""
    shifts = [int(np.rint(m)) for m in means]
    for c, shift in enumerate(shifts):
        lo, hi = int(values[c].min()), int(values[c].max())
        if max(hi - shift, shift - lo, abs(shift)) > 32000:
            return None
    out = values if values.dtype == np.int16 else np.empty(values.shape, np.int16)
    for c, shift in enumerate(shifts):
        o = out[c]
        # in int16 arithmetic, modulo 2**16 (other integer types are cast first): exact, as the result is in range
        np.subtract(values[c], shift, out=o, dtype=np.int16, casting="unsafe")
        # x - shift == -shift exactly where x == 0 (no wrap-around in range): zeros stay zero
        np.copyto(o, 0, where=o == -shift)
    return EncodedImage(out, [1.0 / float(s) if s else 1.0 for s in stds])


def decode_into(reader, channels, scales, region: tuple[slice, slice, slice], out, at=(0, 0, 0), fetched=None):
    """The one image decode: ``region`` (3 slices, X, Y, Z) of the stored ``channels`` (a ChunkReader over the int16
    image (C, X, Y, Z)) into the torch tensor ``out`` (len(channels), X, Y, Z) at offset ``at``, as stored value *
    scale in float32, rounded once to ``out``'s dtype; a chunk never written gives zeros. Returns ``out``."""
    import torch

    if fetched is None and hasattr(reader, "fetch"):  # object storage: every channel's chunks in one round
        fetched = reader.fetch([(slice(c, c + 1), *region) for c in channels])
    for k, (c, scale) in enumerate(zip(channels, scales)):
        dest, scale = out[k], float(scale)
        for values, src, dst in reader.blocks((slice(c, c + 1), *region), (0, *at), fetched):
            target = dest[dst[1:]]
            if values is None:
                target.zero_()
            else:
                torch.mul(torch.from_numpy(values[src][0]), scale, out=target)
    return out


def content_checksum(*arrays: np.ndarray) -> str:
    """CRC-32 of the stored arrays' bytes: catches a damaged or missing chunk (a missing chunk reads as fill)."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), crc)
    return f"{crc:08x}"


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, as the store records each source file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
