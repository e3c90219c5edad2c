"""Reading regions of a local store's arrays straight from their chunk files.

zarr-python's general read path costs tens of milliseconds per call here (an event loop round trip, codec
pipeline objects, per-chunk tasks). For a local v1 store the layout is fixed (FORMAT.md): one file per chunk,
``c/<i>/<j>/...``, each a blosc frame of the whole little-endian chunk. Reading those files and decoding them
with numcodecs' blosc directly is several times faster; anything else falls back to zarr.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np


class ChunkReader:
    """Region reads of one zarr array. ``path`` is the array's folder, or None to use ``array`` (zarr)."""

    def __init__(self, array, path: str | Path | None):
        self.array = array
        self.shape = tuple(array.shape)
        self.chunks = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype)
        self.path = Path(path) if path is not None else None
        self.fast = self.path is not None and self._is_plain_blosc(array)

    @staticmethod
    def _is_plain_blosc(array) -> bool:
        try:
            meta = array.metadata
            names = [c.to_dict()["name"] for c in meta.codecs]
            sep = meta.chunk_key_encoding.to_dict()
            return names == ["bytes", "blosc"] and sep.get("name") == "default" and array.dtype.itemsize in (1, 2, 4)
        except Exception:
            return False

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """The array's values in ``region`` (one slice per dimension, steps of 1, inside the array)."""
        if not self.fast:
            return np.asarray(self.array[region])
        from numcodecs import blosc

        starts = [s.start or 0 for s in region]
        stops = [s.stop if s.stop is not None else n for s, n in zip(region, self.shape)]
        out = np.zeros([b - a for a, b in zip(starts, stops)], dtype=self.dtype)
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
        for idx in itertools.product(*ranges):
            f = self.path.joinpath("c", *map(str, idx))
            try:
                raw = f.read_bytes()
            except FileNotFoundError:
                continue  # a chunk never written holds the fill value, 0
            chunk = np.frombuffer(blosc.decompress(raw), dtype=self.dtype.newbyteorder("<")).reshape(self.chunks)
            src, dst = [], []
            for i, a, b, c in zip(idx, starts, stops, self.chunks):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
        return out
