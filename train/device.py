"""The device a run computes on and its precision: CUDA or the CPU, bf16 or fp16 autocast where ``--amp`` asks
for it and the hardware has it."""

from __future__ import annotations

import contextlib

import torch

from .config import TrainConfig
from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated
    and several times slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_context(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, GradScaler or None, description)."""
    if not cfg.amp:
        return contextlib.nullcontext, None, "float32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None, "bf16 autocast (CUDA)"
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda"), \
            "fp16 autocast + GradScaler (CUDA)"
    if cpu_has_bf16():
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None, "bf16 autocast (CPU)"
    return contextlib.nullcontext, None, "float32: --amp asked for, but this CPU has no native bf16"
