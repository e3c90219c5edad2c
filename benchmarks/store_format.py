"""Store format choices by measurement: dtype x chunk shape x codec on preprocessed full-size cases.

For each candidate: bytes per case, write seconds, whole-case read seconds and the read of a random 4 x 128^3
patch (both through the project's own reader, ``store.fastread`` + ``decode_into``, to float32), each the median
over the cases (patches: over 5 per case). The table it prints is the one in store/FORMAT.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .report import write_result


def _encode(image: np.ndarray, dtype: str, stds=None) -> tuple[np.ndarray, np.ndarray]:
    """Encoded array and per-channel scale: float16; int16 in steps of one source intensity unit (1/std);
    int16 over the full range of each channel."""
    if dtype == "float16":
        return image.astype(np.float16), np.ones(image.shape[0], np.float32)
    if dtype == "int16-source-unit":
        scale = (1.0 / np.asarray(stds)).astype(np.float32)
        return np.rint(image / scale[:, None, None, None]).astype(np.int16), scale
    peak = np.abs(image).reshape(image.shape[0], -1).max(1)
    scale = np.where(peak > 0, peak / 32000.0, 1.0).astype(np.float32)
    return np.rint(image / scale[:, None, None, None]).astype(np.int16), scale


def _read_times(reader, scale, rng, patches: int = 5) -> tuple[float, list[float]]:
    """Seconds to decode the whole image of ``reader`` to float32, and each of ``patches`` random 128^3 patches
    (all channels), through the project's own decode."""
    import torch

    from store.encoding import decode_into

    channels, shp = list(range(reader.shape[0])), np.array(reader.shape[1:])
    t0 = time.perf_counter()
    decode_into(reader, channels, scale, tuple(slice(0, n) for n in shp), torch.empty((len(channels), *shp)))
    whole, times = time.perf_counter() - t0, []
    ps = np.minimum(128, shp)
    for _ in range(patches):
        lo = [int(rng.integers(0, s - q + 1)) for s, q in zip(shp, ps)]
        t0 = time.perf_counter()
        decode_into(reader, channels, scale, tuple(slice(x, x + q) for x, q in zip(lo, ps)),
                    torch.empty((len(channels), *ps)))
        times.append(time.perf_counter() - t0)
    return whole, times


