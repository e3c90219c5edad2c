"""Inference pipelined over cases: the next cases are read and preprocessed in a thread while the model works on
the current one, and finished cases are written (resampled to the source grid, saved, scored) in another, so that
on a GPU the device, not the CPU, sets the pace. A case that fails at any stage is reported; the others go on."""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import Future, ThreadPoolExecutor


def run_pipeline(items, load, infer, finish, prefetch: int = 2, on_done=None) -> list:
    """For each item: ``loaded = load(item)`` (loader thread, ``prefetch`` items ahead), ``out = infer(loaded)``
    (this thread), ``finish(item, loaded, out)`` (writer thread, at most ``prefetch`` waiting). Returns
    [(item, exception)] for the items that failed; ``on_done(item, error or None)`` is called as each ends."""
    failures: list = []

    def done(item, error=None):
        if error is not None:
            failures.append((item, error))
        if on_done is not None:
            on_done(item, error)

    with ThreadPoolExecutor(1, thread_name_prefix="load") as loader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        it = iter(items)
        pending: collections.deque = collections.deque(
            (item, loader.submit(load, item)) for item in itertools.islice(it, max(prefetch, 1)))
        writing: collections.deque[tuple[object, Future]] = collections.deque()

        def settle(block_above: int) -> None:
            while writing and (writing[0][1].done() or len(writing) > block_above):
                item, fut = writing.popleft()
                try:
                    fut.result()
                    done(item)
                except Exception as e:
                    done(item, e)

        while pending:
            item, fut = pending.popleft()
            for nxt in itertools.islice(it, 1):
                pending.append((nxt, loader.submit(load, nxt)))
            try:
                loaded = fut.result()
                out = infer(loaded)
            except Exception as e:
                done(item, e)
                continue
            writing.append((item, writer.submit(finish, item, loaded, out)))
            settle(block_above=prefetch)  # never more than ``prefetch`` finished cases held in memory
        settle(block_above=0)
    return failures
