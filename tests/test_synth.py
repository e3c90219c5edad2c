import hashlib

import nibabel as nib
import numpy as np
import pytest

from prep.cli import main as prep_main
from prep.discover import discover
from prep.synth import FULL_SHAPE, SynthConfig, brats_affine, make_case, synth_cohort
from prep.synth.tumour import tumour_params
from store.conventions import MODALITIES

from .conftest import TINY


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.nii.gz"))}


def test_files_shapes_dtypes_labels_affine(tiny_cohort):
    cohort = discover(tiny_cohort)
    assert cohort.layout == "brats2021" and not cohort.problems
    assert [c.case_id for c in cohort.cases] == [f"BraTS2021_{i:05d}" for i in range(6)]
    for case in cohort.cases:
        names = sorted(p.name for p in (tiny_cohort / case.case_id).iterdir())
        assert names == sorted(f"{case.case_id}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair", "seg"))
        for m in MODALITIES:
            img = nib.load(case.images[m])
            assert img.shape == TINY
            assert img.get_data_dtype() == np.int16
            np.testing.assert_allclose(img.affine, brats_affine(TINY))
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # as real BraTS files
        seg = nib.load(case.seg)
        assert seg.get_data_dtype() == np.uint8
        labels = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert labels <= {0, 1, 2, 4} and 2 in labels
        brain = np.asanyarray(nib.load(case.images["t1"]).dataobj) > 0
        assert not (np.asanyarray(seg.dataobj)[~brain]).any()  # tumour only inside the brain


