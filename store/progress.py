"""Progress of long work: tqdm's bar on a terminal; in a log file or a pipe, plain lines (one per case, or none
where the caller prints its own line per epoch) with the figures the bar shows, never carriage-return frames."""

from __future__ import annotations

import sys
import time


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where tqdm writes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The part of tqdm's interface the project uses (``update``, ``set_postfix``, ``close``), written as one
    line per update: "<desc>: <n>/<total> <unit>s in <s> s (<rate>)[, postfix]". A postfix set right after an
    update goes on that update's line."""

    def __init__(self, total: int | None, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix, self._pending = 0, {}, False
        self._stream = stream
        self._t0 = time.perf_counter()

    def _write(self) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = f"{self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 and self.n >= 1 else "-"
        total = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(f"{self.desc}: {self.n}{total} {self.unit}s in {elapsed:.1f} s ({rate}){extra}\n")
        stream.flush()
        self._pending = False

    def update(self, n: int = 1) -> None:
        if self._pending:
            self._write()
        self.n += n
        self._pending = True

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        if self._pending:
            self._write()

    def close(self) -> None:
        if self._pending:
            self._write()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, lines: bool = True, **tqdm_kwargs):
    """A tqdm bar on a terminal; elsewhere ``LineProgress`` (``lines``) or nothing (a caller that prints its own
    line, as training does per epoch). ``enabled`` False: nothing anywhere."""
    from tqdm import tqdm

    if enabled and on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs)
    if enabled and lines:
        return LineProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=True)
