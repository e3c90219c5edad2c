import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import nibabel as nib
import numpy as np
import pytest

from prep.build import BuildConfig, build_store
from prep.cli import main as prep_main
from prep.discover import discover
from prep.preprocess import to_source_grid
from store import FormatError, open_store
from store.cli import main as store_main
from store.format import CURRENT

from .helpers import lps_affine, make_arrays, oblique_affine, write_case


def _monai_reference(case):
    from monai.transforms import (
        Compose,
        CropForegroundd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    keys = ["image", "label"]
    t = Compose([
        LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=(1, 1, 1), mode=("bilinear", "nearest")),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x != 0, margin=2, allow_smaller=True),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return t({"image": [str(case.images[m]) for m in ("t1", "t1ce", "t2", "flair")], "label": str(case.seg)})


def _permuted_1mm() -> np.ndarray:
    """1 mm axes stored as (S, R, P): a permutation and flips, still at the target spacing (the exact path)."""
    aff = np.zeros((4, 4))
    aff[0, 1], aff[1, 2], aff[2, 0], aff[3, 3] = 1.0, -1.0, 1.0, 1.0
    aff[:3, 3] = [-7.0, 12.0, 3.0]
    return aff


GEOMETRIES = {
    "lps-1mm": lps_affine(),
    "permuted-1mm": _permuted_1mm(),
    "anisotropic-0.9x0.9x3": lps_affine((0.9, 0.9, 3.0)),
    "oblique": oblique_affine(),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_values_equal_monai_chain(tmp_path, name):
    src = tmp_path / "raw"
    write_case(src, "BraTS2021_00000", GEOMETRIES[name])
    assert build_store(BuildConfig(source=str(src), store=str(tmp_path / "s.zarr"), workers=0),
                       progress=False).ok
    ref = _monai_reference(discover(src).cases[0])
    s = open_store(tmp_path / "s.zarr")
    c = s.case("BraTS2021_00000")
    img = c.image()
    ri = ref["image"].numpy()
    assert img.shape == ri.shape
    # the store keeps one source intensity unit per step (scale = 1 / std): error at most half a unit
    tol = 0.5 * c.scale + 1e-5
    assert (np.abs(img - ri).reshape(4, -1).max(1) <= tol).all()
    np.testing.assert_allclose(c.scale, [1 / c.meta["normalization"][m]["std"] for m in s.modalities], rtol=1e-6)
    np.testing.assert_array_equal(c.label(), ref["label"].numpy()[0].astype(np.uint8))
    np.testing.assert_allclose(c.meta["stored_affine"], ref["image"].affine.numpy(), atol=1e-5)
    # a subset of modalities reads just those channels
    np.testing.assert_array_equal(c.image(modalities=("t2",)), img[2:3])
    np.testing.assert_array_equal(c.image(modalities=("flair", "t1")), img[[3, 0]])


def test_label_maps_back_onto_source_grid(tmp_path):
    src = tmp_path / "raw"
    write_case(src, "BraTS2021_00000", lps_affine())
    build_store(BuildConfig(source=str(src), store=str(tmp_path / "s.zarr"), workers=0), progress=False)
    c = open_store(tmp_path / "s.zarr").case("BraTS2021_00000")
    back = to_source_grid(c.label(), c.meta)
    seg = nib.load(discover(src).cases[0].seg)
    assert back.shape == seg.shape
    np.testing.assert_array_equal(back, np.asanyarray(seg.dataobj))


def test_metadata_contract(tmp_path):
    src = tmp_path / "raw"
    for i in range(3):
        write_case(src, f"BraTS2021_0000{i}", seed=i)
    build_store(BuildConfig(source=str(src), store=str(tmp_path / "s.zarr"), workers=0), progress=False)
    s = open_store(tmp_path / "s.zarr")
    assert s.format_version == 2 and s.modalities == ("t1", "t1ce", "t2", "flair")
    assert s.label_convention == "brats2021" and s.case_ids == [f"BraTS2021_0000{i}" for i in range(3)]
    c = s.case("BraTS2021_00001")
    m = c.meta
    assert set(m["source_files"]) == {"t1", "t1ce", "t2", "flair", "seg"}
    assert all(len(h) == 64 for h in m["source_sha256"].values())
    assert m["source_shape"] == [30, 34, 22] and np.allclose(m["source_affine"], lps_affine())
    lab = c.label()
    assert m["label_counts"]["4"] == int((lab == 4).sum()) and m["region_counts"]["WT"] == int((lab > 0).sum())
    fg = c.foreground()
    for r, labels in enumerate(([1, 4], [1, 2, 4], [4])):
        pts = fg[fg[:, 0] == r][:, 1:]
        assert len(pts) == m["foreground_counts"][("TC", "WT", "ET")[r]] > 0
        assert np.isin(lab[tuple(pts.T)], labels).all()
    assert set(m["normalization"]) == set(s.modalities)
    img = c.image()
    for ch in range(4):
        v = img[ch][img[ch] != 0]
        assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01


def test_partial_read_touches_only_its_chunks(tmp_path):
    from store.format import CURRENT

    n = CURRENT.image_chunks[1]  # chunk edge along x
    src = tmp_path / "raw"
    write_case(src, "BraTS2021_00000", shape=(n + 12, 20, 16))  # long in x: two chunks
    build_store(BuildConfig(source=str(src), store=str(tmp_path / "s.zarr"), workers=0), progress=False)
    s = open_store(tmp_path / "s.zarr")
    c = s.case("BraTS2021_00000")
    assert c.shape[0] > n  # more than one chunk along x
    full = c.image(modalities=("t1",))
    # damage the last x-chunk of channel 0 (inside its shard): a read of the first n voxels must not touch it
    f, offset, length = c._reader("image").locate((0, 1, 0, 0))
    data = bytearray(f.read_bytes())
    data[offset:offset + length] = b"garbage".ljust(length, b"\0")
    f.write_bytes(bytes(data))
    part = c.image(modalities=("t1",), region=(slice(0, n - 20), slice(None), slice(None)))
    np.testing.assert_array_equal(part, full[:, : n - 20])
    with pytest.raises(Exception):  # noqa: B017 - zarr raises its codec's own error type
        c.image(modalities=("t1",))


def test_verify_catches_damaged_and_missing_chunk(tmp_path, capsys):
    src = tmp_path / "raw"
    write_case(src, "BraTS2021_00000")
    write_case(src, "BraTS2021_00001", seed=1)
    store = tmp_path / "s.zarr"
    build_store(BuildConfig(source=str(src), store=str(store), workers=0), progress=False)
    assert store_main(["verify", str(store)]) == 0
    s = open_store(store)
    img_dir = store / s.index["BraTS2021_00001"]["group"] / "image"
    shards = sorted(img_dir.glob("c.*"))
    assert len(shards) == 4  # one shard per channel
    good = shards[0].read_bytes()
    for where in (len(good) // 2, len(good) - 8):  # inside a chunk; inside the shard's index
        data = bytearray(good)
        data[where] ^= 0xFF
        shards[0].write_bytes(bytes(data))
        assert store_main(["verify", str(store)]) == 1
        assert "BraTS2021_00001" in capsys.readouterr().err
    shards[0].unlink()  # a missing shard reads as fill value: only the checksum can tell
    assert store_main(["verify", str(store)]) == 1


def test_info_summary(tmp_path, capsys):
    src = tmp_path / "raw"
    for i in range(4):
        write_case(src, f"BraTS2021_0000{i}", seed=i)
    build_store(BuildConfig(source=str(src), store=str(tmp_path / "s.zarr"), workers=0), progress=False)
    assert store_main(["info", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "cases      4" in out and "brats-zarr v2" in out and "t1, t1ce, t2, flair" in out and "on disk" in out


def test_rebuild_skips_unchanged_and_refuses_other_params(tmp_path, capsys):
    src = tmp_path / "raw"
    write_case(src, "BraTS2021_00000")
    write_case(src, "BraTS2021_00001", seed=1)
    store = str(tmp_path / "s.zarr")
    r1 = build_store(BuildConfig(source=str(src), store=store, workers=0), progress=False)
    assert sorted(r1.built) == ["BraTS2021_00000", "BraTS2021_00001"]
    r2 = build_store(BuildConfig(source=str(src), store=store, workers=0), progress=False)
    assert r2.built == [] and sorted(r2.skipped) == ["BraTS2021_00000", "BraTS2021_00001"]
    # a changed source is rebuilt, the other skipped
    write_case(src, "BraTS2021_00001", seed=5)
    r3 = build_store(BuildConfig(source=str(src), store=store, workers=0), progress=False)
    assert r3.built == ["BraTS2021_00001"] and r3.skipped == ["BraTS2021_00000"]
    assert store_main(["verify", store]) == 0
    with pytest.raises(FormatError, match="other parameters.*crop_margin.*--overwrite"):
        build_store(BuildConfig(source=str(src), store=store, workers=0, crop_margin=5), progress=False)
    rc = prep_main(["build-store", "--source", str(src), "--store", store, "--workers", "0", "--crop-margin", "5"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    r4 = build_store(BuildConfig(source=str(src), store=store, workers=0, crop_margin=5, overwrite=True),
                     progress=False)
    assert len(r4.built) == 2 and open_store(store).params["crop_margin"] == 5


def _bad_cohort(root):
    good = ["BraTS2021_00000", "BraTS2021_00001"]
    for i, cid in enumerate(good):
        write_case(root, cid, seed=i)
    write_case(root, "BraTS2021_00010", skip=("t2",))  # missing modality
    d = write_case(root, "BraTS2021_00011")  # truncated .nii.gz
    f = d / "BraTS2021_00011_flair.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    d = write_case(root, "BraTS2021_00012")  # modalities of different shapes
    nib.save(nib.Nifti1Image(np.ones((30, 34, 21), np.int16), lps_affine()), d / "BraTS2021_00012_t2.nii.gz")
    d = write_case(root, "BraTS2021_00013")  # modalities of different affines
    img = nib.load(d / "BraTS2021_00013_t1ce.nii.gz")
    moved = nib.Nifti1Image(np.asanyarray(img.dataobj), lps_affine((1.0, 1.0, 2.0)))
    nib.save(moved, d / "BraTS2021_00013_t1ce.nii.gz")
    d = write_case(root, "BraTS2021_00014")  # a 4D image
    nib.save(nib.Nifti1Image(np.ones((30, 34, 22, 3), np.int16), lps_affine()), d / "BraTS2021_00014_t1.nii.gz")
    d = write_case(root, "BraTS2021_00015")  # NaN voxels
    a = np.ones((30, 34, 22), np.float32)
    a[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(a, lps_affine()), d / "BraTS2021_00015_t2.nii.gz")
    d = write_case(root, "BraTS2021_00016")  # labels outside the convention (3 is 2023's ET)
    lab = np.asanyarray(nib.load(d / "BraTS2021_00016_seg.nii.gz").dataobj).copy()
    lab[lab == 4] = 3
    nib.save(nib.Nifti1Image(lab, lps_affine()), d / "BraTS2021_00016_seg.nii.gz")
    zeros = {m: np.zeros((30, 34, 22), np.int16) for m in ("t1", "t1ce", "t2", "flair")}
    write_case(root, "BraTS2021_00017", images=zeros, label=np.zeros((30, 34, 22), np.uint8))  # empty brain
    expected = {
        "BraTS2021_00010": "missing modality t2",
        "BraTS2021_00011": "corrupt or unreadable file BraTS2021_00011_flair.nii.gz",
        "BraTS2021_00012": "has shape",
        "BraTS2021_00013": "another affine",
        "BraTS2021_00014": "is 4D",
        "BraTS2021_00015": "NaN/Inf",
        "BraTS2021_00016": "label values [3] outside the brats2021",
        "BraTS2021_00017": "empty brain mask",
    }
    return good, expected


def test_bad_inputs_skipped_with_reasons(tmp_path, capsys):
    src = tmp_path / "raw"
    good, expected = _bad_cohort(src)
    store = str(tmp_path / "s.zarr")
    rc = prep_main(["build-store", "--source", str(src), "--store", store, "--workers", "0"])
    assert rc == 1
    err = capsys.readouterr().err
    s = open_store(store)
    assert s.case_ids == good
    assert set(s.failures) == set(expected)
    for cid, words in expected.items():
        assert words in s.failures[cid], (cid, s.failures[cid])
        assert cid in err and "\n" not in s.failures[cid]


def test_kill_and_resume(tmp_path):
    src = tmp_path / "raw"
    n = 8
    for i in range(n):
        write_case(src, f"BraTS2021_{i:05d}", seed=i, shape=(40, 44, 30))
    store = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "prep", "build-store", "--source", str(src), "--store", str(store), "--workers", "0",
           "--publish-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        published = 0
        while time.time() < deadline and proc.poll() is None:
            zj = store / "zarr.json"
            if zj.exists():
                try:
                    published = len(json.loads(zj.read_text())["attributes"]["index"])
                except (ValueError, KeyError):
                    published = 0
                if published >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = open_store(store)
    assert 2 <= len(partial) < n
    from store.verify import verify_case, verify_store

    for cid in partial.case_ids:  # whatever is visible is complete, and so are the splits over it
        assert verify_case(partial, cid) == []
    assert verify_store(partial) == []
    # what a kill at other moments leaves: a case folder made but no metadata yet, a group with half its arrays
    (store / "cases" / "BraTS2021_09998.0123456789ab").mkdir()
    half = store / "cases" / "BraTS2021_09999.0123456789ab"
    shutil.copytree(store / partial.index[partial.case_ids[0]]["group"], half)
    shutil.rmtree(half / CURRENT.label_path)
    r = build_store(BuildConfig(source=str(src), store=str(store), workers=0), progress=False)
    assert r.ok and len(r.skipped) == len(partial) and len(r.built) == n - len(partial)
    s = open_store(store)
    assert len(s) == n and verify_store(s) == []
    groups = {p.name for p in (store / "cases").iterdir() if p.is_dir()}
    assert groups == {rec["group"].split("/")[1] for rec in s.index.values()}  # no leftovers


def test_brats2023_layout(tmp_path):
    src = tmp_path / "raw"
    write_case(src, "BraTS-GLI-00000-000", layout="brats2023")
    write_case(src, "BraTS-GLI-00000-001", layout="brats2023", seed=1)
    build_store(BuildConfig(source=str(src), store=str(tmp_path / "s.zarr"), workers=0), progress=False)
    s = open_store(tmp_path / "s.zarr")
    assert s.label_convention == "brats2023"
    c = s.case("BraTS-GLI-00000-000")
    assert set(np.unique(c.label()).tolist()) <= {0, 1, 2, 3} and c.meta["region_counts"]["ET"] > 0
    assert c.meta["source_files"]["t1ce"] == "BraTS-GLI-00000-000-t1c.nii.gz"
    # two timepoints of one patient share a split
    sp = s.splits
    where = {cid: k for k in ("train", "val", "test") for cid in sp[k]}
    assert where["BraTS-GLI-00000-000"] == where["BraTS-GLI-00000-001"]


def test_build_workers_get_their_glibc_settings():
    """distributed's MALLOC_TRIM_THRESHOLD_=65536 would pin glibc's mmap threshold (a page fault per 4 KiB of every
    array a case allocates); the build's own workers start with BUILD_WORKER_MALLOC instead."""
    import os

    from distributed import Client

    from prep.build import BUILD_WORKER_MALLOC, local_cluster

    names = [*BUILD_WORKER_MALLOC, "OMP_NUM_THREADS"]
    before = {k: os.environ.get(k) for k in names}
    with local_cluster(1) as cluster, Client(cluster) as client:
        env = list(client.run(lambda: {k: os.environ.get(k) for k in names}).values())
    # distributed's other settings stay; a variable already set in the caller's environment wins over both
    want = {k: os.environ.get(k, v) for k, v in {**BUILD_WORKER_MALLOC, "OMP_NUM_THREADS": "1"}.items()}
    assert env == [want]
    assert {k: os.environ.get(k) for k in names} == before  # this process is left as it was


@pytest.mark.parametrize("dtype", ["int16", "uint8"])
@pytest.mark.parametrize("layout", ["shards", "chunk files", "chunk files, nested keys"])
def test_direct_writer_writes_what_zarr_writes_and_reads(tmp_path, dtype, layout):
    """The direct writer's metadata is zarr's own for the same array, every chunk holds the bytes zarr stores for
    it, chunks of fill value only are not stored, and both zarr and the direct reader read the values back, from
    either writer's files: in the store's layout (one shard per channel) and one file per chunk, also with the
    nested keys of stores written before."""
    import json

    import zarr

    from store.fastread import ChunkReader
    from store.fastwrite import array_metadata, shard_shape, write_array, write_array_zarr
    from store.format import CURRENT

    rng = np.random.default_rng(0)
    data = (rng.integers(-50, 50, (2, 70, 66, 20)) * (rng.random((2, 70, 66, 20)) > 0.3)).astype(dtype)
    data[1] = 0  # a channel of fill value only: no chunk (and no shard) stored for it
    data[0, 64:] = 0  # a chunk of fill value only inside a stored shard
    chunks = (1, 64, 64, 16)
    meta = array_metadata(data.shape, data.dtype, chunks, CURRENT.codec,
                          shards=(1, *shard_shape(data.shape[1:], chunks[1:])) if layout == "shards" else None,
                          dimension_names=["c", "x", "y", "z"], separator="/" if "nested" in layout else ".")
    write_array(tmp_path / "ours", meta, data)
    write_array_zarr(zarr.open_group(str(tmp_path / "g.zarr"), mode="w"), "theirs", meta, data)
    theirs = tmp_path / "g.zarr" / "theirs"
    assert json.loads((tmp_path / "ours" / "zarr.json").read_text()) == json.loads((theirs / "zarr.json").read_text())

    def stored(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json")

    sep = "/" if "nested" in layout else "."
    want = [sep.join(["c", "0", "0", str(j), str(k)]) for j in (0, 1) for k in (0, 1)]  # x-chunk 1 is all 0
    assert stored(tmp_path / "ours") == stored(theirs) == (["c.0.0.0.0"] if layout == "shards" else want)
    readers = [ChunkReader(zarr.open_array(str(p)), p) for p in (tmp_path / "ours", theirs)]
    assert all(r.fast for r in readers)
    for idx in itertools.product(range(2), range(2), range(2), range(2)):
        where = [r.locate(idx) for r in readers]
        assert (where[0] is None) == (where[1] is None) == (idx[0] == 1 or idx[1] == 1)
        if where[0] is not None:
            a, b = ((f.read_bytes()[o:o + n]) for f, o, n in where)
            assert a == b
    region = (slice(0, 2), slice(3, 70), slice(0, 66), slice(5, 19))
    for p, r in zip((tmp_path / "ours", theirs), readers):
        np.testing.assert_array_equal(zarr.open_array(str(p))[...], data)
        np.testing.assert_array_equal(r.read(region), data[region])


@pytest.mark.parametrize("damage, message", [("index bit", "CRC-32C"), ("cut to its start", "too short"),
                                             ("chunks cut, index kept", "beyond the end")])
def test_direct_reader_refuses_a_damaged_shard(tmp_path, damage, message):
    """A flipped bit in a shard's index, a shard cut shorter than its index, or one whose index points past its
    end: the direct reader says so instead of decoding wrong bytes; the other channel's shard still reads."""
    import zarr

    from store.fastread import ChunkReader
    from store.fastwrite import array_metadata, shard_shape, write_array
    from store.format import CURRENT

    data = np.arange(2 * 20 * 20 * 20, dtype=np.int16).reshape(2, 20, 20, 20)
    chunks = (1, 8, 8, 8)
    write_array(tmp_path / "a", array_metadata(data.shape, data.dtype, chunks, CURRENT.codec,
                                               shards=(1, *shard_shape(data.shape[1:], chunks[1:]))), data)
    shard = tmp_path / "a" / "c.0.0.0.0"
    raw = bytearray(shard.read_bytes())
    index_bytes = 16 * 27 + 4  # 3 x 3 x 3 chunks per shard, then the CRC-32C
    if damage == "index bit":
        raw[-10] ^= 0x01  # one bit of the last index entry
    elif damage == "cut to its start":
        raw = raw[:10]
    else:
        chunk_bytes = raw[:-index_bytes]
        raw = chunk_bytes[: len(chunk_bytes) // 2] + raw[-index_bytes:]
    shard.write_bytes(bytes(raw))
    reader = ChunkReader(zarr.open_array(str(tmp_path / "a")), tmp_path / "a")
    np.testing.assert_array_equal(reader.read((slice(1, 2), slice(None), slice(None), slice(None))), data[1:])
    with pytest.raises(ValueError, match=message):
        reader.read((slice(0, 1), slice(None), slice(None), slice(None)))


def test_normalization_equals_monai_on_constant_and_skewed_channels():
    """The one-pass statistics agree with MONAI's NormalizeIntensity (nonzero, channel_wise), also where the
    one-pass variance would cancel: a constant channel (std 0 -> divide by 1) and a large mean with a small spread."""
    from monai.transforms import NormalizeIntensity

    from prep.preprocess import normalize_nonzero

    rng = np.random.default_rng(0)
    a = np.zeros((3, 20, 20, 12), np.float32)
    a[0, 3:9] = 7.0
    a[1, 2:18] = rng.normal(4000.0, 0.5, (16, 20, 12)).astype(np.float32)
    a[2] = rng.gamma(2.0, 300.0, (20, 20, 12)).astype(np.float32) * (rng.random((20, 20, 12)) > 0.4)
    ours, stats = normalize_nonzero(a, ["t1", "t2", "flair"])
    ref = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(a.copy()))
    assert stats["t1"]["std"] == 0.0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8", "int32"])
def test_integer_encoding_equals_encoding_the_zscores(dtype):
    """The build's integer path (statistics from integer sums, an integer shift per channel) stores what encoding
    the float z-scores in source units stores, for every integer source type, a constant channel included."""
    from prep.preprocess import integer_nonzero_stats, normalize_nonzero
    from store.encoding import encode_image, encode_integer_source

    rng = np.random.default_rng(1)
    hi = 250 if dtype == "uint8" else 3000
    x = rng.integers(1, hi, (3, 12, 10, 9)).astype(dtype)
    x[:, :3] = 0
    x[2, 3:] = 17  # constant inside the brain: std 0
    z, norm = normalize_nonzero(x.astype(np.float32), ["a", "b", "c"])
    stats = [integer_nonzero_stats(x[c]) for c in range(3)]
    for (mean, std), m in zip(stats, "abc"):
        assert mean == pytest.approx(norm[m]["mean"], rel=1e-12) and std == pytest.approx(norm[m]["std"], rel=1e-9)
    ref = encode_image(z, [1 / s if s else 0.0 for _, s in stats])
    got = encode_integer_source(x.copy(), [m for m, _ in stats], [s for _, s in stats])
    assert got.values.dtype == np.int16 and np.array_equal(got.values, ref.values)
    np.testing.assert_allclose(got.scale, ref.scale, rtol=1e-12)
    assert not got.values[2].any() and got.scale[2] == 1.0


def test_integer_stats_refuse_sums_that_could_overflow():
    from prep.preprocess import integer_nonzero_stats

    x = np.full((4, 4, 4), 2_000_000_000, np.int64)  # 64 squares of 4e18: past int64
    assert integer_nonzero_stats(x) is None
    assert integer_nonzero_stats(x // 1000) == (2_000_000.0, 0.0)


def test_integer_encoding_refuses_what_does_not_fit():
    from store.encoding import encode_integer_source

    x = np.zeros((1, 4, 4, 4), np.uint16)
    x[0, 0, 0, :3] = [10, 100, 100]
    assert encode_integer_source(x.copy(), [70.0], [42.4]) is not None
    x[0, 0, 0, :3] = [10, 65000, 65000]  # 10 lies 43323 units below the mean
    assert encode_integer_source(x, [43336.7], [30637.0]) is None


def test_build_paths_store_the_same_values(tmp_path):
    """preprocess(encode=True) on integer 1 mm sources (no float image made) gives what encoding the float
    preprocessing gives; sources that do not fit the source-unit encoding take the float path."""
    from prep.preprocess import preprocess
    from store.encoding import encode_image

    write_case(tmp_path / "a", "BraTS2021_00000")
    case = discover(tmp_path / "a").cases[0]
    fast, ref = preprocess(case, encode=True), preprocess(case)
    enc = encode_image(ref.image, ref.source_unit)
    assert fast.image is None and fast.geometry == ref.geometry and np.array_equal(fast.label, ref.label)
    assert np.abs(fast.encoded.values.astype(int) - enc.values).max() <= 1  # float32 rounding at a tie, at most
    assert (fast.encoded.values == enc.values).mean() > 0.999
    np.testing.assert_allclose(fast.encoded.scale, enc.scale, rtol=1e-9)

    images, label = make_arrays()
    images["t1"] = images["t1"].astype(np.uint16)  # an unsigned source on the integer path
    write_case(tmp_path / "u", "BraTS2021_00002", images=images, label=label)
    case = discover(tmp_path / "u").cases[0]
    fast, ref = preprocess(case, encode=True), preprocess(case)
    assert fast.image is None and np.array_equal(fast.encoded.values, encode_image(ref.image, ref.source_unit).values)

    images["t2"] = images["t2"].astype(np.uint16) * 20  # a range over 32000 source units
    write_case(tmp_path / "b", "BraTS2021_00001", images=images, label=label)
    case = discover(tmp_path / "b").cases[0]
    wide, ref = preprocess(case, encode=True), preprocess(case)
    enc = encode_image(ref.image, ref.source_unit)
    assert np.array_equal(wide.encoded.values, enc.values) and wide.encoded.scale == enc.scale
    assert wide.encoded.scale[2] != pytest.approx(1 / ref.normalization["t2"]["std"])


def test_finished_cases_are_published_in_batches(tiny_cohort, tmp_path):
    from .conftest import TINY
    from .helpers import synth_spacing

    def build(every, name):
        return build_store(BuildConfig(source=str(tiny_cohort), store=str(tmp_path / name), workers=0,
                                       spacing=synth_spacing(TINY), publish_every_s=every), progress=False)

    one_by_one, batched = build(0, "a.zarr"), build(3600, "b.zarr")
    assert one_by_one.publications == 6 + 1  # each case, then the completed build's splits
    assert batched.publications == 1  # everything in the final write
    assert open_store(tmp_path / "a.zarr").index.keys() == open_store(tmp_path / "b.zarr").index.keys()
    assert open_store(tmp_path / "a.zarr").splits["train"] == open_store(tmp_path / "b.zarr").splits["train"]


def test_building_1mm_integer_cases_imports_neither_torch_nor_monai(tmp_path):
    """What keeps build-store's start-up short: a build task on BraTS-like sources (integers, axis-aligned, at the
    target spacing) loads no torch and no MONAI (seconds of imports in every fresh worker)."""
    write_case(tmp_path / "raw", "BraTS2021_00000", lps_affine())
    code = ("import sys; from prep.build import BuildConfig, build_store; "
            f"rep = build_store(BuildConfig(source={str(tmp_path / 'raw')!r}, store={str(tmp_path / 's.zarr')!r}, "
            "workers=0), progress=False); assert rep.ok and rep.built, rep; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