def test_full_size_affine_like_brats():
    aff = brats_affine(FULL_SHAPE)
    np.testing.assert_allclose(aff, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_2023_layout_and_labels(tiny_cohort_2023):
    cohort = discover(tiny_cohort_2023)
    assert cohort.layout == "brats2023"
    case = cohort.cases[0]
    assert case.case_id == "BraTS-GLI-00000-000"
    assert case.images["t1ce"].name == "BraTS-GLI-00000-000-t1c.nii.gz"
    labels = set(np.unique(np.asanyarray(nib.load(case.seg).dataobj)).tolist())
    assert labels <= {0, 1, 2, 3} and 4 not in labels


def test_same_seed_byte_identical_any_workers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth_cohort(SynthConfig(out=a, cases=2, seed=11, shape=(24, 24, 16)), progress=False)
    synth_cohort(SynthConfig(out=b, cases=2, seed=11, shape=(24, 24, 16), workers=2), progress=False)
    synth_cohort(SynthConfig(out=c, cases=2, seed=12, shape=(24, 24, 16)), progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def _contrasts(images, label):
    """Mean intensity of oedema relative to normal white matter, per modality.

    White matter is found as a person would: tumour-free brain voxels bright on T1 (its top quartile).
    """
    brain = images["t1"] > 0
    healthy = brain & (label == 0)
    wm = healthy & (images["t1"] > np.percentile(images["t1"][healthy], 75))
    ed = label == 2
    return {m: float(images[m][ed].mean() / images[m][wm].mean()) for m in MODALITIES}, wm, ed


@pytest.mark.parametrize("index", [0, 1, 2])
def test_clinical_contrasts(index):
    images, label, _ = make_case(index, seed=5, shape=(120, 120, 78))
    images = {m: v.astype(np.float64) for m, v in images.items()}
    c, wm, ed = _contrasts(images, label)
    assert ed.sum() > 50 and wm.sum() > 1000
    assert c["flair"] > 1.35, c  # oedema bright on FLAIR
    assert c["t2"] > 1.5, c  # and on T2
    assert abs(c["t1"] - 1) < 0.35 * abs(c["flair"] - 1), c  # barely visible on T1
    et = label == 4
    if et.any():  # enhancing rim bright on T1ce, much less so on T1
        assert images["t1ce"][et].mean() / images["t1ce"][wm].mean() > 1.4
        assert images["t1"][et].mean() / images["t1"][wm].mean() < 1.0
    ncr = label == 1
    if ncr.sum() > 20:  # necrosis dark on T1ce, bright on T2
        assert images["t1ce"][ncr].mean() < images["t1ce"][wm].mean()
        assert images["t2"][ncr].mean() > images["t2"][wm].mean()
    # CSF: bright on T2, dark on FLAIR. The darkest healthy FLAIR voxels are CSF; on T2 they are the brightest.
    healthy = (images["t1"] > 0) & (label == 0)
    csf = healthy & (images["flair"] < np.percentile(images["flair"][healthy], 5))
    assert images["t2"][csf].mean() > 1.5 * images["t2"][wm].mean()


def test_noise_and_bias_present():
    images, label, _ = make_case(0, seed=1, shape=(120, 120, 78))
    t1 = images["t1"].astype(float)
    # Rician noise: neighbouring white-matter voxels differ
    _, wm, _ = _contrasts({m: v.astype(float) for m, v in images.items()}, label)
    diffs = np.abs(np.diff(t1, axis=0))[wm[1:] & wm[:-1]]
    assert diffs.mean() > 3
    # skull-stripped: exact zeros outside the brain, positive inside
    assert (t1 == 0).mean() > 0.5 and (t1[t1 > 0] >= 1).all()


def test_sizes_vary_and_about_one_in_twenty_lacks_enhancing():
    sizes = []
    for i in range(8):
        _, label, _ = make_case(i, seed=2, shape=(48, 48, 31))
        sizes.append(int((label > 0).sum()))
    assert max(sizes) > 3 * min(sizes)
    params = [tumour_params(2, i) for i in range(2000)]
    rate = np.mean([not p.enhancing for p in params])
    assert 0.035 < rate < 0.065
    radii = np.array([p.r_core for p in params])
    assert radii.min() < 5 and radii.max() > 20  # small to large
    # a case drawn without enhancing tumour has no ET label, and has a core
    i = next(i for i, p in enumerate(params) if not p.enhancing)
    _, label, _ = make_case(i, seed=2, shape=(48, 48, 31))
    assert not (label == 4).any() and (label == 1).any()


def test_cli_synth_and_preview(tmp_path, capsys):
    rc = prep_main(["synth", "--out", str(tmp_path / "raw"), "--cases", "1", "--shape", "32", "32", "24",
                    "--preview", str(tmp_path / "p.png")])
    assert rc == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert (tmp_path / "p-confounders.png").stat().st_size > 10_000  # each confounder on one case
    out = capsys.readouterr().out
    assert "wrote 1 brats2021 cases" in out and "preview of the confounders" in out


def test_cli_rejects_bad_shape(tmp_path, capsys):
    rc = prep_main(["synth", "--out", str(tmp_path), "--cases", "1", "--shape", "4", "32", "24"])
    assert rc == 2
    assert "--shape" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- confounders

CONFOUNDED = (120, 120, 78)  # 2 mm: every confounder fits, thick slices included


def _case_with(index, seed=3):
    details: dict = {}
    images, label, _ = make_case(index, seed, CONFOUNDED, details=details)
    clean, clean_label, _ = make_case(index, seed, CONFOUNDED, confounders=False)
    return images, label, clean, clean_label, details["confounders"]


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_confounders_never_touch_the_labels(index):
    images, label, clean, clean_label, added = _case_with(index)
    assert np.array_equal(label, clean_label)  # the labels do not change
    from scipy import ndimage

    near = ndimage.binary_dilation(label > 0, iterations=1).ravel()
    brain = clean["t1"].ravel() > 0
    for name, flat in added.masks.items():
        assert not near[flat].any(), name  # nothing inside a label, nor next to one
        assert not brain[flat].any() if name == "residue" else brain[flat].all(), name
    # outside what was added (and the thick-slice modalities), the images are the clean case's
    touched = np.zeros(label.size, bool)
    for flat in added.masks.values():
        touched[flat] = True
    blurred = {m for m, _, _ in added.thick}
    for m in MODALITIES:
        if m not in blurred:
            assert np.array_equal(images[m].ravel()[~touched], clean[m].ravel()[~touched]), m


def _roughness(img, brain, axis):
    """Mean absolute difference between neighbours along ``axis`` inside the brain."""
    both = np.take(brain, range(1, brain.shape[axis]), axis) & np.take(brain, range(brain.shape[axis] - 1), axis)
    return np.abs(np.diff(img.astype(float), axis=axis))[both].mean()


def test_each_confounder_looks_as_on_real_scans():
    """Over a few cases: vessels, sinuses and choroid plexus bright on T1ce and not on FLAIR; caps and foci bright
    on FLAIR and T2 and not on T1ce; residue outside the brain; a thick-slice modality smoother along its axis."""
    seen = set()
    for index in range(8):
        images, label, clean, _, added = _case_with(index)
        wm = {m: float(np.median(clean[m][(clean["t1"] > 0) & (label == 0)])) for m in MODALITIES}
        for name, flat in added.masks.items():
            if flat.size < 10:
                continue
            seen.add(name)
            blurred = {m for m, _, _ in added.thick}  # a thick-slice modality changes everywhere
            ratio = {m: 1.0 if m in blurred else images[m].ravel()[flat].mean() / clean[m].ravel()[flat].clip(1).mean()
                     for m in MODALITIES}
            if name in ("vessels", "sinuses", "choroid"):  # thin tubes fill part of a 2 mm voxel
                bright = images["t1ce"].ravel()[flat].mean() > 1.1 * wm["t1ce"]
                assert "t1ce" in blurred or (ratio["t1ce"] > 1.3 and bright), name
                assert abs(ratio["flair"] - 1) < 0.05, name
            elif name in ("caps", "foci"):
                assert ("flair" in blurred or ratio["flair"] > 1.2) and ("t2" in blurred or ratio["t2"] > 1.2), name
                assert abs(ratio["t1ce"] - 1) < 0.05, name
            else:
                assert (images["t1"].ravel()[flat] > 0).all() and (clean["t1"].ravel()[flat] == 0).all()
        for m, axis, _mm in added.thick:
            seen.add("thick")
            assert _roughness(images[m], clean[m] > 0, axis) < 0.8 * _roughness(clean[m], clean[m] > 0, axis)
    assert seen >= {"vessels", "sinuses", "choroid", "caps", "foci"}, seen


def test_thick_slices_keep_what_is_constant_and_the_zeros():
    from prep.synth.confounders import _thick

    ramp = np.tile(np.arange(1, 31, dtype=np.int16)[None, None] * 10, (4, 5, 1))
    ramp[0] = 0  # outside the brain
    out = _thick(ramp, 2, 4.0, (1.0, 1.0, 1.0))
    assert (out[0] == 0).all() and (out[1:] > 0).all()
    assert np.abs(out[1:, :, 4:-4].astype(int) - ramp[1:, :, 4:-4]).max() <= 10  # a line stays near a line
    flat = np.full((6, 6, 20), 500, np.int16)
    assert (_thick(flat, 0, 3.0, (1.0, 1.0, 1.0)) == 500).all()


def test_no_confounders_is_the_clean_cohort_and_the_labels_are_the_same(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert prep_main(["synth", "--out", str(a), "--cases", "2", "--shape", "48", "48", "31", "--seed", "4"]) == 0
    assert prep_main(["synth", "--out", str(b), "--cases", "2", "--shape", "48", "48", "31", "--seed", "4",
                      "--no-confounders"]) == 0
    da, db = _digest(a), _digest(b)
    assert da.keys() == db.keys()
    assert all(da[k] == db[k] for k in da if k.endswith("_seg.nii.gz"))
    assert any(da[k] != db[k] for k in da if not k.endswith("_seg.nii.gz"))
    clean = tmp_path / "clean"
    synth_cohort(SynthConfig(out=clean, cases=2, seed=4, shape=(48, 48, 31), confounders=False), progress=False)
    assert _digest(clean) == db
