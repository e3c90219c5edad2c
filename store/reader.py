"""Reading the Zarr v3 store (FORMAT.md): ``open_store`` gives a ``Store``, whose ``case`` gives a ``Case``
that reads its arrays lazily, region by region.

Layout::

    <store>/zarr.json                      root group; attributes: format, version, params, index, splits, ...
    <store>/cases/<case_id>.<token>/       one group per published case version
        image       (C, X, Y, Z) int16, RAS, 1 mm, z-score = value * scale[c], cropped
        label       (X, Y, Z)    uint8, source label convention
        foreground  (N, 4)       int32: region index (0 TC, 1 WT, 2 ET), x, y, z

A case is visible only once the root ``index`` names its group: a build writes each case aside under a fresh
group, then publishes it in the index (one atomic write of the root metadata), then removes what it replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from .encoding import decode_into, gather, scale_into
from .format import FormatError, detect
from .location import Location


def zarr_store(path: str | Path, mode: str):
    import zarr.storage

    loc = Location(path)
    if loc.zip:
        return zarr.storage.ZipStore(loc.path, mode="r" if mode == "r" else "a")
    if loc.local:
        return zarr.storage.LocalStore(loc.path, read_only=(mode == "r"))
    return loc.path  # an fsspec URL; zarr makes the store


def open_group(path: str | Path, mode: str):
    import zarr

    return zarr.open_group(zarr_store(path, mode), mode=mode, zarr_format=3)



# Another engine's reader for the cases opened while ``reading_with`` is in force (None: the project's own).
_reader_factory = None


@contextlib.contextmanager
def reading_with(factory):
    """Cases opened inside the block read each array through ``factory(array, location, key)``: a reader with
    ``fastread.ChunkReader``'s interface (``blocks``, ``read``, ``read_into``, ``fetch``, ``remote``, ``fast``), or
    None for the project's own. For the benchmarks that measure other Zarr engines on the same reads; the
    factory holds for the whole process (the loader's threads too) until the block ends."""
    global _reader_factory
    before, _reader_factory = _reader_factory, factory
    try:
        yield
    finally:
        _reader_factory = before


class Case:
    """One stored case. Arrays are read lazily; ``region`` is a tuple of 3 slices on the stored grid."""

    def __init__(self, group, store: Store, group_path: str):
        self._group = group
        self._store = store
        self._group_path = group_path
        self._readers: dict = {}
        self.meta: dict = dict(group.attrs)
        self.case_id: str = self.meta["case_id"]
        self.shape: tuple[int, int, int] = tuple(self.meta["shape"])
        self.scale = np.asarray(self.meta["image_scale"], dtype=np.float32)
        # where the label map lives in the group: "label" (format 1) or the label layer's level (format 2)
        self.label_path: str = store.format.label_path
        self._check_objects()

    def _check_objects(self) -> None:
        """Every chunk object the build wrote (``objects``: key -> bytes) is there at its size: one listing of
        the case's folder or prefix. A missing shard would otherwise read as zeros (all-zero chunks are never
        written, so the format alone cannot tell). Stores written before this record skip the check."""
        expected = self.meta.get("objects")
        loc = self._store.location
        if not expected or loc.zip:
            return
        present = loc.sizes(self._group_path)
        for key, size in expected.items():
            if key not in present:
                raise FormatError(f"case {self.case_id}: object {key} is missing from store {self._store.path} "
                                  f"(the store is damaged; 'python -m store verify' lists every damaged case)")
            if present[key] != size:
                raise FormatError(f"case {self.case_id}: object {key} is {present[key]} bytes, {size} were written "
                                  f"(truncated or replaced; 'python -m store verify' lists every damaged case)")

    def _channels(self, modalities) -> list[int]:
        mods = list(self.meta["modalities"])
        if modalities is None:
            return list(range(len(mods)))
        bad = [m for m in modalities if m not in mods]
        if bad:
            raise KeyError(f"case {self.case_id} has no modality {', '.join(bad)} (stored: {', '.join(mods)})")
        return [mods.index(m) for m in modalities]

    def _reader(self, name: str):
        from .fastread import ChunkReader

        if name not in self._readers:
            loc = self._store.location
            key = f"{self._group_path}/{name}"
            chosen = _reader_factory(self._group[name], loc, key) if _reader_factory and not loc.zip else None
            if chosen is not None:
                self._readers[name] = chosen
            elif loc.remote:
                objects = self.meta.get("objects")
                sizes = {k[len(name) + 1:]: v for k, v in objects.items() if k.startswith(f"{name}/")} \
                    if objects else None
                self._readers[name] = ChunkReader(self._group[name], None, remote=(loc.fs[0], loc.key_path(key)),
                                                  sizes=sizes)
            else:
                self._readers[name] = ChunkReader(self._group[name], loc.local_path(key) if loc.local else None)
        return self._readers[name]

    def _region(self, region) -> tuple[slice, ...]:
        if region is None:
            return tuple(slice(0, n) for n in self.shape)
        out = []
        for s, n in zip(region, self.shape):
            a, b, _ = s.indices(n)
            out.append(slice(a, max(a, b)))
        return tuple(out)

    def image(self, modalities=None, region=None) -> np.ndarray:
        """float32 (C, X, Y, Z) for ``modalities`` (default all stored), only the chunks ``region`` touches."""
        import torch

        sl = self._region(region)
        # a numpy array viewed by torch: torch's own allocator made a fresh 4 x 128^3 output cost about as much as
        # the decode (its pages faulted in anew on every call); numpy's comes from the heap glibc keeps
        out = np.empty((len(self._channels(modalities)), *(s.stop - s.start for s in sl)), np.float32)
        self.image_into(torch.from_numpy(out), modalities, sl)
        return out

    def image_into(self, out, modalities=None, region=None, at=(0, 0, 0), fetched=None):
        """Decode ``region`` of ``modalities`` into the torch tensor ``out`` (C, ...) of float32 or float16, at
        offset ``at`` of its spatial axes; the rest of ``out`` is left as it is. Returns ``out``.

        Each chunk is decoded (stored value * scale, in float32, then rounded once to ``out``'s dtype) straight
        into its place: no region-sized intermediate. Every reader of images uses this one decode."""
        idx = self._channels(modalities)
        return decode_into(self._reader("image"), idx, self.scale[idx], self._region(region), out, at, fetched)

    def patch_reads(self, modalities, region) -> list:
        """What ``image_into`` and ``label_into`` of ``region`` will read, as (reader, regions) for
        ``store.fastread.fetch_together``: on object storage a loader fetches a whole batch's patches in one
        round of requests, then passes each reader its part as ``fetched``."""
        sl = self._region(region)
        reads = [(self._reader("image"), [(slice(c, c + 1), *sl) for c in self._channels(modalities)])]
        if self.has_label:
            reads.append((self._reader(self.label_path), [sl]))
        return reads

    @property
    def remote(self) -> bool:
        """True when this case's arrays are read from object storage (fetch first, then decode)."""
        return self._reader("image").remote is not None and self._reader("image").fast

    def decode_checked(self, modalities=None, out=None):
        """The whole case, checked against its ``content_crc32``: (image float16 tensor (C, X, Y, Z) of
        ``modalities``, label uint8 (X, Y, Z) or None). Reads every stored channel (the checksum covers them all),
        then decodes the chosen ones as ``image_into`` does, to the same bits. A mismatch is an error naming the
        case."""
        import torch

        idx = self._channels(modalities)
        full = tuple(slice(0, n) for n in self.shape)
        if out is None:
            out = torch.empty((len(idx), *self.shape), dtype=torch.float16)
        reader, crc = self._reader("image"), 0
        # one stored channel at a time, in slabs one chunk thick along X (the checksum runs over the channels'
        # bytes in C order, slab after slab): a slab's worth of transient memory in every process that caches,
        # reused from slab to slab, each chunk read once
        step = reader.chunks[1] if hasattr(reader, "chunks") else self.shape[0]
        for c in range(len(self.meta["modalities"])):
            fetched = reader.fetch([(slice(c, c + 1), *full)])  # object storage: the channel in one round
            for x in range(0, self.shape[0], step):
                slab = (slice(x, min(x + step, self.shape[0])), *full[1:])
                stored = gather(reader, (slice(c, c + 1), *slab), fetched)
                crc = zlib.crc32(memoryview(stored).cast("B"), crc)
                if c in idx:
                    scale_into(stored, self.scale[c], out[idx.index(c)][slab])
        label = self.label() if self.has_label else None
        if label is not None:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(label)).cast("B"), crc)
        if f"{crc:08x}" != self.meta["content_crc32"]:
            raise FormatError(f"case {self.case_id}: its data do not match the checksum written with them (a damaged "
                              f"chunk); 'python -m store verify' lists every damaged case")
        return out, label

    def label(self, region=None) -> np.ndarray:
        """uint8 (X, Y, Z) in the store's label convention."""
        if not self.has_label:
            raise KeyError(f"case {self.case_id} has no label")
        return self._reader(self.label_path).read(self._region(region)).astype(np.uint8, copy=False)

    def label_into(self, out: np.ndarray, region=None, at=(0, 0, 0), fetched=None) -> np.ndarray:
        """Write ``region`` (3 slices, X, Y, Z of the stored grid) of the label into the uint8 array ``out`` (X, Y,
        Z) at offset ``at``; the rest is left as it is. Returns ``out``."""
        if not self.has_label:
            raise KeyError(f"case {self.case_id} has no label")
        return self._reader(self.label_path).read_into(self._region(region), out, at, fetched)

    @property
    def has_label(self) -> bool:
        if not hasattr(self, "_has_label"):
            self._has_label = self.label_path in self._group
        return self._has_label

    @property
    def task(self) -> str:
        """The BraTS task the build recorded for this case (stores from before that record: from its id)."""
        from .conventions import task_of

        return self.meta.get("task") or task_of(self.case_id)

    @property
    def label_convention(self) -> str:
        """This case's label convention (a store's cases may be in a convention its own supersedes)."""
        return self.meta["label_convention"]

    @property
    def geometry(self) -> dict:
        """What maps the stored grid back to the source: source_affine, source_shape, resampled_affine,
        resampled_shape, crop_box, stored_affine (prep.preprocess.to_source_grid reads these)."""
        keys = ("source_affine", "source_shape", "resampled_affine", "resampled_shape", "crop_box", "stored_affine",
                "spacing_mm", "orientation")
        return {k: self.meta[k] for k in keys if k in self.meta}

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Stored voxel size in mm."""
        return tuple(float(v) for v in self.meta["spacing_mm"])

    def read_source(self, kind: str, root: str | Path | None = None) -> tuple[Path, bytes] | None:
        """The bytes of the source file ``kind`` (t1, ..., seg) this case was built from, read once, with its
        path under ``root`` (default: the folder the store was built from), if it is still there unchanged (the
        same sha256 as recorded); else None."""
        root = root or self._store.attrs.get("source")
        name = self.meta["source_files"].get(kind)
        if not root or not name:
            return None
        # a name: in <root>/<case_id>/; a relative path: from the cohort folder (nested cohorts, MSD)
        path = Path(root) / name if "/" in name else Path(root) / self.case_id / name
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != self.meta["source_sha256"].get(kind):
            return None
        return path, data

    def foreground(self) -> np.ndarray:
        """int32 (N, 4): region index (0 TC, 1 WT, 2 ET), x, y, z of sampled foreground voxels."""
        return np.asarray(self._group["foreground"][:], dtype=np.int32)

    @property
    def arrays(self):
        """The raw zarr arrays (for verification and fast readers): "image", "label" (wherever the format keeps
        it) and "foreground"."""
        return {k: self._group[p] for k, p in self.arrays_paths.items() if p in self._group}

    @property
    def arrays_paths(self) -> dict[str, str]:
        """Each array's path inside the case's group ("label": wherever the store's format keeps it)."""
        return {"image": "image", "label": self.label_path, "foreground": "foreground"}

    def __repr__(self) -> str:
        return f"Case({self.case_id!r}, shape={self.shape})"


class Store:
    """A brats-zarr store opened for reading (``open_store``)."""

    def __init__(self, path: str | Path, group):
        self.path = str(path)
        self.location = Location(self.path)
        self._group = group
        attrs = dict(group.attrs)
        self.format = detect(attrs)
        self.attrs = attrs
        self.format_version: int = attrs["format_version"]
        self.modalities: tuple[str, ...] = tuple(attrs["modalities"])
        self.label_convention: str | None = attrs["label_convention"]
        self.params: dict = attrs["params"]
        self.index: dict = attrs["index"]
        self.failures: dict = attrs.get("failures", {})

    def modality_error(self, modalities) -> str | None:
        """The message for ``modalities`` this store lacks, or None (every store keeps all four; a store question,
        asked by the trainer before any work and by a loader opened on its own)."""
        bad = [m for m in modalities if m not in self.modalities]
        if bad:
            return f"unknown modality {', '.join(bad)}; the store has {', '.join(self.modalities)}"
        return None

    @property
    def case_ids(self) -> list[str]:
        return sorted(self.index)

    @property
    def splits(self) -> dict:
        s = self.attrs.get("splits") or {}
        return {k: s.get(k, []) for k in ("train", "val", "test", "folds")} | {
            k: v for k, v in s.items() if k not in ("train", "val", "test", "folds")
        }

    def case(self, case_id: str) -> Case:
        rec = self.index.get(case_id)
        if rec is None:
            raise KeyError(f"no case {case_id!r} in store {self.path}")
        try:
            group = self._group[rec["group"]]
        except KeyError:
            raise FormatError(f"case {case_id}: its group {rec['group']} is missing from store {self.path} (the "
                              f"store is damaged; 'python -m store verify' lists every damaged case)") from None
        return Case(group, self, rec["group"])

    def __iter__(self):
        return (self.case(c) for c in self.case_ids)

    def __len__(self) -> int:
        return len(self.index)

    def nbytes_on_disk(self) -> int | None:
        if self.location.zip:
            return os.path.getsize(self.path)
        return sum(self.location.sizes("").values())


def open_store(path: str | Path, mode: str = "r") -> Store:
    """Open a store; read-only unless ``mode`` is "r+"."""
    import zarr.errors

    if mode not in ("r", "r+"):
        raise ValueError("mode must be 'r' or 'r+'")
    loc = Location(path)
    loc.check_reachable()
    if loc.local and not Path(path).exists():
        raise FileNotFoundError(f"no store at {path}")
    try:
        group = open_group(path, mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise FileNotFoundError(f"no zarr group at {path}") from e
    except (ValueError, KeyError, TypeError) as e:  # a root zarr.json cut short or garbled
        raise FormatError(f"store {path}: its root metadata (zarr.json) is damaged and cannot be read "
                          f"({type(e).__name__}); rebuild the store with --overwrite") from None
    return Store(path, group)


# ----------------------------------------------------------------------------------------------- writing
