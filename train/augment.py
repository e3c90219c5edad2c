"""Random augmentation of a whole batch on the device, with per-sample parameters.

The seed's set and probabilities, MONAI's definitions: RandRotate90 (p 0.5, k in 1..3, spatial axes 0, 1),
RandFlip on spatial axes 0 and 1 (p 0.5 each), RandScaleIntensity (factor U(-0.1, 0.1), p 0.25),
RandShiftIntensity (offset U(-0.1, 0.1), p 0.25), RandGaussianNoise (std U(0, 0.1), p 0.25),
RandBiasField (degree 2, coefficients U(0, 0.1), p 0.5). MONAI applies these to one sample at a time on the CPU;
here each transform draws its parameters for the whole batch from a seeded generator (``draw``), then applies
a deterministic function of them (``apply``) to the batch tensor where it lives, so every augmentation can be
repeated, logged and tested. Spatial transforms move image and label together; intensity transforms never
touch the label. Each class is named after MONAI's transform with Batch for Rand (BatchRotate90 for RandRotate90),
so that neither shadows the other where both are imported.

Tensors: image (B, C, X, Y, Z) float, label (B, L, X, Y, Z) any dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _coin(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) < p


class _Transform:
    """draw(n, generator) -> params; apply_(image, label, params) in place; apply(...) on copies. ``image`` is a
    float batch (B, C, X, Y, Z) of z-scores, ``label`` the uint8 batch (B, 1, X, Y, Z), both on the device; every
    transform's ``apply_`` takes and returns them so."""

    spatial = False

    def apply(self, image, label, params):
        """The transform with drawn ``params`` on copies of ``image`` (B, C, X, Y, Z) and ``label`` (B, 1, X, Y, Z)."""
        return self.apply_(image.clone(), label.clone(), params)


