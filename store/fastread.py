"""Reading regions of a store's arrays straight from their chunk or shard files, local or on object storage.

zarr-python's general read path costs tens of milliseconds per call here (an event loop round trip, codec
pipeline objects, per-chunk tasks). For a local store the layouts are few and fixed (FORMAT.md): blosc chunks of
the whole little-endian chunk, either one file per chunk (``c/<i>/<j>/...`` or ``c.<i>.<j>...``) or held in
shards (Zarr v3 ``sharding_indexed``: the chunks, then an index of (offset, length) pairs with its CRC-32C, at
the end). Reading those bytes and decoding them with numcodecs' blosc directly is several times faster;
anything else falls back to zarr.

On object storage (``remote``) the cost is per request, not per byte: each shard's index is fetched once and
kept (a case has a handful of shards), then the byte ranges of just the chunks a region touches are fetched
together, concurrently (fsspec ``cat_ranges``), and decoded as locally.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np

EMPTY = 2**64 - 1  # a shard index entry for a chunk that is not stored
REMOTE_MERGE_GAP = 4 << 20  # bytes: chunk ranges of one shard closer than this are fetched as one range


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
    """Region reads of one zarr array. ``path`` is the array's local folder; or ``remote`` = (fsspec filesystem,
    the array's path on it) with ``sizes`` (shard key -> bytes, as the case records them; None: asked for);
    with neither, ``array`` (zarr) reads."""

    def __init__(self, array, path: str | Path | None, remote=None, sizes: dict | None = None):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.path = Path(path) if path is not None else None
        self.remote = remote
        self.sizes = sizes
        lay = _readable(array) if (self.path is not None or remote is not None) else None
        if remote is not None and (lay is None or lay["shard"] is None):
            lay = None  # remote reads are for sharded arrays; others go through zarr
        self.layout = lay
        self.fast = self.layout is not None
        self.chunks = self.layout["chunks"] if self.fast else tuple(array.chunks)
        self._local = threading.local()
        self._indexes: dict = {}  # shard -> its index (chunks per shard..., 2), read once
        self._maps: dict = {}  # shard -> its file mapped (local shards), mapped once

    def _file(self, idx) -> Path:
        if self.remote is not None:
            return f"{self.remote[1]}/{chunk_key(self.layout, idx)}"
        return self.path / chunk_key(self.layout, idx)

    def _remote_index(self, sidx) -> np.ndarray | None:
        """A remote shard's index, fetched once (one ranged GET); None where the shard was never written."""
        if sidx in self._indexes:
            return self._indexes[sidx]
        fs, _ = self.remote
        key = chunk_key(self.layout, sidx)
        n = int(np.prod(self.layout["shard"]))
        crc = 4 if self.layout["crc"] else 0
        size = self.sizes.get(key) if self.sizes is not None else None
        if size is None:
            try:
                size = int(fs.size(self._file(sidx)))
            except FileNotFoundError:
                size = None
        if size is None:
            self._indexes[sidx] = None
            return None
        raw = fs.cat_file(self._file(sidx), start=max(size - 16 * n - crc, 0), end=size) if size >= 16 * n + crc \
            else b""
        self._indexes[sidx] = self._parse_index(sidx, raw, size)
        return self._indexes[sidx]

    def _parse_index(self, sidx, raw: bytes, size: int) -> np.ndarray:
        """Check a shard index (its length, CRC-32C, and that every chunk lies before it) and shape it."""
        n = int(np.prod(self.layout["shard"]))
        crc = 4 if self.layout["crc"] else 0
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
        return index

    def _split(self, idx) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunk ``idx`` -> (its shard, its place in the shard)."""
        per_shard = self.layout["shard"]
        return tuple(i // p for i, p in zip(idx, per_shard)), tuple(i % p for i, p in zip(idx, per_shard))

    def _plan(self, idxs) -> list:
        """For each chunk idx: (idx, shard path, start, end), or (idx, None, 0, 0) where it is not stored."""
        plan = []
        for idx in idxs:
            sidx, inner = self._split(idx)
            index = self._remote_index(sidx)
            offset, length = (int(v) for v in index[inner]) if index is not None else (EMPTY, 0)
            plan.append((idx, None, 0, 0) if offset == EMPTY else (idx, self._file(sidx), offset, offset + length))
        return plan

    def chunk_indices(self, regions) -> list:
        """The chunk indices the regions touch, in order (a chunk twice where two regions share it)."""
        idxs = []
        for region in regions:
            starts = [s.start or 0 for s in region]
            stops = [s.stop if s.stop is not None else n for s, n in zip(region, self.shape)]
            idxs += itertools.product(*(range(a // c, (b - 1) // c + 1)
                                        for a, b, c in zip(starts, stops, self.chunks)))
        return idxs

    def fetch(self, regions) -> dict | None:
        """Remote readers: the stored bytes of every chunk the regions touch, in one concurrent round of requests
        (pass it to ``blocks``/``read_into`` as ``fetched``); None for local readers, which need no fetch."""
        if self.remote is None or not self.fast:
            return None
        return fetch_together([(self, regions)])[0]

    def _shard_index(self, sidx, fd: int) -> np.ndarray:
        index = self._indexes.get(sidx)
        if index is None:
            n = int(np.prod(self.layout["shard"]))
            crc = 4 if self.layout["crc"] else 0
            size = os.fstat(fd).st_size
            raw = os.pread(fd, 16 * n + crc, size - 16 * n - crc) if size >= 16 * n + crc else b""
            index = self._parse_index(sidx, raw, size)
            self._indexes[sidx] = index
        return index

    def blocks(self, region: tuple[slice, ...], at=None, fetched: dict | None = None):
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
            if self.remote is not None:
                idxs = list(itertools.product(*ranges))
                fetched = fetched if fetched is not None else {}
                missing = [i for i in idxs if i not in fetched]
                if missing:
                    fetched = {**fetched, **fetch_together([(self, None, missing)])[0]}
            else:
                fetched = None
            # per axis, each chunk's index with its source and destination slices; a chunk's are their product
            axes = [[(i, slice(max(a, i * c) - i * c, min(b, (i + 1) * c) - i * c),
                      slice(max(a, i * c) - a + o, min(b, (i + 1) * c) - a + o)) for i in r]
                    for r, a, b, c, o in zip(ranges, starts, stops, self.chunks, at)]
            for parts in itertools.product(*axes):
                idx, src, dst = zip(*parts)
                raw = fetched[idx] if fetched is not None else self._read_chunk(idx, fds)
                if raw is None:
                    yield None, src, dst
                    continue
                blosc.decompress(raw, buffer)
                yield buffer, src, dst
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

    def _read_chunk(self, idx, fds: dict):
        """The stored bytes of chunk ``idx``, or None where it was never written: a view of its shard's file,
        mapped once per reader (a published case's files never change: a rebuild writes a new version), or, for
        one file per chunk, of the calling thread's read buffer (use it before the next read). Neither copies
        the bytes into a new object per chunk."""
        if self.layout["shard"] is None:
            try:
                fd = os.open(self._file(idx), os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                length = os.fstat(fd).st_size
                view = self._read_buffer(length)
                got = os.preadv(fd, [view], 0)
            finally:
                os.close(fd)
        else:
            sidx, inner = self._split(idx)
            mapped = self._maps.get(sidx)
            if mapped is None:
                where = self._stored(idx, fds)
                if where is None:
                    return None
                mapped = self._maps[sidx] = memoryview(mmap.mmap(fds[sidx], 0, access=mmap.ACCESS_READ))
            offset, length = (int(v) for v in self._indexes[sidx][inner])
            if offset == EMPTY:
                return None
            view = mapped[offset:offset + length]
            got = len(view)
        if got != length:
            raise ValueError(f"{self._file(self._split(idx)[0] if self.layout['shard'] else idx)}: chunk {idx} "
                             f"lies beyond the end of its {'shard' if self.layout['shard'] else 'file'}")
        return view

    def _read_buffer(self, n: int) -> memoryview:
        """``n`` bytes of the calling thread's read buffer (grown as needed)."""
        buf = getattr(self._local, "raw", None)
        if buf is None or len(buf) < n:
            buf = self._local.raw = bytearray(max(n, 1 << 18))
        return memoryview(buf)[:n]

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

    def read_into(self, region: tuple[slice, ...], out: np.ndarray, at=None, fetched: dict | None = None) -> np.ndarray:
        """Write the values in ``region`` (slices on the array's own axes) into ``out`` at offset ``at`` (see
        ``blocks``); the rest of ``out`` is left as it is. Returns ``out``."""
        for values, src, dst in self.blocks(region, at, fetched):
            out[dst] = 0 if values is None else values[src]
        return out


def fetch_together(requests) -> list[dict]:
    """One concurrent round of requests for several remote readers on one filesystem: ``requests`` is a list of
    (reader, regions) or (reader, None, chunk indices); returns, per request, chunk idx -> stored bytes (None
    where not stored). Ranges of one shard that lie near each other become one request: on object storage the
    cost is per request (signing, a round trip), and a few MiB more in one request cost less than another."""
    plans = [r[0]._plan(r[0].chunk_indices(r[1]) if r[1] is not None else r[2]) for r in requests]
    out = [{} for _ in requests]
    flat = [(k, idx, path, a, b) for k, plan in enumerate(plans) for idx, path, a, b in plan]
    for k, idx, path, _, _ in flat:
        if path is None:
            out[k][idx] = None
    wanted = sorted((f for f in flat if f[2] is not None), key=lambda f: (f[2], f[3]))
    groups: list[list] = []
    for f in wanted:
        g = groups[-1] if groups else None
        if g and g[0][2] == f[2] and f[3] - max(x[4] for x in g) <= REMOTE_MERGE_GAP:
            g.append(f)
        else:
            groups.append([f])
    if not groups:
        return out
    fs = requests[0][0].remote[0]
    spans = [(g[0][2], min(x[3] for x in g), max(x[4] for x in g)) for g in groups]
    blobs = fs.cat_ranges([p for p, _, _ in spans], [a for _, a, _ in spans], [b for _, _, b in spans])
    for g, (path, a, b), blob in zip(groups, spans, blobs):
        if isinstance(blob, Exception) or len(blob) != b - a:
            raise ValueError(f"{path}: bytes {a}-{b} could not be read whole")
        for k, idx, _, start, end in g:
            out[k][idx] = blob[start - a:end - a]
    return out
