"""Reading and writing the Zarr v3 store: the only code that knows the on-disk layout (FORMAT.md).

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
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .conventions import MODALITIES, compatible
from .format import CASES_GROUP, CURRENT, FORMAT_NAME, FormatError, detect
from .location import Location


def _zarr_store(path: str | Path, mode: str):
    import zarr.storage

    loc = Location(path)
    if loc.zip:
        return zarr.storage.ZipStore(loc.path, mode="r" if mode == "r" else "a")
    if loc.local:
        return zarr.storage.LocalStore(loc.path, read_only=(mode == "r"))
    return loc.path  # an fsspec URL; zarr makes the store


def _open_group(path: str | Path, mode: str):
    import zarr

    return zarr.open_group(_zarr_store(path, mode), mode=mode, zarr_format=3)


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
    """The one image decode: ``region`` of the stored ``channels`` (a ChunkReader over the int16 image) into the
    torch tensor ``out`` (len(channels), ...) at offset ``at``, as stored value * scale in float32, rounded once to
    ``out``'s dtype; a chunk never written gives zeros. Returns ``out``."""
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
            from .engines import engine, reader

            loc = self._store.location
            key = f"{self._group_path}/{name}"
            chosen = reader(engine(), self._group[name], loc, key) if not loc.zip else None
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
        out = torch.empty((len(self._channels(modalities)), *(s.stop - s.start for s in sl)))
        return self.image_into(out, modalities, sl).numpy()

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
            reads.append((self._reader("label"), [sl]))
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
        # one stored channel at a time (the checksum runs over the channels in order): a channel's worth of
        # transient memory, not the whole case's, in every process that caches
        for c in range(len(self.meta["modalities"])):
            stored = reader.read((slice(c, c + 1), *full))
            crc = zlib.crc32(memoryview(np.ascontiguousarray(stored)).cast("B"), crc)
            if c in idx:
                torch.mul(torch.from_numpy(stored[0]), float(self.scale[c]), out=out[idx.index(c)])
            del stored
        label = self.label() if self.has_label else None
        if label is not None:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(label)).cast("B"), crc)
        if f"{crc:08x}" != self.meta["content_crc32"]:
            raise FormatError(f"case {self.case_id}: its data do not match the checksum written with them (a damaged "
                              f"chunk); 'python -m store verify' lists every damaged case")
        return out, label

    def label(self, region=None) -> np.ndarray:
        """uint8 (X, Y, Z) in the store's label convention."""
        if "label" not in self._group:
            raise KeyError(f"case {self.case_id} has no label")
        return self._reader("label").read(self._region(region)).astype(np.uint8, copy=False)

    def label_into(self, out: np.ndarray, region=None, at=(0, 0, 0), fetched=None) -> np.ndarray:
        """Write ``region`` of the label into the uint8 array ``out`` at offset ``at``; the rest is left as it
        is. Returns ``out``."""
        if "label" not in self._group:
            raise KeyError(f"case {self.case_id} has no label")
        return self._reader("label").read_into(self._region(region), out, at, fetched)

    @property
    def has_label(self) -> bool:
        return "label" in self._group

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
        """The raw zarr arrays (for verification and fast readers)."""
        return {k: self._group[k] for k in ("image", "label", "foreground") if k in self._group}

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
        group = _open_group(path, mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise FileNotFoundError(f"no zarr group at {path}") from e
    except (ValueError, KeyError, TypeError) as e:  # a root zarr.json cut short or garbled
        raise FormatError(f"store {path}: its root metadata (zarr.json) is damaged and cannot be read "
                          f"({type(e).__name__}); rebuild the store with --overwrite") from None
    return Store(path, group)


# ----------------------------------------------------------------------------------------------- writing


LOCK_KEY = ".build.lock"
LOCK_LEASE_S = 900.0  # a lock on an object store not renewed for this long belongs to a build that is gone


class StoreWriter:
    """The build's side of the store: create it, publish cases, record splits and failures.

    Only the process driving a build writes the root metadata; workers write case groups (``write_case``).
    The root's ``index``, ``splits`` and ``failures`` are written together, in one atomic write of the root
    metadata (``commit``), so a store killed or out of space at any point verifies. One build at a time: a lock
    object (``.build.lock``) names the holder's host and process; a lock whose process is gone (same host), or
    whose lease ran out (another host, object stores), is taken over. Use as a context manager, or ``close()``.
    """

    def __init__(self, path: str | Path, modalities, label_convention: str | None, params: dict,
                 overwrite: bool = False):
        import zarr

        self.path = str(path)
        self.location = Location(self.path)
        self.location.check_reachable()
        self._locked = False
        exists = _exists(self.path)
        if self.location.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if exists and overwrite:
                self.location.clear(keep=(LOCK_KEY,))
                exists = False
            if exists:
                group = _open_group(self.path, "r+")
                attrs = dict(group.attrs)
                try:
                    detect(attrs)
                except FormatError as e:
                    raise FormatError(f"{self.path}: {e}; pass --overwrite to replace it") from e
                if attrs["params"] != params:
                    diff = {k: (attrs["params"].get(k), params.get(k)) for k in set(attrs["params"]) | set(params)
                            if attrs["params"].get(k) != params.get(k)}
                    raise FormatError(
                        f"store {self.path} was built with other parameters "
                        + ", ".join(f"{k}: {a!r} here, {b!r} now" for k, (a, b) in sorted(diff.items()))
                        + "; pass --overwrite to rebuild it"
                    )
                if label_convention and attrs["label_convention"] and not (
                        compatible(attrs["label_convention"], label_convention)
                        or compatible(label_convention, attrs["label_convention"])):
                    raise FormatError(f"store {self.path} holds {attrs['label_convention']} labels, the source is "
                                      f"{label_convention}; pass --overwrite to rebuild it")
                self.group = group
                self.attrs = attrs
                if label_convention and attrs["label_convention"] is None:
                    self._write_root(label_convention=label_convention)
            else:
                self.attrs = {
                    "format": FORMAT_NAME,
                    "format_version": CURRENT.version,
                    "modalities": list(modalities),
                    "label_convention": label_convention,
                    "params": params,
                    "index": {},
                    "failures": {},
                    "splits": {},
                }
                if self.location.zip:
                    self.group = zarr.open_group(_zarr_store(self.path, "w"), mode="w", zarr_format=3)
                    self.group.attrs.put(self.attrs)
                else:  # the root metadata complete in one write: a store is never seen half-made
                    root = {"zarr_format": 3, "node_type": "group", "attributes": self.attrs}
                    self.location.write_atomic("zarr.json", json.dumps(root, indent=2).encode())
                    self.group = _open_group(self.path, "r+")
                self.group.require_group(CASES_GROUP)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ the lock

    def _lock(self) -> None:
        import json as _json
        import socket
        import time

        if self.location.zip:  # a zip file takes no lock object; zip stores are for finished, read-only use
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "renewed": time.time()}
        for _ in range(2):
            if self.location.create_exclusive(LOCK_KEY, _json.dumps(me).encode()):
                self._locked = True
                return
            try:
                holder = _json.loads(self.location.read_bytes(LOCK_KEY))
            except (OSError, ValueError):
                holder = {}
            if not _stale(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise FormatError(f"store {self.path} is being built by process {holder.get('pid')} on "
                                  f"{holder.get('host')} since {since}; wait for that build to end (a lock left by "
                                  f"a build that is gone is taken over by itself)")
            self.location.remove(LOCK_KEY)  # its holder is gone
        raise FormatError(f"store {self.path}: could not take the build lock {LOCK_KEY}")

    def _renew(self) -> None:
        """Object stores: a running build renews its lease at every commit."""
        if self._locked and self.location.remote:
            import json as _json
            import time

            holder = _json.loads(self.location.read_bytes(LOCK_KEY))
            holder["renewed"] = time.time()
            self.location.write_atomic(LOCK_KEY, _json.dumps(holder).encode())

    def close(self) -> None:
        """Release the build lock."""
        if self._locked:
            with contextlib.suppress(OSError):
                self.location.remove(LOCK_KEY)
            self._locked = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ root metadata

    def _write_root(self, **changes) -> None:
        """Change root attributes in one atomic write of the root metadata (zarr.json): a local store's file is
        written aside and renamed over (whatever zarr version is installed), an object store's is one PUT."""
        attrs = {**self.attrs, **changes}
        if self.location.zip:
            self.group.attrs.update(changes)
        else:
            meta = json.loads(self.location.read_bytes("zarr.json"))
            meta["attributes"] = attrs
            self.location.write_atomic("zarr.json", json.dumps(meta, indent=2).encode())
        self.attrs = attrs

    @property
    def index(self) -> dict:
        return dict(self.attrs["index"])

    @property
    def splits(self) -> dict:
        return dict(self.attrs.get("splits") or {})

    def admit_convention(self, convention: str | None) -> None:
        """Before publishing a case labelled in ``convention``: the store's convention becomes the one that
        supersedes its own where the case needs it (BraTS 2023 -> 2024: every 2023 label map stays valid)."""
        current = self.attrs["label_convention"]
        if convention is None or convention == current or (current and compatible(current, convention)):
            return
        if current and not compatible(convention, current):
            raise FormatError(f"store {self.path} holds {current} labels, a case has {convention} labels")
        self._write_root(label_convention=convention)

    def commit(self, index: dict, splits: dict, failures: dict) -> None:
        """Publish ``index`` with its ``splits`` and the ``failures`` report: one atomic write, so they always
        agree. Then drop the case groups the new index no longer names."""
        old = self.index
        self._write_root(index=index, splits=splits, failures=failures)
        self._renew()
        live = {rec["group"] for rec in index.values()}
        for rec in old.values():
            if rec["group"] not in live:
                self._delete_case_group(rec["group"])

    def publish(self, case_id: str, record: dict, splits: dict | None = None) -> None:
        """Make a written case visible (with ``splits`` covering the new index, where given), then drop the
        version it replaced."""
        index = {**self.index, case_id: record}
        self.commit(index, splits if splits is not None else self.splits, self.attrs.get("failures", {}))

    def unpublish(self, case_id: str, splits: dict | None = None) -> None:
        index = self.index
        if index.pop(case_id, None) is not None:
            self.commit(index, splits if splits is not None else self.splits, self.attrs.get("failures", {}))

    def set_failures(self, failures: dict) -> None:
        self._write_root(failures=failures)

    def set_splits(self, splits: dict) -> None:
        self._write_root(splits=splits)

    def set_source(self, source: str) -> None:
        self._write_root(source=source)

    def _delete_case_group(self, group_path: str) -> None:
        if self.location.zip:
            _delete_group(self.group, group_path)
        else:
            self.location.remove(group_path)

    def collect_garbage(self) -> list[str]:
        """Remove case groups no index entry names (left by a build killed mid-case), also a group killed
        before its metadata was written (which zarr does not list)."""
        published = {rec["group"] for rec in self.index.values()}
        if self.location.zip:
            names = list(self.group.require_group(CASES_GROUP).group_keys())
        else:
            names = sorted({k.split("/", 1)[0] for k in self.location.sizes(CASES_GROUP) if "/" in k})
            if self.location.local and self.location.local_path(CASES_GROUP).is_dir():
                names = sorted(set(names) | {p.name for p in self.location.local_path(CASES_GROUP).iterdir()
                                             if p.is_dir()})
        removed = []
        for name in names:
            path = f"{CASES_GROUP}/{name}"
            if path not in published:
                self._delete_case_group(path)
                removed.append(name)
        if self.location.local:  # a root-metadata write killed before its rename
            for tmp in Path(self.path).glob(".zarr.json.tmp*"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp.name)
        return removed


def _stale(holder: dict) -> bool:
    """A build lock whose holder is gone: the same host and no such process, or a lease not renewed lately."""
    import socket
    import time

    if not holder:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
        return False
    return time.time() - float(holder.get("renewed", 0)) > LOCK_LEASE_S


def _exists(path: str) -> bool:
    loc = Location(path)
    if not loc.zip:
        return loc.exists("zarr.json")
    try:
        _open_group(path, "r")
        return True
    except Exception:
        return False


def _delete_group(root, path: str) -> None:
    with contextlib.suppress(KeyError):
        del root[path]


def ome_metadata(attrs: dict, has_label: bool) -> dict:
    """OME-Zarr (NGFF 0.5) multiscales of a case group, so viewers (napari, neuroglancer) place its arrays in
    RAS millimetres: one level each, ``image`` on axes c, x, y, z and ``label`` on x, y, z, scale = the stored
    spacing, translation = the stored grid's origin (its affine is axis-aligned RAS: world = origin + index *
    spacing)."""
    spacing = [float(v) for v in attrs["spacing_mm"]]
    origin = [float(row[3]) for row in attrs["stored_affine"][:3]]
    space = [{"name": n, "type": "space", "unit": "millimeter"} for n in "xyz"]

    def level(path: str, axes: list, scale: list, translation: list) -> dict:
        return {"name": path, "axes": axes, "datasets": [{"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]}]}

    multiscales = [level("image", [{"name": "c", "type": "channel"}, *space], [1.0, *spacing], [0.0, *origin])]
    if has_label:
        multiscales.append(level("label", space, spacing, origin))
    return {"version": "0.5", "multiscales": multiscales}


def case_group_name(case_id: str, token: str) -> str:
    return f"{CASES_GROUP}/{case_id}.{token}"


def write_case(store_path: str, group_name: str, image: EncodedImage, label: np.ndarray | None,
               foreground: np.ndarray, record) -> dict:
    """Write one case's arrays and attributes under ``group_name`` (not yet visible: see ``publish``).

    ``image``: the case's image in the store's encoding (``encode_image``, ``encode_integer_source``). The
    returned attributes carry the scale and the content hash that ``verify`` checks. In a local store the
    files are written directly (``fastwrite``): a group of about ten files (one shard per image channel, one for
    the label); on object storage the same objects, one PUT each; in a zip through zarr.
    """
    from .fastwrite import array_metadata, array_objects, shard_shape, write_array, write_array_zarr

    record.validate()  # a store.records.CaseRecord
    attrs = record.to_attrs()
    fmt = CURRENT
    img16, scale = image
    chunks = tuple(min(c, s) for c, s in zip(fmt.image_chunks, img16.shape))
    arrays = {"image": (img16, array_metadata(img16.shape, img16.dtype, chunks, fmt.codec,
                                              shards=(1, *shard_shape(img16.shape[1:], chunks[1:])),
                                              dimension_names=["c", "x", "y", "z"]))}
    if label is not None:
        lchunks = tuple(min(c, s) for c, s in zip(fmt.label_chunks, label.shape))
        arrays["label"] = (label, array_metadata(label.shape, np.uint8, lchunks, fmt.codec,
                                                 shards=shard_shape(label.shape, lchunks),
                                                 dimension_names=["x", "y", "z"]))
    fg = np.ascontiguousarray(foreground, dtype=np.int32).reshape(-1, 4)
    arrays["foreground"] = (fg, array_metadata(fg.shape, np.int32, (max(len(fg), 1), 4), fmt.codec))
    checked = [arrays["image"][0]] + ([label] if label is not None else [])
    attrs = dict(attrs, content_crc32=content_checksum(*checked), shape=list(img16.shape[1:]), image_scale=scale)
    attrs = json.loads(json.dumps(attrs))
    attrs["ome"] = ome_metadata(attrs, label is not None)
    loc = Location(store_path)
    if loc.local:
        folder = Path(store_path, group_name)
        if folder.exists():
            shutil.rmtree(folder)  # a leftover of a killed build
        folder.mkdir(parents=True)
        # the group first: a build killed from here on leaves a group the next build's garbage collection finds
        (folder / "zarr.json").write_text(json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"},
                                                     indent=2))
        for name, (data, meta) in arrays.items():
            write_array(folder / name, meta, data)
    elif loc.remote:  # the same objects, one PUT each: a shard per channel, not a request per chunk
        loc.remove(group_name)  # a leftover of a killed build
        loc.write_atomic(f"{group_name}/zarr.json", json.dumps({"attributes": attrs, "zarr_format": 3,
                                                                 "node_type": "group"}, indent=2).encode())
        for name, (data, meta) in arrays.items():
            for key, b in array_objects(meta, data):
                loc.write_atomic(f"{group_name}/{name}/{key}", b)
    else:
        import zarr

        root = zarr.open_group(_zarr_store(store_path, "r+"), mode="r+", zarr_format=3)
        if group_name in root:
            _delete_group(root, group_name)  # a leftover of a killed build
        g = root.create_group(group_name, attributes=attrs)
        for name, (data, meta) in arrays.items():
            write_array_zarr(g, name, meta, data)
    if loc.zip:
        return attrs
    # what was written, so a reader can tell a missing or cut object from an all-zero chunk (never written)
    objects = {k: v for k, v in sorted(loc.sizes(group_name).items()) if not k.endswith("zarr.json")}
    meta = json.loads(loc.read_bytes(f"{group_name}/zarr.json"))
    meta["attributes"] = attrs = {**attrs, "objects": objects}
    loc.write_atomic(f"{group_name}/zarr.json", json.dumps(meta, indent=2).encode())
    return attrs


__all__ = ["MODALITIES", "Case", "EncodedImage", "Store", "StoreWriter", "case_group_name", "content_checksum",
           "encode_image", "encode_integer_source", "open_store", "write_case"]
