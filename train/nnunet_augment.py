"""nnU-Net v2.8.1's default 3d_fullres training augmentation (``nnUNetTrainer.get_training_transforms`` with the
rotation and patch size of ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``), for a whole batch on
the device, every sample with its own parameters.

The chain, in nnU-Net's order, with its probabilities and ranges (batchgeneratorsv2 0.3.6's transforms):
- spatial, one resampling of the enlarged input (``input_size``, 205^3 for 128^3) onto the patch: rotation
  (p 0.2) by U(-30, 30) degrees about each axis, scaling (p 0.2) by one factor U(0.7, 1.4) for every axis; image
  trilinear with zeros outside, labels resampled as nnU-Net resamples them (each label's indicator trilinear, the
  highest score wins, -1 outside the input); a sample drawn neither is centre-cropped, not resampled;
- Gaussian noise (p 0.1): one std U(0, 0.1) for the sample, fresh noise per voxel and channel;
- Gaussian blur (p 0.2): each channel with p 0.5, sigma U(0.5, 1) per channel and axis, separable, reflected
  borders;
- multiplicative brightness (p 0.15), contrast with the range preserved (p 0.15): a factor per channel from
  nnU-Net's ``BGContrast((0.75, 1.25))`` (half the draws below 1, half above);
- simulated low resolution (p 0.25): each channel with p 0.5 down by one factor U(0.5, 1) for every axis
  (nearest-exact) and back up (trilinear);
- gamma on the inverted image (p 0.1), then gamma (p 0.3), each with ``BGContrast((0.7, 1.5))`` per channel and
  the channel's mean and std kept;
- mirroring of each axis (p 0.5);
- the image set to 0 outside the brain (where the label is -1: outside every channel's nonzero voxels, or outside
  the input), the label -1 made background; then the BraTS regions TC, WT, ET.

As the seed's set does (``train.augment``), every parameter is drawn first, from a seeded generator
(``NnunetPreset.draw``), then applied by a deterministic function of them (``NnunetPreset.apply``); no Python
loop over samples touches voxels. Tensors: image (B, C, X, Y, Z) float z-scores, label (B, 1, X, Y, Z) uint8 in
BraTS 2021 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROTATION_DEG = 30.0
SCALING = (0.7, 1.4)
P = {"rotation": 0.2, "scaling": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15,
     "lowres": 0.25, "gamma_inverted": 0.1, "gamma": 0.3}
P_CHANNEL = {"blur": 0.5, "lowres": 0.5}
LABELS = (-1, 0, 1, 2, 3, 4)  # outside the brain, then every BraTS value (2021's and 2023+'s)
NOISE_STD = (0.0, 0.1)
BLUR_SIGMA = (0.5, 1.0)
BRIGHTNESS = CONTRAST = (0.75, 1.25)
LOWRES_SCALE = (0.5, 1.0)
GAMMA = (0.7, 1.5)
BLUR_TRUNCATE = 6.0  # batchgeneratorsv2's blur_dimension


def input_size(patch_size, rotation_deg: float = ROTATION_DEG, min_scale: float = 0.85) -> tuple[int, ...]:
    """The enlarged size nnU-Net reads for ``patch_size`` (its ``get_patch_size``: the patch's extent vector
    rotated by the largest angle about each axis, over its smallest scale, 0.85): 205^3 for 128^3."""
    v = np.asarray(patch_size, float)
    a = math.radians(min(rotation_deg, 90.0))
    c, s = math.cos(a), math.sin(a)
    rotations = [np.array([[1, 0, 0], [0, c, -s], [0, s, c]]), np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
                 np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])]
    out = v.copy()
    for r in rotations:
        out = np.maximum(out, np.abs(v @ r))
    return tuple(int(x) for x in out / min_scale)


def _uniform(g, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _coin(g, shape, p):
    return torch.rand(shape, generator=g, dtype=torch.float64) < p


def _bg_contrast(g, shape, lo, hi):
    """batchgeneratorsv2's BGContrast: with p 0.5 U(lo, 1), else U(max(lo, 1), hi)."""
    below = _coin(g, shape, 0.5) & (lo < 1)
    return torch.where(below, _uniform(g, shape, lo, 1.0), _uniform(g, shape, max(lo, 1.0), hi))


@dataclass
class NnunetParams:
    """Every sample's draws (CPU tensors, first axis the batch): which transform is on, and its parameters per
    sample, channel and axis. ``noise_seed`` seeds the noise field drawn on the device at apply time."""

    angles: torch.Tensor  # (B, 3) radians, 0 where not rotated
    scale: torch.Tensor  # (B,), 1 where not scaled
    noise_std: torch.Tensor  # (B,), 0 where off
    blur_sigma: torch.Tensor  # (B, C, 3), 0 where a channel is not blurred
    brightness: torch.Tensor  # (B, C), 1 where off
    contrast: torch.Tensor  # (B, C), 1 where off
    lowres: torch.Tensor  # (B, C), 1 where off
    gamma_inverted: torch.Tensor  # (B, C), 1 where off
    gamma: torch.Tensor  # (B, C), 1 where off
    mirror: torch.Tensor  # (B, 3) bool
    noise_seed: int
    spatial: torch.Tensor  # (B,) bool: rotated or scaled (resampled), else centre-cropped


