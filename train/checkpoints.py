"""Checkpoint files: written atomically (never half a file), loaded with ``weights_only=True`` (never code), and
the temporary files a killed save leaves swept away."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and why."""


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a checkpoint is never half-written, and a failed save (a
    full disk, say) leaves the previous checkpoint whole and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch reports a full disk as "unexpected pos ..."
            import shutil

            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(f"could not write checkpoint {path}: {_os_reason(e)} ({free / 2**20:.0f} MiB "
                                  f"free there); the previous checkpoint is kept") from None
        raise


def _os_reason(e: BaseException) -> str:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "unexpected pos" in str(e):
        return "no space left on device"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def sweep_temporary(run_dir: Path) -> list[Path]:
    """Remove temporary checkpoint files a killed save left (``.<name>.pt.tmp<pid>``)."""
    gone = []
    for f in run_dir.glob(".*.pt.tmp*"):
        f.unlink(missing_ok=True)
        gone.append(f)
    return gone


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, never code.

    A file holding anything else (a pickled object, possibly crafted to run code) is refused for safety, and a
    damaged file is named; neither error suggests loading it unsafely."""
    import pickle
    import zipfile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain containers; it was "
                              f"refused for safety (this project never loads code from a checkpoint)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
