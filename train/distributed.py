"""Every distributed concern of training in one place: which rank this is, which ranks share its node, how the
cohort is shared out, and collectives that end with a clear error instead of waiting forever.

torchrun numbers ranks node by node (node ``n`` holds ranks ``n * local_world ... n * local_world +
local_world - 1``), which is how ``node_ranks`` finds the ranks whose caches share this node's memory.
Every rank makes the same collective calls in the same order, whatever the cohort size: the trainer runs a
fixed number of steps per epoch and one reduction per validation, so no rank can wait on a call another never
makes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import sys
from dataclasses import dataclass

import torch


class CollectiveError(RuntimeError):
    """A collective that did not complete: another rank died, diverged or is stuck."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    timeout_s: float = 300.0
    position: str = "start-up"  # where this rank is, for error messages: "epoch 3, step 2/5"

    @classmethod
    def from_env(cls, timeout_s: float = 300.0) -> Dist:
        """The launch torchrun describes in the environment (one process when it is absent)."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))), timeout_s=timeout_s)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes checkpoints, logs and reports."""
        return self.rank == 0

    @property
    def node_ranks(self) -> range:
        first = (self.rank // self.local_world) * self.local_world
        return range(first, min(first + self.local_world, self.world))

    def init(self, use_cuda: bool) -> None:
        """Join the process group (nccl with CUDA, else gloo), every collective bounded by ``timeout_s``."""
        if not self.enabled or torch.distributed.is_initialized():
            return
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo",
                                             timeout=datetime.timedelta(seconds=self.timeout_s))

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------------------------------ sharing work

    def shard(self, ids: list, rank: int | None = None) -> list:
        """The training cases ``rank`` caches and samples from: every ``world``-th case, so the node's ranks
        hold each case once between them (shards differ in length by one at most; every rank still runs the
        same number of steps, which the trainer fixes, not the shard). A rank left without a case (more ranks
        than cases) borrows one. One process: every id, in order."""
        rank = self.rank if rank is None else rank
        if not ids:
            return []
        return ids[rank::self.world] or [ids[rank % len(ids)]]

    def share(self, ids: list) -> list:
        """This rank's part of ``ids``, possibly empty (validation: every case scored exactly once overall)."""
        return ids[self.rank::self.world]

    # ------------------------------------------------------------------------------------------ collectives

    def sum(self, values, what: str, device=None) -> list[float]:
        """Element-wise sum of ``values`` over every rank (float64), as plain floats."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        if self.enabled:
            self._run(lambda: torch.distributed.all_reduce(t), what)
        return t.cpu().tolist()

    def _run(self, call, what: str) -> None:
        try:
            call()
        except RuntimeError as e:  # gloo and nccl report timeouts and lost peers as RuntimeError subclasses
            raise CollectiveError(self.describe_failure(what, e)) from e

    def describe_failure(self, what: str, error: BaseException) -> str:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"rank {self.rank} of {self.world}: {what} at {self.position} did not complete within "
                f"--dist-timeout {self.timeout_s:g} s (another rank stopped, failed or is stuck); {first}. "
                f"Continue with --resume once the cause is fixed")


def available_memory_bytes() -> int | None:
    """Memory the kernel reports as available for new allocations (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    """This process's resident memory now (from /proc/self/statm), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@contextlib.contextmanager
def heap_returned_to_os():
    """While filling a cache, give the temporary buffers of decoding back to the system when they are freed.

    glibc raises its mmap threshold each time a large block is freed, so after a few chunks every decode buffer
    comes from the heap and stays resident once freed: a hundred or more megabytes a process that the cache does
    not use, paid again by every rank on a node. A fixed threshold of 2 MiB keeps the larger buffers mmapped
    (returned on free); blosc's scratch, allocated and freed on every chunk it decompresses (between 1 and 2 MiB
    for the store's 64^3 chunks), stays below it and is reused from the heap: mapped and faulted in anew per
    chunk it made a cache fill a third slower. Afterwards the free heap is trimmed (what the fill left there goes
    back) and the threshold set to glibc's own ceiling, as the dynamic threshold would have become. Nothing is
    done where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 2 * 1024 * 1024)
    try:
        yield
    finally:
        malloc_trim(0)
        mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long))


def end_process(code: int) -> None:
    """End this process with ``code``. A rank of a torchrun launch (WORLD_SIZE > 1) ends without the interpreter's
    finalization, its output flushed and its work closed already: there a gloo rank now and then aborted in a C++
    destructor ('terminate called without an active exception', no Python frame left) after finishing, and
    torchrun then reports the whole run failed (seen about 1 run in 10 with the machine busy)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(code)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
