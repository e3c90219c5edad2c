"""Process-wide settings a benchmark needs (thread counts, RNG seeds), set for its own scope only, so that one
stage's settings never change the next stage's figures (``python -m benchmarks all`` runs them in one process)."""

from __future__ import annotations

import contextlib
import random


def settings() -> dict:
    """What a benchmark could leave changed: torch's intra-op threads, threadpoolctl's limits per library."""
    import torch

    out = {"torch_threads": torch.get_num_threads()}
    try:
        from threadpoolctl import threadpool_info

        out["threadpools"] = sorted((p["internal_api"], p["filepath"], p["num_threads"]) for p in threadpool_info())
    except ImportError:
        pass
    return out


def changed(before: dict, after: dict) -> dict:
    """The settings of ``before`` that differ in ``after`` (a library loaded meanwhile, at its defaults, is no
    change): {name: (before, after)}."""
    out = {}
    if before["torch_threads"] != after["torch_threads"]:
        out["torch_threads"] = (before["torch_threads"], after["torch_threads"])
    now = {(api, path): n for api, path, n in after.get("threadpools", [])}
    for api, path, n in before.get("threadpools", []):
        if now.get((api, path), n) != n:
            out[f"{api} {path}"] = (n, now[(api, path)])
    return out


@contextlib.contextmanager
def isolated(threads: int | None = None, seed: int | None = None):
    """Inside: ``threads`` for torch and every threadpoolctl-managed pool (BLAS, OpenMP) where given, RNGs seeded
    with ``seed`` where given; outside, everything as it was before (RNG states included)."""
    import numpy as np
    import torch

    saved_threads = torch.get_num_threads()
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    limits = contextlib.nullcontext()
    if threads is not None:
        try:
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(threads)  # restores the previous limits when it exits
        except ImportError:
            pass
    try:
        with limits:
            if threads is not None:
                torch.set_num_threads(threads)
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed)
                random.seed(seed)
            yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
