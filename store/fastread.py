"""Reading regions of a local store's arrays straight from their chunk files.

zarr-python's general read path costs tens of milliseconds per call here (an event loop round trip, codec
pipeline objects, per-chunk tasks). For a local v1 store the layout is fixed (FORMAT.md): one file per chunk,
``c/<i>/<j>/...``, each a blosc frame of the whole little-endian chunk. Reading those files and decoding them
with numcodecs' blosc directly is several times faster; anything else falls back to zarr.
"""

from __future__ import annotations

import itertools
import threading
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
        self._local = threading.local()

    @staticmethod
    def _is_plain_blosc(array) -> bool:
        try:
            meta = array.metadata
            names = [c.to_dict()["name"] for c in meta.codecs]
            sep = meta.chunk_key_encoding.to_dict()
            return names == ["bytes", "blosc"] and sep.get("name") == "default" and array.dtype.itemsize in (1, 2, 4)
        except Exception:
            return False

    def blocks(self, region: tuple[slice, ...], at=None):
        """The pieces of ``region`` (one slice per dimension, steps of 1, inside the array), one per chunk it
        touches: (values, src, dst) with ``values[src]`` the data for ``[dst]`` of a destination holding the
        region at offset ``at`` (default 0 on every axis), or values None for a chunk never written (all fill
        value, 0).

        The fast path decompresses every chunk into one buffer of the reader's (per thread): consume each piece
        before asking for the next."""
        starts = [s.start or 0 for s in region]
        stops = [s.stop if s.stop is not None else n for s, n in zip(region, self.shape)]
        at = tuple(at) if at is not None else (0,) * len(starts)
        if not self.fast:
            yield np.asarray(self.array[region]), tuple(slice(0, b - a) for a, b in zip(starts, stops)), \
                tuple(slice(o, o + b - a) for a, b, o in zip(starts, stops, at))
            return
        from numcodecs import blosc

        buffer = getattr(self._local, "buffer", None)
        if buffer is None:  # one per thread: loader threads read the same case at once
            buffer = self._local.buffer = np.empty(self.chunks, dtype=self.dtype.newbyteorder("<"))
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
        for idx in itertools.product(*ranges):
            src, dst = [], []
            for i, a, b, c, o in zip(idx, starts, stops, self.chunks, at):
                lo, hi = max(a, i * c), min(b, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - a + o, hi - a + o))
            try:
                raw = self.path.joinpath("c", *map(str, idx)).read_bytes()
            except FileNotFoundError:
                yield None, tuple(src), tuple(dst)
                continue
            blosc.decompress(raw, buffer)
            yield buffer, tuple(src), tuple(dst)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """The array's values in ``region`` (one slice per dimension, steps of 1, inside the array)."""
        shape = [(s.stop if s.stop is not None else n) - (s.start or 0) for s, n in zip(region, self.shape)]
        return self.read_into(region, np.empty(shape, dtype=self.dtype))

    def read_into(self, region: tuple[slice, ...], out: np.ndarray, at=None) -> np.ndarray:
        """Write the values in ``region`` into ``out`` at offset ``at`` (see ``blocks``); the rest of ``out`` is
        left as it is. Returns ``out``."""
        for values, src, dst in self.blocks(region, at):
            out[dst] = 0 if values is None else values[src]
        return out
