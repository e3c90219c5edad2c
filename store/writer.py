"""Writing the Zarr v3 store (FORMAT.md): ``StoreWriter``, the build's side (the root metadata, the build lock,
garbage collection), and ``write_case``, which a worker calls to write one case group aside before the build
publishes it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .conventions import compatible
from .encoding import EncodedImage, content_checksum
from .format import CASES_GROUP, CURRENT, FORMAT_NAME, FormatError, detect
from .location import Location
from .ome import label_layer, ome_metadata
from .reader import open_group, zarr_store

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
                group = open_group(self.path, "r+")
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
                    self.group = zarr.open_group(zarr_store(self.path, "w"), mode="w", zarr_format=3)
                    self.group.attrs.put(self.attrs)
                else:  # the root metadata complete in one write: a store is never seen half-made
                    root = {"zarr_format": 3, "node_type": "group", "attributes": self.attrs}
                    self.location.write_atomic("zarr.json", json.dumps(root, indent=2).encode())
                    self.group = open_group(self.path, "r+")
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
        open_group(path, "r")
        return True
    except Exception:
        return False


def _delete_group(root, path: str) -> None:
    with contextlib.suppress(KeyError):
        del root[path]


def _group_json(attrs: dict) -> str:
    return json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"}, indent=2)


def case_group_name(case_id: str, token: str) -> str:
    return f"{CASES_GROUP}/{case_id}.{token}"


def write_case(store_path: str, group_name: str, image: EncodedImage, label: np.ndarray | None,
               foreground: np.ndarray, record) -> dict:
    """Write one case's arrays and attributes under ``group_name`` (not yet visible: see ``publish``).

    ``image``: the case's image (C, X, Y, Z) in the store's encoding (``encode_image``, ``encode_integer_source``);
    ``label``: uint8 (X, Y, Z) or None; ``foreground``: int32 (N, 4) region index, x, y, z of sampled voxels. The
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
        arrays[fmt.label_path] = (label, array_metadata(label.shape, np.uint8, lchunks, fmt.codec,
                                                 shards=shard_shape(label.shape, lchunks),
                                                 dimension_names=["x", "y", "z"]))
    fg = np.ascontiguousarray(foreground, dtype=np.int32).reshape(-1, 4)
    arrays["foreground"] = (fg, array_metadata(fg.shape, np.int32, (max(len(fg), 1), 4), fmt.codec))
    checked = [arrays["image"][0]] + ([label] if label is not None else [])
    attrs = dict(attrs, content_crc32=content_checksum(*checked), shape=list(img16.shape[1:]), image_scale=scale)
    attrs = json.loads(json.dumps(attrs))
    attrs["ome"] = ome_metadata(attrs, label is not None and not fmt.label_layer)
    # the groups between the case and its label array: the OME-Zarr label layer (store.ome.label_layer)
    groups = {k: {"ome": v} for k, v in label_layer(attrs, fmt.label_layer).items()} \
        if label is not None and fmt.label_layer else {}
    loc = Location(store_path)
    if loc.local:
        folder = Path(store_path, group_name)
        if folder.exists():
            shutil.rmtree(folder)  # a leftover of a killed build
        folder.mkdir(parents=True)
        # the group first: a build killed from here on leaves a group the next build's garbage collection finds
        (folder / "zarr.json").write_text(_group_json(attrs))
        for path, group_attrs in groups.items():
            (folder / path).mkdir(parents=True)
            (folder / path / "zarr.json").write_text(_group_json(group_attrs))
        for name, (data, meta) in arrays.items():
            write_array(folder / name, meta, data)
    elif loc.remote:  # the same objects, one PUT each: a shard per channel, not a request per chunk
        loc.remove(group_name)  # a leftover of a killed build
        loc.write_atomic(f"{group_name}/zarr.json", _group_json(attrs).encode())
        for path, group_attrs in groups.items():
            loc.write_atomic(f"{group_name}/{path}/zarr.json", _group_json(group_attrs).encode())
        for name, (data, meta) in arrays.items():
            for key, b in array_objects(meta, data):
                loc.write_atomic(f"{group_name}/{name}/{key}", b)
    else:
        import zarr

        root = zarr.open_group(zarr_store(store_path, "r+"), mode="r+", zarr_format=3)
        if group_name in root:
            _delete_group(root, group_name)  # a leftover of a killed build
        g = root.create_group(group_name, attributes=attrs)
        for path, group_attrs in groups.items():
            g.create_group(path, attributes=group_attrs)
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


__all__ = ["StoreWriter", "case_group_name", "write_case"]
