"""The nnU-Net preset's constants and the benchmark's reference chain read from nnU-Net v2.8.1's own trainer
(``nnUNetTrainer.get_training_transforms`` and ``get_patch_size``; the dev extra installs nnunetv2, the project
never needs it). CPU only: the GPU run carries batchgeneratorsv2 for the transform parity tests, not nnU-Net."""

import math

import pytest
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

from benchmarks.augment_bench import nnunet_chain
from benchmarks.nnunet_path import training_transforms
from train import nnunet_augment as na

PATCHES = [(128, 128, 128), (96, 112, 80), (127, 64, 33), (17, 24, 9)]


def test_the_benchmarks_reference_chain_is_what_nnunets_trainer_builds():
    """The chain the batchgeneratorsv2 arms run equals nnUNetTrainer.get_training_transforms's for a 3D patch with
    BraTS regions, transform for transform with every probability and range (their reprs list them all)."""
    for patch in PATCHES:
        assert repr(nnunet_chain(patch)) == repr(training_transforms(patch)), patch


def test_the_input_size_is_nnunets_get_patch_size():
    rot = (-math.radians(30), math.radians(30))
    for patch in PATCHES:
        want = tuple(int(v) for v in get_patch_size(patch, rot, rot, rot, (0.85, 1.25)))
        assert na.input_size(patch) == want, patch


def test_the_presets_probabilities_and_ranges_are_read_from_nnunets_chain():
    """Every constant of train.nnunet_augment against the transform nnU-Net's trainer builds."""
    seen = {}
    for t in training_transforms((128, 128, 128)).transforms:
        p = t.apply_probability if isinstance(t, RandomTransform) else None
        inner = t.transform if isinstance(t, RandomTransform) else t
        if isinstance(inner, SpatialTransform):
            seen["spatial"] = inner
            assert (inner.p_rotation, inner.p_scaling) == (na.P["rotation"], na.P["scaling"])
            rot = math.radians(na.ROTATION_DEG)
            assert tuple(inner.rotation) == pytest.approx((-rot, rot))
            assert tuple(inner.scaling) == na.SCALING and inner.p_elastic_deform == 0
            assert inner.p_synchronize_scaling_across_axes == 1 and inner.padding_value_seg == -1
        elif isinstance(inner, GaussianNoiseTransform):
            seen["noise"] = p
            assert p == na.P["noise"] and tuple(inner.noise_variance) == na.NOISE_STD
        elif isinstance(inner, GaussianBlurTransform):
            seen["blur"] = p
            assert p == na.P["blur"] and inner.p_per_channel == na.P_CHANNEL["blur"]
            assert tuple(inner.blur_sigma) == na.BLUR_SIGMA and not inner.synchronize_axes
        elif isinstance(inner, MultiplicativeBrightnessTransform):
            seen["brightness"] = p
            assert p == na.P["brightness"] and tuple(inner.multiplier_range.contrast_range) == na.BRIGHTNESS
        elif isinstance(inner, ContrastTransform):
            seen["contrast"] = p
            assert p == na.P["contrast"] and tuple(inner.contrast_range.contrast_range) == na.CONTRAST
            assert inner.preserve_range
        elif isinstance(inner, SimulateLowResolutionTransform):
            seen["lowres"] = p
            assert p == na.P["lowres"] and inner.p_per_channel == na.P_CHANNEL["lowres"]
            assert tuple(inner.scale) == na.LOWRES_SCALE and inner.synchronize_axes
        elif isinstance(inner, GammaTransform):
            key = "gamma_inverted" if inner.p_invert_image == 1 else "gamma"
            seen[key] = p
            assert p == na.P[key] and tuple(inner.gamma.contrast_range) == na.GAMMA and inner.p_retain_stats == 1
        elif isinstance(inner, MirrorTransform):
            seen["mirror"] = tuple(inner.allowed_axes)
        elif isinstance(inner, ConvertSegmentationToRegionsTransform):
            seen["regions"] = [tuple(r) for r in inner.regions]
    assert set(seen) == {"spatial", "noise", "blur", "brightness", "contrast", "lowres", "gamma_inverted", "gamma",
                         "mirror", "regions"}
    assert seen["mirror"] == (0, 1, 2)
    assert seen["regions"] == [(1, 2, 4), (1, 4), (4,)]
