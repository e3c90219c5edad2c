"""The Zarr engines the benchmarks put beside the project's reader, behind the interface of
``store.fastread.ChunkReader`` (``blocks``, ``read``, ``read_into``, ``fetch``, ``remote``, ``fast``), so the loader
benchmarks measure them on the same regions:

- ``project``: ``store.fastread.ChunkReader``, this project's hand-written shard reader (what the store reads with);
- ``tensorstore``: Google's C++ Zarr v3 engine (``zarr3`` driver over its ``file`` key-value store);
- ``zarrs``: zarr-python with the zarrs codec pipeline (Rust), zarr-python's own read path otherwise.

``reading_with(name)`` chooses one for the cases opened inside it (``store.reader.reading_with``: the benchmark,
not the store, decides what it measures); tensorstore and zarrs come with the ``dev`` extra. Every engine reads
the same bytes into the same values.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np

ENGINES = ("project", "tensorstore", "zarrs")

_context = None
_context_lock = threading.Lock()


def _ts_context():
    """One tensorstore context per process: decode on the calling thread's share of one copy thread per core, and
    no chunk cache (as the project's reader, which keeps only the shard indexes)."""
    global _context
    with _context_lock:
        if _context is None:
            import tensorstore as ts

            _context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                   "data_copy_concurrency": {"limit": os.cpu_count() or 1}})
        return _context


def kvstore_spec(location, key: str) -> dict:
    """tensorstore's key-value store for ``key`` of a store at ``location`` (store.location.Location): a local
    folder, or an ``s3://`` prefix (endpoint and region from the standard AWS environment variables)."""
    if location.local:
        return {"driver": "file", "path": str(location.local_path(key))}
    if not location.path.startswith("s3://"):
        raise ValueError(f"{location.path}: tensorstore reads local folders and s3:// stores here")
    bucket, _, prefix = location.key_path(key).partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": prefix.rstrip("/") + "/"}
    if os.environ.get("AWS_ENDPOINT_URL"):
        spec["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


class _WholeRegionReader:
    """The reader interface over an engine that reads a whole region in one call (``read``): one piece per
    region, nothing to fetch ahead."""

    fast = True
    remote = None

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        raise NotImplementedError

    def fetch(self, regions):
        return None

    def blocks(self, region: tuple[slice, ...], at=None, fetched=None):
        """The whole region as one piece: (values, src, dst) as ``ChunkReader.blocks`` gives them."""
        values = self.read(region)
        at = tuple(at) if at is not None else (0,) * len(region)
        yield values, tuple(slice(0, n) for n in values.shape), \
            tuple(slice(o, o + n) for o, n in zip(at, values.shape))

    def read_into(self, region, out: np.ndarray, at=None, fetched=None) -> np.ndarray:
        for values, src, dst in self.blocks(region, at):
            out[dst] = values[src]
        return out


class TensorstoreReader(_WholeRegionReader):
    """Region reads of one zarr v3 array through tensorstore, one read per region (its chunks decoded, and on
    object storage fetched, concurrently by tensorstore itself)."""

    def __init__(self, kvstore: dict):
        import tensorstore as ts

        self.path = kvstore.get("path")
        self._ts = ts.open({"driver": "zarr3", "kvstore": kvstore}, read=True, context=_ts_context()).result()
        self.shape = tuple(self._ts.shape)
        self.dtype = np.dtype(self._ts.dtype.numpy_dtype)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return self._ts[region].read().result()


class ZarrReader(_WholeRegionReader):
    """Region reads through zarr-python (with the zarrs codec pipeline, which ``use_zarrs`` switches on)."""

    def __init__(self, array):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, region):
        return np.asarray(self.array[region])


def available() -> list[str]:
    """The engines installed here."""
    import importlib.util

    return ["project", *(n for n in ENGINES[1:] if importlib.util.find_spec(n) is not None)]


@contextlib.contextmanager
def reading_with(name: str):
    """Cases opened inside read through engine ``name`` (zarr's codec pipeline restored after)."""
    import zarr

    from store.reader import reading_with as store_reading_with

    if name not in ENGINES:
        raise ValueError(f"engine {name!r}: the store readers are {', '.join(ENGINES)}")
    before_pipeline = zarr.config.get("codec_pipeline.path")
    try:
        with store_reading_with(None if name == "project" else functools.partial(reader, name)):
            yield
    finally:
        zarr.config.set({"codec_pipeline.path": before_pipeline})


def use_zarrs() -> None:
    """Route zarr-python's chunk decoding through zarrs (its Rust codec pipeline), for this process."""
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def reader(name: str, array, location, key: str):
    """The reader ``name`` over ``array`` (zarr), the array at ``key`` of the store at ``location``; None where
    the project's own reader is meant (its construction differs between local and remote stores)."""
    if name == "tensorstore":
        return TensorstoreReader(kvstore_spec(location, key))
    if name == "zarrs":
        use_zarrs()
        return ZarrReader(array)
    return None