class NnunetPreset:
    """``aug(image, label, generator)``: nnU-Net's chain on a batch of enlarged patches (``input_size``), giving
    image (B, C, *patch_size) and regions (B, 3, *patch_size) bool (TC, WT, ET)."""

    def __init__(self, patch_size):
        self.patch_size = tuple(int(p) for p in patch_size)
        self.input_size = input_size(self.patch_size)

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator):
        return self.apply(image, label, self.draw(image.shape[0], image.shape[1], generator))

    def draw(self, n: int, channels: int, g: torch.Generator) -> NnunetParams:
        """Every sample's parameters, before any data is read."""
        rot = _coin(g, n, P["rotation"])
        angles = torch.where(rot[:, None], _uniform(g, (n, 3), -math.radians(ROTATION_DEG),
                                                    math.radians(ROTATION_DEG)), torch.zeros(n, 3, dtype=torch.float64))
        sc = _coin(g, n, P["scaling"])
        scale = torch.where(sc, _uniform(g, n, *SCALING), torch.ones(n, dtype=torch.float64))

        def per_channel(name, values, neutral, p_channel=1.0):
            on = _coin(g, n, P[name])[:, None] & _coin(g, (n, channels), p_channel)
            return torch.where(on, values, torch.full_like(values, neutral))

        noise = torch.where(_coin(g, n, P["noise"]), _uniform(g, n, *NOISE_STD), torch.zeros(n, dtype=torch.float64))
        blur_on = _coin(g, n, P["blur"])[:, None] & _coin(g, (n, channels), P_CHANNEL["blur"])
        blur = torch.where(blur_on[..., None], _uniform(g, (n, channels, 3), *BLUR_SIGMA),
                           torch.zeros(n, channels, 3, dtype=torch.float64))
        return NnunetParams(
            angles=angles, scale=scale, noise_std=noise, blur_sigma=blur,
            brightness=per_channel("brightness", _bg_contrast(g, (n, channels), *BRIGHTNESS), 1.0),
            contrast=per_channel("contrast", _bg_contrast(g, (n, channels), *CONTRAST), 1.0),
            lowres=per_channel("lowres", _uniform(g, (n, channels), *LOWRES_SCALE), 1.0, P_CHANNEL["lowres"]),
            gamma_inverted=per_channel("gamma_inverted", _bg_contrast(g, (n, channels), *GAMMA), 1.0),
            gamma=per_channel("gamma", _bg_contrast(g, (n, channels), *GAMMA), 1.0),
            mirror=_coin(g, (n, 3), 0.5), noise_seed=int(torch.randint(0, 2**62, (1,), generator=g)),
            spatial=rot | sc)

    def apply(self, image: torch.Tensor, label: torch.Tensor, p: NnunetParams, regions: bool = True):
        """The chain with drawn parameters ``p``: (image (B, C, *patch) float32, regions (B, 3, *patch) bool TC,
        WT, ET of BraTS 2021 values); with ``regions`` False, the label map (B, 1, *patch) uint8 instead, in the
        input's own values, for the trainer to turn into its regions."""
        image, seg = padded(image.float(), label, self.input_size)
        image, seg = spatial(image, seg, p.angles, p.scale, p.spatial, self.patch_size)
        image = add_noise(image, p.noise_std, p.noise_seed)
        image = blur(image, p.blur_sigma)
        image = image * p.brightness.to(image)[..., None, None, None]
        image = contrast(image, p.contrast)
        image = low_resolution(image, p.lowres)
        image = -gamma(-image, p.gamma_inverted)
        image = gamma(image, p.gamma)
        image, seg = mirror(image, seg, p.mirror)
        image = image.masked_fill(seg == -1, 0.0)
        seg = seg.clamp_min(0)
        if not regions:
            return image, seg.to(torch.uint8)
        return image, torch.cat([(seg == 1) | (seg == 4), seg > 0, seg == 4], 1)


