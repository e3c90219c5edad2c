"""The store's encoding of images and the checks on what it holds: z-scores as int16 values times a scale per
channel (FORMAT.md), the one decode every image read goes through, and the checksums a build records."""

from __future__ import annotations

import hashlib
import threading
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


STAGE_LIMIT = 16 << 20  # bytes: a region's int16 staging up to this size is kept by the thread (a 128^3 patch: 4 MiB
# a channel); a larger region (a whole case at once) gets a buffer of its own, freed after the read
CAST_BLOCK = 1 << 22  # items: float16 products are formed in float32 this many at a time (a 128^3 patch at once)

_scratch = threading.local()


def _thread_buffer(name: str, dtype, n: int) -> np.ndarray:
    """A flat buffer of at least ``n`` items kept by the calling thread (loader threads decode at once)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype)
        setattr(_scratch, name, buf)
    return buf[:n]


def gather(reader, region: tuple[slice, ...], fetched=None) -> np.ndarray:
    """``region`` (4 slices, one channel: C, X, Y, Z) of a ChunkReader's int16 image as one contiguous (X, Y, Z)
    array, a chunk never written as zeros: each chunk's piece copied into place, so the conversion that follows
    runs over whole contiguous rows. The array is the calling thread's staging buffer (up to ``STAGE_LIMIT``):
    use it before the thread's next gather."""
    shape = tuple(s.stop - s.start for s in region[1:])
    stage = whole = None
    for values, src, dst in reader.blocks(region, None, fetched):
        piece = None if values is None else values[src][0]
        if stage is None and piece is not None and piece.shape == shape and piece.flags.c_contiguous:
            whole = piece  # one piece is the whole region (then it is the only one), contiguous already
            continue
        if stage is None:
            n = int(np.prod(shape))
            stage = (_thread_buffer("stage", np.int16, n) if 2 * n <= STAGE_LIMIT else np.empty(n, np.int16)) \
                .reshape(shape)
        if piece is None:
            stage[dst[1:]].fill(0)
        else:
            np.copyto(stage[dst[1:]], piece, casting="no")
    if stage is None and whole is None:  # a region of no voxels
        return np.zeros(shape, np.int16)
    return whole if stage is None else stage


def scale_into(values: np.ndarray, scale, target) -> None:
    """``target`` (a torch tensor, float32 or float16, the shape of ``values``) = the int16 ``values`` times
    ``scale``, the product formed in float32 and rounded once to ``target``'s dtype: the store's decode.

    On the CPU in as few calls as possible, each over a whole contiguous block: numpy's vectorised
    int16-times-float32 loop (torch's mixed-dtype multiply is about twice as slow here), and for float16 the
    products in one float32 block of the thread's, rounded by torch's vectorised cast (numpy's float16 cast is
    scalar). Few, large calls matter: on loader threads each call pays for the GIL and for torch's thread pool."""
    import torch

    s = np.float32(scale)
    if target.device.type != "cpu" or target.dtype not in (torch.float32, torch.float16):
        torch.mul(torch.from_numpy(np.ascontiguousarray(values)), float(s), out=target)
        return
    if target.dtype == torch.float32:
        np.multiply(values, s, out=target.numpy())
        return
    plane = max(1, int(np.prod(values.shape[1:])))
    rows = max(1, CAST_BLOCK // plane)
    block = _thread_buffer("cast", np.float32, min(rows, values.shape[0]) * plane)
    for x in range(0, values.shape[0], rows):
        part = values[x:x + rows]
        products = block[:part.size].reshape(part.shape)
        np.multiply(part, s, out=products)
        target[x:x + rows].copy_(torch.from_numpy(products))


def decode_into(reader, channels, scales, region: tuple[slice, slice, slice], out, at=(0, 0, 0), fetched=None):
    """The one image decode: ``region`` (3 slices, X, Y, Z) of the stored ``channels`` (a ChunkReader over the int16
    image (C, X, Y, Z)) into the torch tensor ``out`` (len(channels), X, Y, Z) at offset ``at``, as stored value *
    scale in float32, rounded once to ``out``'s dtype; a chunk never written gives zeros. Returns ``out``.

    Per channel: the chunks' int16 pieces are gathered into one contiguous block (``gather``), then converted
    in one vectorised pass (``scale_into``); converting strided chunk pieces one by one cost more than the
    decompression itself."""
    if fetched is None and hasattr(reader, "fetch"):  # object storage: every channel's chunks in one round
        fetched = reader.fetch([(slice(c, c + 1), *region) for c in channels])
    box = tuple(slice(a, a + s.stop - s.start) for a, s in zip(at, region))
    for k, (c, scale) in enumerate(zip(channels, scales)):
        scale_into(gather(reader, (slice(c, c + 1), *region), fetched), scale, out[k][box])
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
