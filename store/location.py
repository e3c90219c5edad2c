"""Where a store lives, decided once: a local folder, a zip file, or an fsspec URL (s3://..., memory://...).

Every place in ``store/`` that needs to know asks a ``Location`` (as ome-zarr-py's ZarrLocation does), never
the path's spelling. Keys are '/'-separated paths relative to the store's root.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class Location:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self.zip = self.path.endswith(".zip")
        self.remote = "://" in self.path and not self.path.startswith("file://")
        self.local = not self.zip and not self.remote
        if self.path.startswith("file://"):
            self.path = self.path[len("file://"):]
        self._fs = None

    def __repr__(self) -> str:
        return f"Location({self.path!r})"

    def check_available(self) -> None:
        """A one-line error where the package the URL's protocol needs is not installed."""
        if self.remote and self.path.startswith("s3://"):
            try:
                import s3fs  # noqa: F401
            except ImportError:
                raise ImportError(f"{self.path}: s3:// stores need s3fs, which is not installed: "
                                  f"pip install -e '.[s3]'") from None

    def check_reachable(self) -> None:
        """An object store's bucket answers: one-line errors for a bucket that does not exist, missing or wrong
        credentials, an endpoint that does not answer (messages never hold a credential)."""
        self.check_available()
        if not self.remote:
            return
        from .format import FormatError

        fs, root = self.fs
        bucket = root.split("/", 1)[0]
        try:
            ok = fs.exists(bucket)
            if not ok:  # exists() answers False for errors too: listing says which it was
                fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            ok = False
        except Exception as e:  # botocore's credential and connection errors, s3fs's PermissionError
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FormatError(f"{self.path}: the object store refused or did not answer ({type(e).__name__}: "
                              f"{first}); credentials come only from the standard AWS environment variables and "
                              f"config files") from None
        if not ok:
            raise FormatError(f"{self.path}: bucket {bucket} does not exist, or these credentials cannot see it")

    @property
    def fs(self):
        """The fsspec filesystem and root path of a remote store (credentials: only the standard AWS
        environment variables and config files, as boto reads them; nothing is passed or written here)."""
        if self._fs is None:
            self.check_available()
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.path)
        return self._fs

    def _remote(self, key: str) -> str:
        fs, root = self.fs
        return f"{root.rstrip('/')}/{key}" if key else root

    def key_path(self, key: str) -> str:
        """A key's path on the remote filesystem (``fs``'s own spelling, without the protocol)."""
        return self._remote(key)

    def local_path(self, key: str = "") -> Path:
        return Path(self.path, key) if key else Path(self.path)

    # ------------------------------------------------------------------------------------------ reading

    def exists(self, key: str) -> bool:
        if self.local:
            return self.local_path(key).exists()
        fs, _ = self.fs
        return fs.exists(self._remote(key))

    def read_bytes(self, key: str) -> bytes:
        if self.local:
            return self.local_path(key).read_bytes()
        fs, _ = self.fs
        return fs.cat_file(self._remote(key))

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix`` -> its size in bytes, keys relative to ``prefix`` (one listing)."""
        if self.local:
            base = self.local_path(prefix)
            out = {}
            for folder, _, files in os.walk(base):
                for f in files:
                    p = Path(folder, f)
                    out[p.relative_to(base).as_posix()] = p.stat().st_size
            return out
        fs, _ = self.fs
        base = self._remote(prefix).rstrip("/")
        fs.invalidate_cache(base)  # other processes (build workers) write here: list what is there now
        found = fs.find(base, detail=True)
        return {k[len(base) + 1:]: int(v["size"]) for k, v in found.items() if k.startswith(base + "/")}

    # ------------------------------------------------------------------------------------------ writing

    def write_atomic(self, key: str, data: bytes) -> None:
        """Replace ``key`` with ``data`` in one step: a reader sees the old or the new bytes, never a mix. A
        local file is written aside, flushed and renamed over (a full disk leaves the old file whole); an object
        store's PUT is atomic by itself."""
        if self.local:
            path = self.local_path(key)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return
        fs, _ = self.fs
        fs.pipe_file(self._remote(key), data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` holding ``data`` unless it exists; True when this call created it. Atomic on local
        filesystems (O_EXCL); on object stores a check then a write (a race of two starts within one request's
        time is not excluded there)."""
        if self.local:
            try:
                fd = os.open(self.local_path(key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.exists(key):
            return False
        self.write_atomic(key, data)
        return True

    def remove(self, key: str) -> None:
        if self.local:
            p = self.local_path(key)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            return
        fs, _ = self.fs
        if fs.exists(self._remote(key)):
            fs.rm(self._remote(key), recursive=True)

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in the store except the top-level entries named in ``keep``."""
        if self.zip:
            os.remove(self.path)
            return
        if self.local:
            for child in Path(self.path).iterdir():
                if child.name not in keep:
                    self.remove(child.name)
            return
        fs, _ = self.fs
        base = self._remote("").rstrip("/")
        for child in fs.ls(base, detail=False):
            if child.rstrip("/").rsplit("/", 1)[-1] not in keep:
                fs.rm(child, recursive=True)


def remote_file(path) -> tuple[Location, str] | None:
    """(the Location of its folder, its key) for a file at an object-storage URL; None for a local path."""
    if not Location(str(path)).remote:
        return None
    parent, name = str(path).rsplit("/", 1)
    return Location(parent), name


def describe_os_error(e: OSError, path) -> str:
    """One line for a filesystem error a user can cause: a full disk, a read-only filesystem, no permission."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device writing {path}"
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only filesystem"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {path}"
    return f"{path}: {e.strerror or e}"