class NnunetBatchAugment:
    """The trainer's side of the preset: its own seeded generator (saved with the run's checkpoints, so a resumed
    run continues the same stream); ``augment(image, label)`` -> (image float32, label uint8) on the patch."""

    def __init__(self, patch_size, seed: int = 0):
        self.preset = NnunetPreset(patch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def read_size(self, patch_size) -> tuple[int, ...]:
        """The enlarged region the loader reads for the patch (nnU-Net's initial patch size)."""
        return input_size(patch_size)

    def step(self, image: torch.Tensor, label: torch.Tensor):
        params = self.preset.draw(image.shape[0], image.shape[1], self.generator)
        return self.preset.apply(image, label, params, regions=False)


def padded(image: torch.Tensor, label: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, seg int8 with -1 outside the brain) at least ``size`` on every axis: where the input is smaller
    (a case smaller than the read region), padded about its centre as nnU-Net's loader pads it, image 0 and
    label -1 (outside; background once the chain ends). The brain is where any channel is nonzero."""
    seg = label.to(torch.int8).masked_fill(~(image != 0).any(1, keepdim=True), -1)
    pad = []
    for have, want in zip(reversed(image.shape[2:]), reversed(tuple(size))):
        extra = max(0, want - have)
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        image, seg = F.pad(image, pad, value=0.0), F.pad(seg, pad, value=-1)
    return image, seg


def affine_grid(angles: torch.Tensor, scale: torch.Tensor, patch, shape, device) -> torch.Tensor:
    """grid_sample's grid (B, *patch, 3) for rotations ``angles`` (B, 3) and scales (B,), centred on the input
    of spatial ``shape``: batchgeneratorsv2's ``create_affine_matrix_3d`` (Rz @ Ry @ Rx @ S) on its centred
    identity grid, in its normalised coordinates."""
    a = angles.to(torch.float64)
    cx, sx, cy, sy, cz, sz = a[:, 0].cos(), a[:, 0].sin(), a[:, 1].cos(), a[:, 1].sin(), a[:, 2].cos(), a[:, 2].sin()
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    m = rz @ ry @ rx * scale.to(torch.float64)[:, None, None]
    axes = [torch.linspace((1 - s) / 2, (s - 1) / 2, s) for s in patch]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).to(device)  # (*patch, 3), voxels from the centre
    grid = torch.einsum("...j,bij->b...i", base, m.float().to(device))
    grid = grid / (torch.tensor(shape, dtype=torch.float32, device=device) / 2)
    return grid.flip(-1)  # grid_sample reads (z, y, x)


def spatial(image, seg, angles, scale, on, patch):
    """Rotation and scaling of the samples ``on`` (B,) in one grid_sample (image trilinear, zeros outside; each
    label's indicator trilinear, the top score wins, -1 outside), the others centre-cropped as nnU-Net crops."""
    shape = image.shape[2:]
    start = [s // 2 - p // 2 for s, p in zip(shape, patch)]
    crop = tuple(slice(st, st + p) for st, p in zip(start, patch))
    out_img = image[(slice(None), slice(None), *crop)].clone()
    out_seg = seg[(slice(None), slice(None), *crop)].clone()
    idx = on.nonzero().flatten().to(image.device)
    if idx.numel():
        grid = affine_grid(angles[on], scale[on], patch, shape, image.device)
        out_img[idx] = F.grid_sample(image[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sub = seg[idx]
        scores = torch.stack([F.grid_sample((sub == u).float() - (1.0 if u == -1 else 0.0), grid, mode="bilinear",
                                            padding_mode="zeros", align_corners=False)[:, 0]
                              + (1.0 if u == -1 else 0.0) for u in LABELS], 1)
        values = torch.tensor(LABELS, dtype=seg.dtype, device=seg.device)
        out_seg[idx] = values[scores.argmax(1)][:, None]
    return out_img, out_seg


def add_noise(image, std, seed: int):
    """Gaussian noise of each sample's ``std`` (B,) on every channel; the field from a generator seeded with
    ``seed`` on the image's device."""
    if not bool((std > 0).any()):
        return image
    g = torch.Generator(device=image.device).manual_seed(seed)
    noise = torch.randn(image.shape, generator=g, device=image.device, dtype=image.dtype)
    return image + noise * std.to(image)[:, None, None, None, None]


def _kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """batchgeneratorsv2's Gaussian kernel per sigma (N,), centred in ``size`` taps; sigma 0 is the identity."""
    out = torch.zeros(sigma.numel(), size, dtype=torch.float64)
    for i, s in enumerate(sigma.tolist()):  # at most B * C tiny kernels: parameters, not voxels
        if s <= 0:
            out[i, size // 2] = 1.0
            continue
        k = _odd(s * BLUR_TRUNCATE + 0.5)
        half = (k - 1) * 0.5
        pts = torch.linspace(-half, half, k, dtype=torch.float64)
        pdf = torch.exp(-0.5 * (pts / s) ** 2)
        out[i, size // 2 - k // 2: size // 2 + k // 2 + 1] = pdf / pdf.sum()
    return out


def _odd(n: float) -> int:
    r = round(n)
    return r if r % 2 == 1 else (r + 1 if n - r >= 0 else r - 1)


def blur(image, sigma):
    """Separable Gaussian blur of each sample's channels with ``sigma`` (B, C, 3) per axis (0: not blurred),
    reflected borders, as batchgeneratorsv2's blur_dimension: one grouped convolution per axis for the batch."""
    if not bool((sigma > 0).any()):
        return image
    b, c = image.shape[:2]
    size = _odd(float(sigma.max()) * BLUR_TRUNCATE + 0.5)
    x = image.reshape(1, b * c, *image.shape[2:])
    for axis in range(3):
        k = _kernels(sigma[..., axis].reshape(-1), size).to(image)
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = size
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = size // 2
        x = F.conv3d(F.pad(x, pad, mode="reflect"), k.view(shape), groups=b * c)
    return x.view_as(image)


def contrast(image, factor):
    """(x - mean) * factor + mean per sample and channel, clipped to the channel's range before (preserve range)."""
    if not bool((factor != 1).any()):
        return image
    flat = image.flatten(2)
    mean, lo, hi = flat.mean(-1), flat.amin(-1), flat.amax(-1)
    f = factor.to(image)
    out = (flat - mean[..., None]) * f[..., None] + mean[..., None]
    out = torch.maximum(torch.minimum(out, hi[..., None]), lo[..., None])
    return torch.where((f != 1)[..., None], out, flat).view_as(image)


def _lowres_matrix(n: int, scale: torch.Tensor) -> torch.Tensor:
    """(N, n, n) matrices: down to round(n * scale) by nearest-exact, back up to n by linear interpolation
    (align_corners=False), as F.interpolate does it; the identity where scale is 1."""
    mats = torch.zeros(scale.numel(), n, n, dtype=torch.float64)
    for i, s in enumerate(scale.tolist()):  # one small matrix per sample and channel: parameters, not voxels
        m = round(n * s)
        if m == n:
            mats[i] = torch.eye(n, dtype=torch.float64)
            continue
        down = torch.clamp(torch.floor((torch.arange(m, dtype=torch.float64) + 0.5) * n / m), max=n - 1).long()
        src = torch.clamp((torch.arange(n, dtype=torch.float64) + 0.5) * m / n - 0.5, min=0)
        i0 = torch.floor(src).long().clamp(max=m - 1)
        i1 = (i0 + 1).clamp(max=m - 1)
        w1 = src - i0
        rows = torch.arange(n)
        mats[i].index_put_((rows, down[i0]), 1 - w1, accumulate=True)
        mats[i].index_put_((rows, down[i1]), w1, accumulate=True)
    return mats


def low_resolution(image, scale):
    """Each sample's channels down by ``scale`` (B, C) on every axis and back up: three batched matrix products,
    one per axis (nearest-exact down then linear up is separable)."""
    if not bool((scale != 1).any()):
        return image
    b, c = image.shape[:2]
    x = image.reshape(b * c, *image.shape[2:])
    mx, my, mz = (_lowres_matrix(n, scale.reshape(-1)).to(image) for n in image.shape[2:])
    x = torch.einsum("nij,njyz->niyz", mx, x)
    x = torch.einsum("nij,nxjz->nxiz", my, x)
    x = torch.einsum("nij,nxyj->nxyi", mz, x)
    return x.view_as(image)


def gamma(image, g):
    """batchgeneratorsv2's GammaTransform with its statistics retained, per sample and channel (``g`` 1: as is):
    the channel's range mapped to [0, 1], raised to g, mapped back, then its mean and std restored."""
    if not bool((g != 1).any()):
        return image
    eps = 1e-7
    flat = image.flatten(2)
    mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    rng = hi - lo
    out = ((flat - lo) / rng.clamp_min(eps)).pow(g.to(image)[..., None]) * rng + lo
    out = (out - out.mean(-1, keepdim=True)) * (std / out.std(-1, keepdim=True).clamp_min(eps)) + mean
    return torch.where((g != 1).to(image.device)[..., None], out, flat).view_as(image)


def mirror(image, seg, axes):
    """Each sample flipped along the axes ``axes`` (B, 3) marks, image and label alike."""
    for a in range(3):
        on = axes[:, a].to(image.device)
        if bool(on.any()):
            image = torch.where(on[:, None, None, None, None], image.flip(2 + a), image)
            seg = torch.where(on[:, None, None, None, None], seg.flip(2 + a), seg)
    return image, seg


def nnunet_preset(patch_size) -> NnunetPreset:
    """nnU-Net's default 3d_fullres augmentation for ``patch_size``: ``aug.input_size`` is the enlarged size to
    read (205^3 for 128^3); ``aug(image, label, generator)`` applies it to a batch (see the module's docstring)."""
    return NnunetPreset(patch_size)
