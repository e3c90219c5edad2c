"""What the figures were measured on: CPU, cores, GPU, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
        "versions": {},
    }
    for pkg in ("torch", "monai", "numpy", "zarr", "numcodecs", "dask", "nibabel"):
        try:
            info["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info["versions"][pkg] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (every core, every process: /proc/stat less idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Load:
    """The machine's load while a block runs, measured: the 1-minute load average sampled every ``every`` seconds,
    and the CPU seconds spent by processes other than this one and its finished children (the machine's busy time
    less ours: /proc/stat against getrusage)."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples = every, []

    def _ours(self) -> float:
        import resource

        return sum(sum(resource.getrusage(w)[:2]) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        import threading
        import time

        self._stop, self._t0 = threading.Event(), time.perf_counter()
        self._busy0, self._ours0 = _busy_s(), self._ours()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import time

        self._stop.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self._t0
        busy = _busy_s()
        self.busy_s = None if busy is None or self._busy0 is None else busy - self._busy0
        self.ours_s = self._ours() - self._ours0
        return False

    def summary(self) -> dict:
        s = sorted(self.samples)
        others = None if self.busy_s is None else max(0.0, self.busy_s - self.ours_s)
        return {"wall_s": self.wall_s, "loadavg_1min_median": s[len(s) // 2] if s else None,
                "loadavg_1min_max": s[-1] if s else None, "samples": len(s), "cores": os.cpu_count(),
                "machine_busy_cpu_s": self.busy_s, "our_cpu_s": self.ours_s, "other_processes_cpu_s": others,
                "other_processes_share_of_machine": None if others is None else
                others / (self.wall_s * (os.cpu_count() or 1))}
