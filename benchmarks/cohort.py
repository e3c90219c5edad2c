"""Benchmark inputs: a synthetic cohort and its store, made once per size and reused by every benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# size -> (grid, cases, patch, UNet channels). "full" is BraTS size; "quick" finishes the suite in minutes on
# 2 cores; "tiny" is for the tests.
SIZES = {
    "full": ((240, 240, 155), 8, (128, 128, 128), (16, 32, 64, 128, 256)),
    "quick": ((96, 96, 62), 4, (48, 48, 48), (16, 32, 64, 128, 256)),
    "tiny": ((40, 40, 28), 3, (16, 16, 16), (4, 8, 16)),
}


@dataclass(frozen=True)
class Bench:
    size: str
    root: Path
    shape: tuple[int, int, int]
    cases: int
    patch: tuple[int, int, int]
    channels: tuple[int, ...]

    @property
    def spacing(self) -> tuple[float, float, float]:
        from prep.synth import FOV_MM

        return tuple(f / s for f, s in zip(FOV_MM, self.shape))

    @property
    def raw(self) -> Path:
        return self.root / f"raw-{self.size}"

    @property
    def store(self) -> str:
        return str(self.root / f"store-{self.size}.zarr")


def bench_inputs(root: str | Path, size: str) -> Bench:
    """Synthesize the cohort and build its store at its own voxel size (no resampling) unless already there."""
    from prep.build import BuildConfig, build_store
    from prep.synth import SynthConfig, synth_cohort

    shape, n, patch, channels = SIZES[size]
    b = Bench(size, Path(root), shape, n, patch, channels)
    if not (b.raw / "done").exists():
        synth_cohort(SynthConfig(out=b.raw, cases=n, seed=31, shape=shape, workers=2 if size != "tiny" else 1),
                     progress=False)
        (b.raw / "done").write_text("")
    from .report import cohort_record

    cohort_record(b.raw)
    if not Path(b.store, "zarr.json").exists():
        rep = build_store(BuildConfig(source=str(b.raw), store=b.store, workers=0, spacing=b.spacing),
                          progress=False)
        if not rep.ok:
            raise RuntimeError(f"benchmark store build failed: {rep.failed}")
    return b
