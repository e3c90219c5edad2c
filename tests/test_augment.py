import numpy as np
import pytest
import torch

from train.augment import (
    BatchAugment,
    BatchBiasField,
    BatchFlip,
    BatchGaussianNoise,
    BatchRotate90,
    BatchScaleIntensity,
    BatchShiftIntensity,
    bias_field,
    seed_transforms,
)

from .conftest import needs_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _batch(device, b=6, shape=(12, 12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn((b, 3, *shape), generator=g).to(device)
    lab = (img[:, :1] > 0.5).to(torch.uint8)  # a label the image determines, to check they move together
    return img, lab


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
def test_flip_twice_is_identity(device):
    img, lab = _batch(device)
    for axis in (0, 1):
        t = BatchFlip(spatial_axis=axis, prob=0.5)
        p = t.draw(img.shape[0], _g())
        assert 0 < int(p["flip"].sum()) < img.shape[0]  # some flipped, some not
        once = t.apply(img, lab, p)
        twice = t.apply(*once, p)
        assert torch.equal(twice[0], img) and torch.equal(twice[1], lab)
        assert not torch.equal(once[0], img)


@pytest.mark.parametrize("device", DEVICES)
def test_rot90_moves_image_and_label_together(device):
    from monai.transforms import Rotate90

    img, lab = _batch(device, shape=(12, 12, 10))
    t = BatchRotate90(prob=0.5)
    p = t.draw(img.shape[0], _g(3))
    out, out_lab = t.apply(img, lab, p)
    assert torch.equal(out_lab, (out[:, :1] > 0.5).to(torch.uint8))
    for i, k in enumerate(p["k"].tolist()):  # MONAI's per-sample Rotate90 gives the same result
        ref = Rotate90(k=k, spatial_axes=(0, 1))(img[i].cpu()) if k else img[i].cpu()
        assert torch.equal(out[i].cpu(), torch.as_tensor(ref))
    assert set(p["k"].tolist()) - {0}


def test_rot90_refuses_non_square_plane():
    img, lab = _batch("cpu", shape=(12, 10, 10))
    t = BatchRotate90(prob=1.0)
    p = {"k": torch.ones(img.shape[0], dtype=torch.long)}
    with pytest.raises(ValueError, match="square"):
        t.apply(img, lab, p)


@pytest.mark.parametrize("device", DEVICES)
def test_intensity_transforms_leave_label_untouched(device):
    img, lab = _batch(device)
    for t in (BatchScaleIntensity(0.1, 1.0), BatchShiftIntensity(0.1, 1.0), BatchGaussianNoise(0.1, 1.0),
              BatchBiasField(prob=1.0)):
        out, out_lab = t.apply(img, lab, t.draw(img.shape[0], _g()))
        assert out_lab is lab or torch.equal(out_lab, lab)
        assert not torch.equal(out, img)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_and_shift_are_monai_formulas(device):
    img, lab = _batch(device)
    t = BatchScaleIntensity(0.1, prob=1.0)
    p = t.draw(img.shape[0], _g())
    out, _ = t.apply(img, lab, p)
    f = p["factor"].float().to(device).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(out, img * (1 + f))
    assert (p["factor"].abs() <= 0.1).all() and p["factor"].std() > 0
    t = BatchShiftIntensity(0.1, prob=1.0)
    p = t.draw(img.shape[0], _g())
    out, _ = t.apply(img, lab, p)
    torch.testing.assert_close(out, img + p["offset"].float().to(device).view(-1, 1, 1, 1, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_noise_statistics(device):
    img = torch.zeros((4, 2, 40, 40, 40), device=device)
    lab = torch.zeros((4, 1, 40, 40, 40), dtype=torch.uint8, device=device)
    t = BatchGaussianNoise(std=0.1, prob=1.0)
    p = t.draw(4, _g(5))
    out, _ = t.apply(img, lab, p)
    for i in range(4):
        s = float(p["std"][i])
        assert 0 <= s <= 0.1
        assert abs(float(out[i].mean())) < 0.01 * max(s, 1e-3) * 10
        assert abs(float(out[i].std()) - s) < 0.02 * s + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_bias_field_matches_monai(device):
    from monai.transforms import RandBiasField as MonaiBias

    img, lab = _batch(device)
    t = BatchBiasField(degree=2, prob=1.0)
    p = t.draw(img.shape[0], _g(2))
    out, _ = t.apply(img, lab, p)
    monai = MonaiBias(degree=2, coeff_range=(0.0, 0.1), prob=1.0)
    for i in range(img.shape[0]):
        field = monai._generate_random_field(img.shape[2:], 2, p["coeffs"][i].tolist())
        ref = img[i].cpu().numpy() * np.exp(field)[None]
        np.testing.assert_allclose(out[i].cpu().numpy(), ref, rtol=2e-5, atol=2e-6)
    assert (p["coeffs"] >= 0).all() and (p["coeffs"] <= 0.1).all() and p["coeffs"].shape[1] == 10


def test_bias_field_is_smooth_and_bounded():
    c = torch.full((1, 10), 0.1, dtype=torch.float64)
    log_f = bias_field(c, (40, 40, 40))[0]
    f = torch.exp(log_f)
    assert float(log_f.abs().max()) <= 1.0 + 1e-6  # |Legendre| <= 1, ten coefficients of at most 0.1
    assert float(f.max()) > 1.5  # all-0.1 coefficients give a strong field at the corners
    for d in range(3):  # smooth: neighbouring voxels differ by a few percent at most
        assert float(torch.diff(log_f, dim=d).abs().max()) < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_probability_zero_is_identity(device):
    img, lab = _batch(device)
    for t in (BatchRotate90(prob=0.0), BatchFlip(0, prob=0.0), BatchScaleIntensity(0.1, 0.0),
              BatchShiftIntensity(0.1, 0.0), BatchGaussianNoise(0.1, 0.0), BatchBiasField(prob=0.0)):
        out, out_lab = t.apply(img, lab, t.draw(img.shape[0], _g()))
        assert torch.equal(out, img) and torch.equal(out_lab, lab)


def test_rates_follow_probabilities():
    n = 4000
    g = _g(11)
    for t, key, p in ((BatchRotate90(0.5), "k", 0.5), (BatchFlip(0, 0.5), "flip", 0.5),
                      (BatchScaleIntensity(0.1, 0.25), "factor", 0.25), (BatchBiasField(prob=0.5), "on", 0.5)):
        v = t.draw(n, g)[key]
        rate = float((v != 0).double().mean())
        assert abs(rate - p) < 0.03, (type(t).__name__, rate)


def test_seeded_repeatable_and_logged():
    img, lab = _batch("cpu")
    a, b = BatchAugment(seed=4), BatchAugment(seed=4)
    out_a, _ = a(img, lab)
    out_b, _ = b(img, lab)
    assert torch.equal(out_a, out_b)
    # the logged parameters reproduce the result through the deterministic functions
    replay, _ = BatchAugment(seed=99).apply(img, lab, a.last_params)
    assert torch.equal(replay, out_a)
    assert len(a.last_params) == len(seed_transforms())


@pytest.mark.parametrize("device", DEVICES)
def test_same_result_on_every_device(device):
    """Every device present gives the CPU's result for the same parameters (noise aside: each device has its
    own random stream, its statistics are tested above)."""
    img, lab = _batch("cpu")
    transforms = [t for t in seed_transforms() if not isinstance(t, BatchGaussianNoise)]
    aug = BatchAugment(transforms, seed=1)
    params = aug.draw(img.shape[0])
    cpu = aug.apply(img, lab, params)
    dev = aug.apply(img.to(device), lab.to(device), params)
    torch.testing.assert_close(dev[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(dev[1].cpu(), cpu[1])
    assert not torch.equal(cpu[0], img)


def test_fused_spatial_run_equals_transforms_one_by_one():
    img, lab = _batch("cpu", b=16, shape=(10, 10, 8))
    aug = BatchAugment(seed=7)
    params = aug.draw(img.shape[0])
    fused = aug.apply(img, lab, params)
    x, y = img, lab
    for t, p in zip(aug.transforms, params):
        x, y = t.apply(x, y, p)
    assert torch.equal(fused[0], x) and torch.equal(fused[1], y)
    assert torch.equal(img, _batch("cpu", b=16, shape=(10, 10, 8))[0])  # not in place unless asked


def _half_batch(seed: int):
    """A float16 batch as the loader delivers it, with augmentation parameters drawn for it."""
    img, lab = _batch("cpu", b=8, shape=(10, 10, 8))
    aug = BatchAugment(seed=seed)
    return img, img.half(), lab, aug, aug.draw(8)


def test_float16_batch_comes_back_float32_converted_on_the_way():
    img, half, lab, aug, params = _half_batch(3)
    out, out_lab = aug.apply(half, lab, params)
    ref, ref_lab = aug.apply(half.float(), lab, params)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(out_lab, ref_lab)
    assert half.dtype == torch.float16 and torch.equal(half, img.half())  # input untouched


@pytest.mark.parametrize("slabs", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flips", [(), (0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)])
def test_spatial_copy_equals_torch_rot90_and_flip(k, flips, slabs):
    """Both copy paths (slab copies, the CPU's; one flip, a GPU's) give exactly torch.rot90 then torch.flip, for
    every rotation and any flips, writing into a buffer of another dtype (the float16 -> float32 conversion
    riding on the copy)."""
    from train.augment import _Spatial

    x = torch.randn(2, 6, 6, 5).half()
    state = _Spatial()
    state.rot90(k, (0, 1))
    for d in flips:
        state.flip(d)
    ref = torch.rot90(x, k, (1, 2))
    if flips:
        ref = ref.flip([1 + d for d in flips])
    out = torch.full(x.shape, float("nan"))
    assert torch.equal(state.copy_into(x, out, slabs=slabs), ref.float())
    assert torch.equal(state(x), ref)


def test_out_buffer_gives_the_same_result_and_is_reused():
    _, half, lab, aug, params = _half_batch(5)
    ref, ref_lab = aug.apply(half, lab, params)
    buf = BatchAugment.buffer_for(half, None)
    out, out_lab = aug.apply(half, lab, params, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, ref) and torch.equal(out_lab, ref_lab)
    assert BatchAugment.buffer_for(half, buf) is buf
    assert BatchAugment.buffer_for(half[:4], buf) is not buf
    with pytest.raises(ValueError, match="float32"):
        aug.apply(half, lab, params, out=torch.empty(half.shape, dtype=torch.float16))
