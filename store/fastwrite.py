"""Writing a whole array of a local store directly: its ``zarr.json`` and its chunk or shard files.

zarr-python's write path hands every chunk through its async codec pipeline and creates each node through its
store API; for a store being built, where each array is written once and whole, writing the metadata document
and compressing each chunk with numcodecs' blosc is several times faster. The files are the ones zarr reads:
the metadata is what ``zarr.create_array`` writes for the same arguments, and a shard is laid out as Zarr v3's
``sharding_indexed`` codec lays it out (encoded chunks, then the index of (offset, length) pairs in C order of
the chunks, little-endian uint64, 2**64 - 1 for a chunk not stored, then the index's CRC-32C). Chunks at the far
edges are padded with the fill value 0; a chunk that is all 0 is not stored, a shard with no chunk not written
(as zarr does). Both are tested against zarr itself.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import numpy as np

from .fastread import EMPTY, chunk_key, layout

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def shard_shape(shape, chunks) -> tuple[int, ...]:
    """The shard that holds a whole array of ``shape``: each axis rounded up to whole chunks."""
    return tuple(-(-int(s) // int(c)) * int(c) for s, c in zip(shape, chunks))


def array_metadata(shape, dtype, chunks, codec: dict, shards=None, dimension_names=None, separator: str = ".") -> dict:
    """The Zarr v3 ``zarr.json`` of an array: ``chunks`` compressed with blosc ``codec`` (FormatV1.codec form;
    blocksize "chunk": one blosc block per chunk), held in ``shards`` (None: one file per chunk); file keys
    ``c.<i>.<j>...`` in the array's folder (``separator`` "/": ``c/<i>/<j>/...``, as stores written before); fill
    value 0."""
    dtype = np.dtype(dtype)
    chunks = [int(c) for c in chunks]
    bs = codec.get("blocksize", 0)
    # zarr names no byte order for one-byte types
    inner = [{"name": "bytes", **({"configuration": {"endian": "little"}} if dtype.itemsize > 1 else {})},
             {"name": "blosc", "configuration": {
                 "typesize": dtype.itemsize, "cname": codec["cname"], "clevel": int(codec["clevel"]),
                 "shuffle": codec["shuffle"],
                 "blocksize": dtype.itemsize * int(np.prod(chunks)) if bs == "chunk" else int(bs)}}]
    if shards is None:
        grid, codecs = chunks, inner
    else:
        grid = [int(s) for s in shards]
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": chunks, "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}]
    meta = {"shape": [int(s) for s in shape], "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
            "fill_value": 0, "codecs": codecs, "attributes": {}, "zarr_format": 3, "node_type": "array",
            "storage_transformers": []}
    if dimension_names is not None:
        meta["dimension_names"] = list(dimension_names)
    return meta


def chunk_bytes(data: np.ndarray, idx, chunks, compress) -> bytes | None:
    """Chunk ``idx`` of ``data`` compressed (edge chunks padded with 0), or None where it is all 0 or lies
    wholly outside the array (the tail of a shard)."""
    src = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, data.shape))
    if any(s.start >= s.stop for s in src):
        return None
    piece = data[src]
    if piece.shape == tuple(chunks):
        block = np.ascontiguousarray(piece)
    else:
        block = np.zeros(chunks, dtype=data.dtype)
        block[tuple(slice(0, s) for s in piece.shape)] = piece
    return compress(block) if block.any() else None


def compressor(lay: dict):
    """Chunk (a C-contiguous block of the whole chunk shape) -> its stored bytes, with ``lay``'s blosc settings."""
    from numcodecs import blosc

    cfg = lay["blosc"]
    cname, clevel = cfg["cname"].encode(), int(cfg["clevel"])
    shuffle, blocksize, typesize = _SHUFFLE[cfg["shuffle"]], int(cfg["blocksize"]), int(cfg["typesize"])
    return lambda block: blosc.compress(block, cname, clevel, shuffle, blocksize, typesize)


def array_objects(meta: dict, data: np.ndarray):
    """The objects of the array ``meta`` describes (``array_metadata``) holding ``data``, as (key relative to the
    array's folder, bytes): ``zarr.json`` first, then each written chunk or shard (all-zero chunks are not
    stored, as zarr does)."""
    import google_crc32c

    lay = layout(meta)
    if lay is None:
        raise ValueError("write_array writes blosc chunks, one per file or in shards, only")
    data = np.asarray(data, dtype=np.dtype(meta["data_type"]).newbyteorder("<"))
    if data.shape != tuple(meta["shape"]):
        raise ValueError(f"data of shape {data.shape} for an array of shape {tuple(meta['shape'])}")
    yield "zarr.json", json.dumps(meta, indent=2).encode()
    chunks, compress = lay["chunks"], compressor(lay)
    per_shard = lay["shard"]
    if per_shard is None:
        for idx in itertools.product(*(range(-(-n // c)) for n, c in zip(data.shape, chunks))):
            b = chunk_bytes(data, idx, chunks, compress)
            if b is not None:
                yield chunk_key(lay, idx), b
        return
    for sidx in itertools.product(*(range(-(-n // s)) for n, s in zip(data.shape, lay["grid"]))):
        index = np.full((*per_shard, 2), EMPTY, dtype="<u8")
        parts, offset = [], 0
        for inner_idx in itertools.product(*map(range, per_shard)):
            b = chunk_bytes(data, [s * p + i for s, p, i in zip(sidx, per_shard, inner_idx)], chunks, compress)
            if b is not None:
                index[inner_idx] = (offset, len(b))
                parts.append(b)
                offset += len(b)
        if parts:
            ib = index.tobytes()
            yield chunk_key(lay, sidx), b"".join([*parts, ib, struct.pack("<I", google_crc32c.value(ib))])


def write_array(folder: str | Path, meta: dict, data: np.ndarray) -> None:
    """Create the array ``meta`` describes (``array_metadata``) in the new local folder ``folder``, holding
    ``data``."""
    folder = Path(folder)
    folder.mkdir()
    made = {folder}
    for key, b in array_objects(meta, data):
        f = folder / key
        if f.parent not in made:  # nested keys: each folder made once
            f.parent.mkdir(parents=True, exist_ok=True)
            made.add(f.parent)
        f.write_bytes(b)


def write_array_zarr(group, name: str, meta: dict, data: np.ndarray) -> None:
    """The same array through zarr-python, for stores that are not local folders (fsspec URLs)."""
    from zarr.codecs import BloscCodec

    lay = layout(meta)
    sharded = lay["shard"] is not None
    a = group.create_array(name, shape=tuple(meta["shape"]), dtype=meta["data_type"], chunks=lay["chunks"],
                           shards=lay["grid"] if sharded else None, compressors=[BloscCodec(**lay["blosc"])],
                           fill_value=0, dimension_names=meta.get("dimension_names"),
                           chunk_key_encoding={"name": "default", "separator": lay["sep"]})
    if data.size:
        a[...] = data
