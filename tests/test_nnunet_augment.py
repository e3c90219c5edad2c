"""nnU-Net's default augmentation, batched (train.nnunet_augment), against batchgeneratorsv2's own transforms given
the same parameters, and its parameter draws against nnU-Net's probabilities and ranges."""

import math

import numpy as np
import pytest
import torch

# batchgeneratorsv2, nnU-Net's own transforms, is the reference: the dev extra installs it, the project never needs it
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import blur_dimension
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

from train import nnunet_augment as na

from .conftest import needs_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
SHAPE = (41, 38, 29)  # odd and uneven, as real crops are


def _case(b=3, c=2, shape=SHAPE, seed=0):
    """A batch of smooth z-score-like images, zero outside a brain box, and nested BraTS 2021 labels in it."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.avg_pool3d(torch.randn(b, c, *shape, generator=g), 5, 1, 2) * 3
    brain = torch.zeros(shape, dtype=torch.bool)
    brain[3:-4, 2:-3, 2:-2] = True
    img = img * brain
    z = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    r = ((z - torch.tensor(shape)[:, None, None, None] / 2) ** 2).sum(0).sqrt()
    label = torch.zeros(b, 1, *shape, dtype=torch.uint8)
    label[:, 0][:, r < 9] = 2
    label[:, 0][:, r < 6] = 1
    label[:, 0][:, r < 3] = 4
    return img, label


def test_the_input_size_is_nnunets():
    from batchgenerators.augmentations.utils import rotate_coords_3d

    assert na.input_size((128, 128, 128)) == (205, 205, 205)
    a = math.radians(30)
    for patch in [(128, 128, 128), (96, 112, 80), (127, 64, 33), (17, 24, 9)]:
        v = np.array(patch, float)
        want = v.copy()
        for rot in ((a, 0, 0), (0, a, 0), (0, 0, a)):
            want = np.max(np.vstack((np.abs(rotate_coords_3d(v, *rot)), want)), 0)
        assert na.input_size(patch) == tuple((want / 0.85).astype(int)), patch


@pytest.mark.parametrize("device", DEVICES)
def test_the_spatial_transform_is_batchgeneratorsv2s(device):
    """Rotation and scaling for three samples in one grid_sample against batchgeneratorsv2's SpatialTransform
    (nnU-Net's settings) given each sample's angles and scale: images within 1e-4, labels (-1 outside) equal in at
    least 99.9% of voxels; a sample with neither is cropped, not resampled."""
    img, label = _case()
    patch = (24, 27, 17)
    angles = torch.tensor([[0.3, -0.2, 0.45], [0.0, 0.0, 0.0], [-0.5, 0.1, 0.0]], dtype=torch.float64)
    scale = torch.tensor([1.2, 1.0, 0.75], dtype=torch.float64)
    on = torch.tensor([True, False, True])
    x, seg = na.padded(img.to(device), label.to(device), SHAPE)
    out, out_seg = na.spatial(x, seg, angles, scale, on, patch)
    for i in range(3):
        t = SpatialTransform(patch, 0, random_crop=False, p_elastic_deform=0, p_rotation=float(on[i]),
                             rotation=lambda dim, i=i, **_: float(angles[i, dim]), p_scaling=float(on[i]),
                             scaling=lambda i=i, **_: float(scale[i]), p_synchronize_scaling_across_axes=1,
                             bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1)
        ref = t(image=x[i].cpu().clone(), segmentation=seg[i].cpu().long().clone())
        assert torch.allclose(out[i].cpu(), ref["image"], atol=1e-4), i
        assert (out_seg[i].cpu().long() == ref["segmentation"]).float().mean() >= 0.999, i
    assert (out_seg == -1).any() and (out_seg > 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_the_intensity_transforms_are_batchgeneratorsv2s(device):
    """Blur, brightness, contrast, low resolution, gamma (inverted and not) and mirroring, each given the same
    per-sample, per-channel parameters as batchgeneratorsv2's transform: within 1e-4 (1e-3 for gamma, whose
    power of a [0, 1] map amplifies float rounding)."""
    img, label = _case(b=2, c=3, seed=1)
    img = img.to(device)
    g = torch.Generator().manual_seed(4)
    sigma = na._uniform(g, (2, 3, 3), 0.5, 1.0) * na._coin(g, (2, 3, 1), 0.6)
    factors = na._uniform(g, (2, 3), 0.75, 1.25)
    lowres = torch.tensor([[0.5, 1.0, 0.73], [1.0, 0.61, 0.98]], dtype=torch.float64)
    gam = torch.tensor([[0.7, 1.0, 1.45], [1.2, 0.85, 1.0]], dtype=torch.float64)
    mirror = torch.tensor([[True, False, True], [False, True, True]])
    ours = {"blur": na.blur(img, sigma), "brightness": img * factors.to(img)[..., None, None, None],
            "contrast": na.contrast(img, factors), "lowres": na.low_resolution(img, lowres),
            "gamma": na.gamma(img, gam), "inverted": -na.gamma(-img, gam),
            "mirror": na.mirror(img, label.to(device), mirror)[0]}
    for b in range(2):
        x = img[b].cpu()
        want = x.clone()
        for c in range(3):
            for d in range(3):
                if sigma[b, c, d] > 0:
                    want[c:c + 1] = blur_dimension(want[c:c + 1], float(sigma[b, c, d]), d)
        refs = {"blur": want}
        idx = torch.arange(3)
        refs["brightness"] = MultiplicativeBrightnessTransform(1.0, False)._apply_to_image(
            x.clone(), apply_to_channel=idx, multipliers=factors[b].float())
        refs["contrast"] = ContrastTransform(1.0, True, False)._apply_to_image(
            x.clone(), apply_to_channel=idx, multipliers=factors[b].float())
        changed = (lowres[b] != 1).nonzero().flatten()
        refs["lowres"] = SimulateLowResolutionTransform(1.0, False, True, None)._apply_to_image(
            x.clone(), apply_to_channel=changed, scales=lowres[b, changed, None].repeat(1, 3).float())
        on = (gam[b] != 1).nonzero().flatten()
        for name, inv in (("gamma", False), ("inverted", True)):
            refs[name] = GammaTransform(1.0, float(inv), False, 1, 1)._apply_to_image(
                x.clone(), apply_to_channel=on, retain_stats=torch.ones(len(on), dtype=torch.bool),
                invert_image=torch.full((len(on),), inv), gamma=gam[b, on].float())
        refs["mirror"] = MirrorTransform((0, 1, 2))._apply_to_image(x.clone(), axes=mirror[b].nonzero().flatten()
                                                                   .tolist())
        for name, ref in refs.items():
            tol = 1e-3 if name in ("gamma", "inverted") else 1e-4
            assert torch.allclose(ours[name][b].cpu(), ref, atol=tol), (name, b)
    assert not torch.allclose(ours["blur"], img) and not torch.allclose(ours["lowres"], img)


def test_noise_has_the_drawn_std_and_is_repeatable():
    img = torch.zeros(3, 2, 30, 30, 30)
    std = torch.tensor([0.05, 0.0, 0.1], dtype=torch.float64)
    a, b = na.add_noise(img, std, 11), na.add_noise(img, std, 11)
    assert torch.equal(a, b) and not torch.equal(a, na.add_noise(img, std, 12))
    for i, s in enumerate(std.tolist()):
        assert float(a[i].std()) == pytest.approx(s, rel=0.03, abs=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_the_chain_on_a_batch(device):
    """The public entry point: enlarged patches in, image and TC/WT/ET regions out; the same generator seed gives
    the same batch; the image is zero outside the brain; a case smaller than the read region on one axis is
    padded as nnU-Net pads it."""
    aug = na.nnunet_preset((16, 20, 12))
    assert aug.input_size == na.input_size((16, 20, 12))
    img, label = _case(b=4, c=2, shape=(aug.input_size[0], aug.input_size[1], 15), seed=3)  # z below the region
    outs = [aug(img.to(device), label.to(device), torch.Generator().manual_seed(9)) for _ in range(2)]
    (x, regions), (x2, regions2) = outs
    assert x.shape == (4, 2, 16, 20, 12) and regions.shape == (4, 3, 16, 20, 12) and regions.dtype == torch.bool
    assert torch.equal(x, x2) and torch.equal(regions, regions2)
    assert (regions[:, 2] <= regions[:, 0]).all() and (regions[:, 0] <= regions[:, 1]).all()  # ET in TC in WT
    assert regions[:, 1].any()


def frequency_problems(params: na.NnunetParams, channels: int) -> list[str]:
    """Each probability and range of nnU-Net's chain checked on many draws: a binomial z-score within 5 for each
    probability, each on-value inside its range and spread over it (a Kolmogorov-Smirnov test of the uniform
    ones, p > 1e-4). Returns what fails."""
    from scipy import stats

    n = params.scale.numel()
    problems = []

    def rate(name, hits, trials, p):
        z = (hits - trials * p) / math.sqrt(trials * p * (1 - p))
        if abs(z) > 5:
            problems.append(f"{name}: {hits / trials:.4f} against p {p} (z {z:.1f})")

    def uniform(name, values, lo, hi):
        if values.numel() and (values.min() < lo or values.max() > hi):
            problems.append(f"{name}: values outside [{lo}, {hi}]")
        elif values.numel() and stats.kstest(values.numpy(), "uniform", args=(lo, hi - lo)).pvalue < 1e-4:
            problems.append(f"{name}: not uniform on [{lo}, {hi}]")

    rot = (params.angles != 0).any(1)
    rate("rotation", int(rot.sum()), n, na.P["rotation"])
    uniform("rotation angle", params.angles[rot].flatten(), -math.radians(30), math.radians(30))
    sc = params.scale != 1
    rate("scaling", int(sc.sum()), n, na.P["scaling"])
    uniform("scale", params.scale[sc], *na.SCALING)
    rate("noise", int((params.noise_std > 0).sum()), n, na.P["noise"])
    uniform("noise std", params.noise_std[params.noise_std > 0], *na.NOISE_STD)
    blurred = (params.blur_sigma > 0).any(-1)
    rate("blur", int(blurred.any(1).sum()), n, na.P["blur"] * (1 - (1 - na.P_CHANNEL["blur"]) ** channels))
    rate("blur per channel", int(blurred.sum()), n * channels, na.P["blur"] * na.P_CHANNEL["blur"])
    uniform("blur sigma", params.blur_sigma[params.blur_sigma > 0], *na.BLUR_SIGMA)
    for name, values, rng in (("brightness", params.brightness, na.BRIGHTNESS), ("contrast", params.contrast,
                                                                                    na.CONTRAST),
                              ("gamma_inverted", params.gamma_inverted, na.GAMMA), ("gamma", params.gamma, na.GAMMA)):
        on = (values != 1).any(1)
        rate(name, int(on.sum()), n, na.P[name])
        v = values[values != 1]
        below = v < 1
        rate(f"{name} below 1", int(below.sum()), v.numel(), 0.5)
        uniform(f"{name} below 1", v[below], rng[0], 1.0)
        uniform(f"{name} above 1", v[~below], 1.0, rng[1])
    low = params.lowres != 1
    rate("low resolution per channel", int(low.sum()), n * channels, na.P["lowres"] * na.P_CHANNEL["lowres"])
    uniform("low resolution scale", params.lowres[low], *na.LOWRES_SCALE)
    rate("mirror", int(params.mirror.sum()), params.mirror.numel(), 0.5)
    return problems


def test_the_draws_follow_nnunets_probabilities_and_ranges(monkeypatch):
    aug = na.nnunet_preset((32, 32, 32))
    params = aug.draw(40000, 4, torch.Generator().manual_seed(1))
    assert frequency_problems(params, 4) == []
    # the check is able to fail: a wrong probability and a wrong range are both caught
    monkeypatch.setitem(na.P, "rotation", 0.22)
    monkeypatch.setattr(na, "LOWRES_SCALE", (0.5, 0.9))
    wrong = aug.draw(40000, 4, torch.Generator().manual_seed(1))
    monkeypatch.undo()
    problems = frequency_problems(wrong, 4)
    assert any(p.startswith("rotation:") for p in problems) and any("low resolution scale" in p for p in problems)


def test_draws_come_before_the_data_and_repeat_with_the_seed():
    aug = na.nnunet_preset((16, 16, 16))
    a, b = (aug.draw(8, 4, torch.Generator().manual_seed(5)) for _ in range(2))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("angles", "scale", "blur_sigma", "gamma"))
    assert a.noise_seed == b.noise_seed


def test_training_with_the_nnunet_preset_records_it_and_resumes_its_stream(tiny_store, tmp_path, capsys):
    """`train --augmentation nnunet`: the loader reads nnU-Net's enlarged region, the chain brings it to the
    patch, the run's configuration and its exported model card record the preset, and a resumed run continues
    the same augmentation stream (its losses those of an uninterrupted run); an unknown preset is one line."""
    import json

    from train.cli import main as train_main

    base = ["--store", tiny_store, "--channels", "4", "8", "16", "--patch-size", "16", "16", "16", "--workers", "0",
            "--lr", "0.01", "--augmentation", "nnunet", "--modalities", "t1", "t2", "flair"]
    assert train_main([*base, "--run-dir", str(tmp_path / "a"), "--epochs", "3"]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["augmentation"] == "nnunet"
    assert train_main([*base, "--run-dir", str(tmp_path / "b"), "--epochs", "2"]) == 0
    assert train_main([*base, "--run-dir", str(tmp_path / "b"), "--epochs", "3", "--resume"]) == 0
    a, b = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    # on CUDA the float reductions of training are not bit-reproducible (a resumed run's loss was 2e-6 away on an
    # H200); another augmentation stream moves it by far more than 1e-5
    rel = 1e-5 if torch.cuda.is_available() else 1e-6
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=rel, abs=1e-7)
    assert train_main(["export", "--run-dir", str(tmp_path / "a"), "--format", "torchscript"]) == 0
    card = (tmp_path / "a" / "export" / "model-card.json").read_text()
    assert '"augmentation": "nnunet"' in card
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main([*base[:-5], "--augmentation", "autoaugment", "--run-dir", str(tmp_path / "c")])
    assert e.value.code == 2 and "seed" in capsys.readouterr().err


def test_the_same_seed_gives_the_same_augmented_batches_on_every_cache_mode(tiny_store):
    """ram, none, and the gpu mode's code with the CPU as its device: the same seeds, the same augmented batches."""
    from store import open_store
    from train.loader import GpuSource, TrainLoader

    ids = open_store(tiny_store).case_ids
    patch = (16, 16, 16)
    out = {}
    for mode in ("ram", "none", "gpu"):
        aug = na.NnunetBatchAugment(patch, seed=3)
        loader = TrainLoader(tiny_store, ids, ("t1", "t2", "flair"), patch=aug.read_size(patch), batch_size=2,
                             cache="ram" if mode == "gpu" else mode, workers=0, seed=5)
        if mode == "gpu":
            shapes = [open_store(tiny_store).case(c).shape for c in ids]
            loader.source, loader.cache = GpuSource(tiny_store, ids, ("t1", "t2", "flair"), "cpu", shapes), "gpu"
        out[mode] = [aug.step(img, lab) for e in range(2) for img, lab in loader.epoch(e)]
    assert len(out["ram"]) == 6
    for mode in ("none", "gpu"):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out["ram"], out[mode])), mode
