"""The image decode (``store.encoding``: gather the chunks' int16 pieces into one block, then one vectorised
conversion) gives, bit for bit, what the per-chunk ``torch.mul`` of stored value and scale gave: for float32 and
float16 outputs, regions across chunk edges and not-stored chunks, offsets into a larger output, regions larger
than the thread's staging buffer, loader threads decoding at once, and the whole-case checked read in slabs."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import store.encoding as encoding
from store.encoding import decode_into, gather, scale_into

DTYPES = (torch.float32, torch.float16)


def _reference(values: np.ndarray, scale, dtype) -> torch.Tensor:
    """The decode as it was written first: torch's int16 times the float scale, into the output dtype."""
    out = torch.empty(values.shape, dtype=dtype)
    torch.mul(torch.from_numpy(np.ascontiguousarray(values)), float(np.float32(scale)), out=out)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_into_equals_torch_multiply_bit_for_bit(dtype, monkeypatch):
    """Every int16 value (the extremes too) times scales of every size the store writes (1 / std of integer
    sources, a spread range, 1), into a contiguous tensor and into a strided view; and with the float16 products
    formed a few rows at a time (a small ``CAST_BLOCK``), uneven rows last."""
    values = np.arange(-32768, 32768, dtype=np.int16).reshape(16, 64, 64)
    np.random.default_rng(0).shuffle(values.reshape(-1))
    scales = [1.0, 1 / 97.3, 1 / 3.0, 2.7e-5, 0.0123456789, 31.7 / 32000]
    for block in (1 << 22, 3 * 64 * 64):
        monkeypatch.setattr(encoding, "CAST_BLOCK", block)
        for s in scales:
            want = _reference(values, s, dtype)
            got = torch.empty(values.shape, dtype=dtype)
            scale_into(values, s, got)
            assert _same_bits(got, want), (s, block)
            wide = torch.full((20, 70, 66), 7.0, dtype=dtype)
            scale_into(values, s, wide[2:18, 3:67, 1:65])
            assert _same_bits(wide[2:18, 3:67, 1:65], want), (s, block)
            assert (wide[:2] == 7).all() and (wide[:, :3] == 7).all() and (wide[:, :, 65:] == 7).all()
    assert torch.isfinite(want).all() and (want != 0).any()


def _array(tmp_path, layout: str):
    """An int16 image (3, 21, 18, 13) in chunks of (1, 8, 8, 8): uneven edge chunks, a chunk and a channel of
    zeros only (not stored), in the store's shard layout or one file per chunk."""
    import zarr

    from store.fastread import ChunkReader
    from store.fastwrite import array_metadata, shard_shape, write_array
    from store.format import CURRENT

    rng = np.random.default_rng(1)
    data = rng.integers(-30000, 30000, (3, 21, 18, 13)).astype(np.int16)
    data[1] = 0
    data[0, 8:16, 0:8, 0:8] = 0
    chunks = (1, 8, 8, 8)
    meta = array_metadata(data.shape, data.dtype, chunks, CURRENT.codec,
                          shards=(1, *shard_shape(data.shape[1:], chunks[1:])) if layout == "shards" else None)
    write_array(tmp_path / layout, meta, data)
    reader = ChunkReader(zarr.open_array(str(tmp_path / layout)), tmp_path / layout)
    assert reader.fast
    return data, reader


REGIONS = [(slice(0, 21), slice(0, 18), slice(0, 13)), (slice(3, 20), slice(7, 9), slice(5, 13)),
           (slice(8, 16), slice(0, 8), slice(0, 8)), (slice(9, 10), slice(17, 18), slice(12, 13)),
           (slice(4, 4), slice(0, 18), slice(0, 13))]


@pytest.mark.parametrize("layout", ["shards", "chunk files"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_into_equals_the_per_chunk_multiply(tmp_path, layout, dtype, monkeypatch):
    """Regions over chunk edges, a not-stored chunk exactly, one voxel and none, each channel set, decoded at an
    offset into a larger output: the stored values times each channel's scale, bit for bit, and the rest of the
    output untouched; also where the region is larger than the thread's staging buffer (its own buffer then)."""
    data, reader = _array(tmp_path, layout)
    scales = np.asarray([1 / 41.5, 0.75, 3.1e-4], np.float32)
    for limit in (encoding.STAGE_LIMIT, 64):
        monkeypatch.setattr(encoding, "STAGE_LIMIT", limit)
        for region in REGIONS:
            for channels in ([0, 1, 2], [2, 0]):
                shape = tuple(s.stop - s.start for s in region)
                out = torch.full((len(channels), *(n + 3 for n in shape)), -5.0, dtype=dtype)
                decode_into(reader, channels, scales[channels], region, out, at=(1, 2, 0))
                box = (slice(1, 1 + shape[0]), slice(2, 2 + shape[1]), slice(0, shape[2]))
                for k, c in enumerate(channels):
                    want = _reference(data[c][region], scales[c], dtype)
                    assert _same_bits(out[k][box], want), (region, channels, limit)
                outside = torch.ones(out.shape[1:], dtype=torch.bool)
                outside[box] = False
                assert (out[:, outside] == -5).all()


def test_gather_gives_each_thread_its_own_staging(tmp_path):
    """Two loader threads gathering different regions at once each get their own region's values (the staging
    buffer is the thread's), decoded to the same bits as one thread alone."""
    data, reader = _array(tmp_path, "shards")
    rng = np.random.default_rng(2)
    regions = []
    for _ in range(60):
        lo = [int(rng.integers(0, n - 4)) for n in data.shape[1:]]
        regions.append((int(rng.integers(0, 3)), tuple(slice(a, int(rng.integers(a + 1, n + 1)))
                                                        for a, n in zip(lo, data.shape[1:]))))

    def one(item):
        c, region = item
        values = gather(reader, (slice(c, c + 1), *region)).copy()
        return np.array_equal(values, data[c][region])

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(one, regions * 3))


def test_the_checked_whole_case_read_in_slabs_equals_the_per_chunk_multiply(tiny_cohort, tmp_path, monkeypatch):
    """A store written with chunks of 8 voxels (so the whole-case read runs over several slabs, the last one
    short): ``decode_checked`` passes the checksum the build wrote over the whole arrays (so the slabs' running
    CRC is the whole one) and gives the stored values times the scale, as float16, bit for bit."""
    from prep.build import BuildConfig, build_store
    from store import open_store
    from store.format import FormatV1

    from .conftest import TINY
    from .helpers import synth_spacing

    monkeypatch.setattr(FormatV1, "image_chunks", (1, 8, 8, 8))
    monkeypatch.setattr(FormatV1, "label_chunks", (8, 8, 8))
    path = tmp_path / "small-chunks.zarr"
    rep = build_store(BuildConfig(source=str(tiny_cohort), store=str(path), workers=0,
                                  spacing=synth_spacing(TINY)), progress=False)
    assert rep.ok, rep.failed
    case = open_store(str(path)).case(open_store(str(path)).case_ids[0])
    reader = case._reader("image")
    assert reader.chunks == (1, 8, 8, 8) and case.shape[0] % 8 and case.shape[0] > 16
    stored = reader.read((slice(0, 4), *(slice(0, n) for n in case.shape)))
    image, label = case.decode_checked(["t2", "t1"])
    for k, c in enumerate([2, 0]):
        assert _same_bits(image[k], _reference(stored[c], case.scale[c], torch.float16))
    assert np.array_equal(label, case.label())