def run(out_dir: Path, cases: list, quick: bool = False) -> dict:
    import zarr
    from zarr.codecs import BloscCodec

    from prep.preprocess import preprocess
    from store.fastread import ChunkReader

    candidates = []
    for dtype in ("float16", "int16-scaled", "int16-source-unit"):
        for chunk in (64, 128):
            for cname, shuffle in (("lz4", "shuffle"), ("zstd", "shuffle"), ("zstd", "bitshuffle")):
                for block in ("auto", "chunk"):
                    candidates.append((dtype, chunk, cname, shuffle, block))
    if quick:
        candidates = [c for c in candidates if c[2] == "zstd" and c[3] == "shuffle" and c[0] != "int16-scaled"]
    pre = [preprocess(c) for c in cases]
    src_bytes = [sum(Path(p).stat().st_size for p in c.images.values()) for c in cases]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for dtype, chunk, cname, shuffle, block in candidates:
            rng = np.random.default_rng(0)  # the same patches for every candidate
            sizes, wt, rt, pt = [], [], [], []
            for i, p in enumerate(pre):
                path = Path(d) / f"{dtype}-{chunk}-{cname}-{shuffle}-{block}-{i}.zarr"
                enc, scale = _encode(p.image, dtype, [p.normalization[m]["std"] for m in p.modalities])
                chunks = (1, *(min(chunk, s) for s in enc.shape[1:]))
                bs = int(np.prod(chunks)) * enc.dtype.itemsize if block == "chunk" else 0
                t0 = time.perf_counter()
                a = zarr.create_array(str(path), shape=enc.shape, dtype=enc.dtype, chunks=chunks,
                                      compressors=[BloscCodec(cname=cname, clevel=1, shuffle=shuffle, blocksize=bs)])
                a[...] = enc
                wt.append(time.perf_counter() - t0)
                sizes.append(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
                whole, patches = _read_times(ChunkReader(a, path), scale, rng)  # float16: scale 1
                rt.append(whole)
                pt.extend(patches)
            rows.append({
                "dtype": dtype, "chunks": f"1x{chunk}^3", "codec": f"blosc {cname} {shuffle}",
                "blocksize": block,
                "mb_per_case": statistics.median(sizes) / 1e6,
                "ratio_to_nii_gz": statistics.median(s / b for s, b in zip(sizes, src_bytes)),
                "write_s": statistics.median(wt), "read_case_s": statistics.median(rt),
                "read_patch_s": statistics.median(pt),
            })
    lines = ["| dtype | chunks | codec | blosc block | MB/case | x .nii.gz | write s | read case s | read 4x128^3 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['chunks']} | {r['codec']} | {r['blocksize']} | {r['mb_per_case']:.1f} | "
                     f"{r['ratio_to_nii_gz']:.2f} | {r['write_s']:.3f} | {r['read_case_s']:.3f} | "
                     f"{r['read_patch_s']:.3f} |")
    table = "\n".join(lines)
    print(table)
    layout_rows, layout_table = _layouts(pre, src_bytes)
    print(layout_table)
    write_result(out_dir, "store_format", {"cases": len(cases), "source_nii_gz_mb": [b / 1e6 for b in src_bytes],
                                           "rows": rows, "table_markdown": table, "layout_rows": layout_rows,
                                           "layout_table_markdown": layout_table})
    return {"rows": rows, "table": table, "layout_rows": layout_rows, "layout_table": layout_table}


LAYOUTS = {  # name -> (chunk key separator, sharded)
    "one file per chunk, nested keys c/<c>/<i>/<j>/<k>": ("/", False),
    "one file per chunk, flat keys c.<c>.<i>.<j>.<k>": (".", False),
    "one shard per channel, c.<c>.0.0.0": (".", True),
}


def _layouts(pre: list, src_bytes: list) -> tuple[list, str]:
    """The chosen encoding, chunks and codec in each file layout, written by the build's own writer
    (``store.fastwrite``: metadata, folders, files) and read by its own reader: write seconds, files and bytes per
    case, whole-case and 4 x 128^3 patch reads."""
    import zarr

    from store.encoding import encode_image
    from store.fastread import ChunkReader
    from store.fastwrite import array_metadata, shard_shape, write_array
    from store.format import CURRENT

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, (sep, sharded) in LAYOUTS.items():
            rng = np.random.default_rng(0)
            sizes, files, wt, rt, pt = [], [], [], [], []
            for i, p in enumerate(pre):
                enc, scale = encode_image(p.image, p.source_unit)
                chunks = tuple(min(c, n) for c, n in zip(CURRENT.image_chunks, enc.shape))
                meta = array_metadata(enc.shape, enc.dtype, chunks, CURRENT.codec, separator=sep,
                                      shards=(1, *shard_shape(enc.shape[1:], chunks[1:])) if sharded else None)
                path = Path(d) / f"{sep == '/'}-{sharded}-{i}"
                t0 = time.perf_counter()
                write_array(path, meta, enc)
                wt.append(time.perf_counter() - t0)
                stored = [f for f in path.rglob("*") if f.is_file()]
                files.append(len(stored))
                sizes.append(sum(f.stat().st_size for f in stored))
                whole, patches = _read_times(ChunkReader(zarr.open_array(str(path)), path), scale, rng)
                rt.append(whole)
                pt.extend(patches)
            rows.append({"layout": name, "files_per_case": statistics.median(files),
                         "mb_per_case": statistics.median(sizes) / 1e6,
                         "ratio_to_nii_gz": statistics.median(s / b for s, b in zip(sizes, src_bytes)),
                         "write_s": statistics.median(wt), "read_case_s": statistics.median(rt),
                         "read_patch_s": statistics.median(pt)})
    lines = ["| image layout | files/case | MB/case | x .nii.gz | write s | read case s | read 4x128^3 s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['files_per_case']:.0f} | {r['mb_per_case']:.1f} | {r['ratio_to_nii_gz']:.2f} | "
              f"{r['write_s']:.3f} | {r['read_case_s']:.3f} | {r['read_patch_s']:.3f} |" for r in rows]
    return rows, "\n".join(lines)
