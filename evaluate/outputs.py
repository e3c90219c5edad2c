"""Where the commands that write predictions and reports may write: never into what they read, never over a file
they were not asked to replace, and only where writing works. Each check runs before any work and fails in one
line naming the path and the flag (an ``OutputError``)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


class OutputError(ValueError):
    """An output that would overwrite an input or an existing file, or that cannot be written; names the path."""


def refuse_inside(out: str | Path, flag: str, inputs: dict) -> Path:
    """``out`` resolved through links; an OutputError where it is one of ``inputs`` ({flag: path}) or lies inside
    one of them (a prediction written into the cohort would sit beside, or replace, its reference)."""
    dst = Path(out).resolve()
    for name, src in inputs.items():
        if src is None:
            continue
        s = Path(src).resolve()
        if dst == s or s in dst.parents:
            raise OutputError(f"{flag} {out} lies inside {name} {src} (through links: {dst}): the command never "
                              f"writes into what it reads; choose a path outside it")
    return dst


def writable_folder(folder: str | Path, flag: str) -> Path:
    """``folder`` created where missing and a file written and removed in it: an OutputError naming it where that
    fails (read-only, a file in the way, no permission), before any case is read."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: a file, not a folder")
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{flag} {folder}: cannot be written ({e.strerror or type(e).__name__})") from None
    return folder


def refuse_existing(paths, flag: str) -> None:
    """An OutputError naming the first of ``paths`` that exists: a file this command would replace, which only
    ``--overwrite`` allows."""
    there = [Path(p) for p in paths if os.path.lexists(p)]
    if there:
        more = f" and {len(there) - 1} more" if len(there) > 1 else ""
        raise OutputError(f"{flag}: {there[0]}{more} already exist(s); pass --overwrite to replace what is there")


def kept_note(kept: list, folder: str | Path) -> str:
    """The log line for output files that were already there and were left as they are."""
    names = ", ".join(sorted(str(k) for k in kept)[:5]) + (", ..." if len(kept) > 5 else "")
    return f"kept {len(kept)} file(s) already in {folder}, not replaced (--overwrite replaces them): {names}"
