"""Reading regions of a local store's arrays straight from their chunk or shard files.

zarr-python's general read path costs tens of milliseconds per call here (an event loop round trip, codec
pipeline objects, per-chunk tasks). For a local store the layouts are few and fixed (FORMAT.md): blosc chunks of
the whole little-endian chunk, either one file per chunk (``c/<i>/<j>/...`` or ``c.<i>.<j>...``) or held in
shards (Zarr v3 ``sharding_indexed``: the chunks, then an index of (offset, length) pairs with its CRC-32C, at
the end). Reading those bytes and decoding them with numcodecs' blosc directly is several times faster;
anything else falls back to zarr.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
from pathlib import Path

import numpy as np

EMPTY = 2**64 - 1  # a shard index entry for a chunk that is not stored


def layout(meta: dict) -> dict | None:
    """How the chunks of the array whose ``zarr.json`` is ``meta`` (a dict) lie on disk, where this module reads
    them directly and ``fastwrite`` writes them: {"chunks", "grid" (the chunk grid: the shard shape where
    sharded), "shard" (chunks per shard, or None), "sep" (chunk key separator), "crc" (the shard index carries a
    CRC-32C), "blosc" (the blosc configuration)}; None for any other layout."""
    try:
        keys = meta["chunk_key_encoding"]
        if keys.get("name") != "default":
            return None
        sep = (keys.get("configuration") or {}).get("separator", "/")
        codecs = meta["codecs"]
        grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        chunks, shard, crc, inner = grid, None, False, codecs
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            index = [c["name"] for c in cfg["index_codecs"]]
            if index not in (["bytes"], ["bytes", "crc32c"]) or cfg.get("index_location", "end") != "end":
                return None
            inner, chunks = cfg["codecs"], tuple(cfg["chunk_shape"])
            shard, crc = tuple(g // c for g, c in zip(grid, chunks)), index[-1] == "crc32c"
        if [c["name"] for c in inner] != ["bytes", "blosc"]:
            return None
        return {"chunks": chunks, "grid": grid, "shard": shard, "sep": sep, "crc": crc,
                "blosc": inner[1]["configuration"]}
    except (KeyError, TypeError, AttributeError, IndexError):
        return None


def chunk_key(lay: dict, idx) -> str:
    """The file name of chunk (or shard) ``idx`` within its array's folder: c.0.1... or c/0/1/..."""
    return lay["sep"].join(["c", *map(str, idx)])


def _readable(array) -> dict | None:
    """``layout`` of a zarr array this module reads directly (fill value 0, items of 1, 2 or 4 bytes)."""
    try:
        if array.metadata.fill_value != 0 or array.dtype.itemsize not in (1, 2, 4):
            return None
        return layout(array.metadata.to_dict())
    except Exception:
        return None


def _close(fds: dict) -> None:
    for fd in fds.values():
        if fd is not None:
            os.close(fd)


class ChunkReader:
    """Region reads of one zarr array. ``path`` is the array's folder, or None to use ``array`` (zarr)."""

    def __init__(self, array, path: str | Path | None):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.path = Path(path) if path is not None else None
        self.layout = _readable(array) if self.path is not None else None
        self.fast = self.layout is not None
        self.chunks = self.layout["chunks"] if self.fast else tuple(array.chunks)
        self._local = threading.local()
        self._indexes: dict = {}  # shard -> its index (chunks per shard..., 2), read once

    def _file(self, idx) -> Path:
        return self.path / chunk_key(self.layout, idx)

    def _split(self, idx) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunk ``idx`` -> (its shard, its place in the shard)."""
        per_shard = self.layout["shard"]
        return tuple(i // p for i, p in zip(idx, per_shard)), tuple(i % p for i, p in zip(idx, per_shard))

    def _shard_index(self, sidx, fd: int) -> np.ndarray:
        index = self._indexes.get(sidx)
        if index is None:
            n = int(np.prod(self.layout["shard"]))
            crc = 4 if self.layout["crc"] else 0
            size = os.fstat(fd).st_size
            raw = os.pread(fd, 16 * n + crc, size - 16 * n - crc) if size >= 16 * n + crc else b""
            if len(raw) != 16 * n + crc:
                raise ValueError(f"{self._file(sidx)}: shard too short for its index")
            if crc:
                import google_crc32c

                if google_crc32c.value(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
                    raise ValueError(f"{self._file(sidx)}: shard index fails its CRC-32C check")
            index = np.frombuffer(raw[: 16 * n], dtype="<u8").reshape(*self.layout["shard"], 2)
            stored = index[..., 0] != EMPTY
            # chunks lie before the index: an entry reaching into it (or past the file) reads the wrong bytes
            if (index[stored, 0] + index[stored, 1] > size - 16 * n - crc).any():
                raise ValueError(f"{self._file(sidx)}: its index places a chunk beyond the end of the shard's chunks")
            self._indexes[sidx] = index
        return index

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
        fds: dict = {}  # shard -> open file (None: not written), for the length of this read
        try:
            ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
            for idx in itertools.product(*ranges):
                src, dst = [], []
                for i, a, b, c, o in zip(idx, starts, stops, self.chunks, at):
                    lo, hi = max(a, i * c), min(b, (i + 1) * c)
                    src.append(slice(lo - i * c, hi - i * c))
                    dst.append(slice(lo - a + o, hi - a + o))
                raw = self._read_chunk(idx, fds)
                if raw is None:
                    yield None, tuple(src), tuple(dst)
                    continue
                blosc.decompress(raw, buffer)
                yield buffer, tuple(src), tuple(dst)
        finally:
            _close(fds)

    def _stored(self, idx, fds: dict) -> tuple[int, int, int] | None:
        """Where chunk ``idx`` lies in its shard: (open file, byte offset, length), or None where it is not
        stored. ``fds``: the shard files opened so far (shard -> file, None where not written), the caller's to
        close."""
        sidx, inner = self._split(idx)
        if sidx not in fds:
            try:
                fds[sidx] = os.open(self._file(sidx), os.O_RDONLY)
            except FileNotFoundError:
                fds[sidx] = None
        fd = fds[sidx]
        if fd is None:
            return None
        offset, length = (int(v) for v in self._shard_index(sidx, fd)[inner])
        return None if offset == EMPTY else (fd, offset, length)

    def _read_chunk(self, idx, fds: dict) -> bytes | None:
        """The stored bytes of chunk ``idx``, or None where it was never written."""
        if self.layout["shard"] is None:
            try:
                return self._file(idx).read_bytes()
            except FileNotFoundError:
                return None
        where = self._stored(idx, fds)
        if where is None:
            return None
        fd, offset, length = where
        raw = os.pread(fd, length, offset)
        if len(raw) != length:
            raise ValueError(f"{self._file(self._split(idx)[0])}: chunk {idx} lies beyond the end of its shard")
        return raw

    def locate(self, idx) -> tuple[Path, int, int] | None:
        """Where chunk ``idx`` (chunk coordinates) is stored: (file, byte offset, length), or None where it is
        not stored (fast layouts only)."""
        if not self.fast:
            raise ValueError("locate needs a local array in a layout this module reads directly")
        idx = tuple(int(i) for i in idx)
        if self.layout["shard"] is None:
            f = self._file(idx)
            return (f, 0, f.stat().st_size) if f.exists() else None
        fds: dict = {}
        try:
            where = self._stored(idx, fds)
        finally:
            _close(fds)
        return None if where is None else (self._file(self._split(idx)[0]), where[1], where[2])

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