def _selected(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


@dataclass
class BatchRotate90(_Transform):
    prob: float = 0.5
    max_k: int = 3
    spatial_axes: tuple[int, int] = (0, 1)
    spatial = True

    def draw(self, n: int, g: torch.Generator) -> dict:
        k = torch.randint(1, self.max_k + 1, (n,), generator=g)
        return {"k": torch.where(_coin(g, n, self.prob), k, torch.zeros_like(k))}

    def compose(self, state: _Spatial, params: dict, i: int) -> None:
        state.rot90(int(params["k"][i]), self.spatial_axes)

    def apply_(self, image, label, params):
        return _apply_spatial([self], [params], image, label)


@dataclass
class BatchFlip(_Transform):
    spatial_axis: int
    prob: float = 0.5
    spatial = True

    def draw(self, n: int, g: torch.Generator) -> dict:
        return {"flip": _coin(g, n, self.prob)}

    def compose(self, state: _Spatial, params: dict, i: int) -> None:
        if bool(params["flip"][i]):
            state.flip(self.spatial_axis)

    def apply_(self, image, label, params):
        return _apply_spatial([self], [params], image, label)


@dataclass
class BatchScaleIntensity(_Transform):
    factors: float = 0.1
    prob: float = 0.25

    def draw(self, n: int, g: torch.Generator) -> dict:
        f = _uniform(g, n, -self.factors, self.factors)
        return {"factor": torch.where(_coin(g, n, self.prob), f, torch.zeros_like(f))}

    def apply_(self, image, label, params):
        for i in _selected(params["factor"] != 0):
            image[i].mul_(1 + float(params["factor"][i]))
        return image, label


@dataclass
class BatchShiftIntensity(_Transform):
    offsets: float = 0.1
    prob: float = 0.25

    def draw(self, n: int, g: torch.Generator) -> dict:
        o = _uniform(g, n, -self.offsets, self.offsets)
        return {"offset": torch.where(_coin(g, n, self.prob), o, torch.zeros_like(o))}

    def apply_(self, image, label, params):
        for i in _selected(params["offset"] != 0):
            image[i].add_(float(params["offset"][i]))
        return image, label


@dataclass
class BatchGaussianNoise(_Transform):
    """Noise N(0, s) with s drawn U(0, std) per sample (MONAI's sample_std); the noise itself comes from a
    device generator seeded by the drawn ``seed``, so it is generated where the batch lives, and only for the
    samples it applies to (the costliest draw of the set)."""

    std: float = 0.1
    prob: float = 0.25

    def draw(self, n: int, g: torch.Generator) -> dict:
        s = _uniform(g, n, 0.0, self.std)
        return {"std": torch.where(_coin(g, n, self.prob), s, torch.zeros_like(s)),
                "seed": int(torch.randint(0, 2**62, (1,), generator=g))}

    def apply_(self, image, label, params):
        sel = _selected(params["std"] > 0)
        if not sel:
            return image, label
        dg = torch.Generator(device=image.device).manual_seed(params["seed"])
        # one channel of noise at a time, drawn in place into one buffer: a fresh whole-sample tensor per draw
        # costs a page fault per 4 KiB on the CPU, about a quarter of the draw itself
        noise = torch.empty(image.shape[2:], device=image.device, dtype=image.dtype)
        for i in sel:
            for c in range(image.shape[1]):
                image[i, c].add_(noise.normal_(generator=dg), alpha=float(params["std"][i]))
        return image, label


def _legendre(n: int, degree: int, device, dtype) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree on linspace(-1, 1, n): (degree + 1, n)."""
    x = torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
    p = [torch.ones_like(x), x]
    for k in range(1, degree):
        p.append(((2 * k + 1) * x * p[k] - k * p[k - 1]) / (k + 1))
    return torch.stack(p[: degree + 1])


def bias_terms(degree: int) -> list[tuple[int, int, int]]:
    """The (i, j, k) Legendre orders of a 3D bias field, in MONAI's coefficient order (i + j + k <= degree)."""
    return [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]


def bias_field(coeffs: torch.Tensor, shape, degree: int = 2) -> torch.Tensor:
    """log bias fields (B, X, Y, Z) for coefficients (B, n_terms): sum_c coeff * P_i(x) P_j(y) P_k(z).

    Separable: z and y are contracted on the tiny coefficient tensor, x last as one batched matrix product, so
    the full-size result is written once and comes out contiguous."""
    px, py, pz = (_legendre(s, degree, coeffs.device, coeffs.dtype) for s in shape)
    terms = torch.tensor(bias_terms(degree), device=coeffs.device)
    d = degree + 1
    cm = torch.zeros((coeffs.shape[0], d, d, d), device=coeffs.device, dtype=coeffs.dtype)
    cm[:, terms[:, 0], terms[:, 1], terms[:, 2]] = coeffs
    g = torch.einsum("bijk,kz->bijz", cm, pz)
    g = torch.einsum("bijz,jy->biyz", g, py).reshape(coeffs.shape[0], d, -1)  # (B, d, Y * Z)
    return torch.matmul(px.T, g).view(coeffs.shape[0], *shape)


@dataclass
class BatchBiasField(_Transform):
    degree: int = 2
    coeff_range: tuple[float, float] = (0.0, 0.1)
    prob: float = 0.5

    def draw(self, n: int, g: torch.Generator) -> dict:
        n_terms = len(bias_terms(self.degree))
        c = self.coeff_range[0] + (self.coeff_range[1] - self.coeff_range[0]) * torch.rand(
            (n, n_terms), generator=g, dtype=torch.float64)
        on = _coin(g, n, self.prob)
        return {"coeffs": torch.where(on[:, None], c, torch.zeros_like(c)), "on": on}

    def apply_(self, image, label, params):
        sel = _selected(params["on"])
        if not sel:
            return image, label
        coeffs = params["coeffs"].to(device=image.device, dtype=torch.float32)
        for i in sel:  # one field at a time: a sample-sized buffer, not a batch-sized one
            field = bias_field(coeffs[i: i + 1], image.shape[2:], self.degree)[0].exp_()
            image[i].mul_(field.to(image.dtype))
        return image, label


class _Spatial:
    """A composition of flips and 90-degree rotations of the spatial axes, kept as one axis permutation plus
    flips, so a run of spatial transforms moves each voxel once: out = x.permute(perm).flip(flipped)."""

    def __init__(self):
        self.perm = [0, 1, 2]
        self.flips = [False, False, False]

    def flip(self, d: int) -> None:
        self.flips[d] = not self.flips[d]

    def _swap(self, a: int, b: int) -> None:
        self.perm[a], self.perm[b] = self.perm[b], self.perm[a]
        self.flips[a], self.flips[b] = self.flips[b], self.flips[a]

    def rot90(self, k: int, axes: tuple[int, int]) -> None:
        a, b = axes
        k %= 4
        if k == 1:  # torch.rot90(x, 1, (a, b)) == x.flip(b).transpose(a, b)
            self.flip(b)
            self._swap(a, b)
        elif k == 2:
            self.flip(a)
            self.flip(b)
        elif k == 3:  # == x.transpose(a, b).flip(b)
            self._swap(a, b)
            self.flip(b)

    @property
    def identity(self) -> bool:
        return self.perm == [0, 1, 2] and not any(self.flips)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to one sample (C, X, Y, Z): a new tensor."""
        y = x.permute(0, *(1 + p for p in self.perm))
        return self.copy_into(x, torch.empty(y.shape, dtype=x.dtype, device=x.device))

    def copy_into(self, x: torch.Tensor, out: torch.Tensor, slabs: bool | None = None) -> torch.Tensor:
        """Write the moved sample (C, X, Y, Z) into ``out`` (any dtype: a conversion rides on the same pass).

        torch.flip has no ``out=`` and allocates the whole sample, which on the CPU costs more than the copy
        (a page fault per 4 KiB). There (``slabs``, the default on the CPU) a flip of an outer axis is instead a
        loop of slab copies in reverse order, any further flip done per slab; only a flip of the innermost axis
        alone uses torch.flip. On a GPU the caching allocator makes the allocation free and each slab would be
        a kernel launch of its own, so one torch.flip does it."""
        y = x.permute(0, *(1 + p for p in self.perm))
        if tuple(y.shape) != tuple(out.shape):
            raise ValueError(f"BatchRotate90 on a batch needs square patches in the rotation plane, got "
                             f"{tuple(x.shape[1:])}")
        dims = [1 + d for d, f in enumerate(self.flips) if f]
        if not dims:
            return out.copy_(y)
        d0, rest = dims[0], [d - 1 for d in dims[1:]]  # ``rest`` as axes of a slab (axis d0 removed)
        if slabs is None:
            slabs = x.device.type == "cpu"
        if d0 == y.ndim - 1 or not slabs:
            return out.copy_(y.flip(dims))
        n = y.shape[d0]
        for k in range(n):
            src = y.select(d0, n - 1 - k)
            out.select(d0, k).copy_(src.flip(rest) if rest else src)
        return out


def _apply_spatial(transforms, params, image, label, out=None):
    """A run of spatial transforms, composed per sample and applied with one copy per moved sample.

    ``out``: a float32 tensor to write every sample into, so the conversion from a float16 batch rides on the
    same pass; None writes back into ``image`` (through a one-sample buffer)."""
    tmp = None
    for i in range(image.shape[0]):
        state = _Spatial()
        for t, p in zip(transforms, params):
            t.compose(state, p, i)
        if out is not None:
            state.copy_into(image[i], out[i])
        elif not state.identity:
            tmp = torch.empty_like(image[i]) if tmp is None else tmp
            image[i].copy_(state.copy_into(image[i], tmp))
        if not state.identity:
            label[i].copy_(state(label[i]))
    return (out if out is not None else image), label


def seed_transforms() -> list:
    """The seed's augmentation, in its order."""
    return [BatchRotate90(prob=0.5), BatchFlip(spatial_axis=0, prob=0.5), BatchFlip(spatial_axis=1, prob=0.5),
            BatchScaleIntensity(0.1, prob=0.25), BatchShiftIntensity(0.1, prob=0.25),
            BatchGaussianNoise(0.1, prob=0.25), BatchBiasField(degree=2, prob=0.5)]


@dataclass
class BatchAugment:
    """Applies ``transforms`` to a batch with parameters from a seeded CPU generator; ``last_params`` logs them."""

    transforms: list = field(default_factory=seed_transforms)
    seed: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_params: list[dict] = []

    def draw(self, n: int) -> list[dict]:
        return [t.draw(n, self.generator) for t in self.transforms]

    def read_size(self, patch_size) -> tuple[int, ...]:
        """The region the loader reads for a patch: the patch itself (these transforms keep its size)."""
        return tuple(patch_size)

    def step(self, image: torch.Tensor, label: torch.Tensor):
        """A training step's batch augmented in place, into a float32 buffer reused from step to step (the
        loader's batch is the step's to change)."""
        self._out = self.buffer_for(image, getattr(self, "_out", None))
        return self(image, label, inplace=True, out=self._out)

    def apply(self, image: torch.Tensor, label: torch.Tensor, params: list[dict], inplace: bool = False,
              out: torch.Tensor | None = None):
        """Apply drawn ``params``; consecutive spatial transforms are fused (one copy per moved sample).

        A float16 batch (as the loader delivers) comes back float32, converted in the first pass over it.
        ``out``: a float32 tensor of the image's shape to write the result into, reused from batch to batch by
        a training loop (a fresh batch-sized tensor per step costs the CPU a page fault per 4 KiB)."""
        convert = image.dtype != torch.float32 or out is not None
        if out is not None and (out.shape != image.shape or out.dtype != torch.float32):
            raise ValueError(f"out must be float32 {tuple(image.shape)}, got {out.dtype} {tuple(out.shape)}")
        if not inplace:
            label = label.clone()
            image = image if convert else image.clone()
        if convert and not (self.transforms and self.transforms[0].spatial):
            image = out.copy_(image) if out is not None else image.float()
            convert = False
        i = 0
        while i < len(self.transforms):
            j = i
            while j < len(self.transforms) and self.transforms[j].spatial:
                j += 1
            if j > i:
                if convert and out is None:
                    out = torch.empty(image.shape, dtype=torch.float32, device=image.device)
                image, label = _apply_spatial(self.transforms[i:j], params[i:j], image, label,
                                              out if convert else None)
                convert = False
                i = j
            else:
                image, label = self.transforms[i].apply_(image, label, params[i])
                i += 1
        return image, label

    def __call__(self, image: torch.Tensor, label: torch.Tensor, inplace: bool = False,
                 out: torch.Tensor | None = None):
        """Augment a batch; with ``inplace`` the caller's tensors are modified instead of copied; ``out``: see
        ``apply``."""
        params = self.draw(image.shape[0])
        self.last_params = params
        with torch.no_grad():
            return self.apply(image, label, params, inplace, out)

    @staticmethod
    def buffer_for(image: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """A float32 ``out`` for ``image``: ``previous`` when it fits, else a new one."""
        if previous is not None and previous.shape == image.shape and previous.device == image.device:
            return previous
        return torch.empty(image.shape, dtype=torch.float32, device=image.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def make_augment(preset: str, patch_size, seed: int):
    """The training augmentation ``preset`` (--augmentation) with its generator seeded: seed (this module) or
    nnunet (train.nnunet_augment); each has ``read_size(patch)``, ``step(image, label)`` and ``generator``."""
    if preset == "nnunet":
        from .nnunet_augment import NnunetBatchAugment

        return NnunetBatchAugment(patch_size, seed)
    if preset != "seed":
        raise ValueError(f"--augmentation {preset!r}: choose seed or nnunet")
    return BatchAugment(seed=seed)
