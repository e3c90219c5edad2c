"""The store stays standard Zarr v3: tensorstore, zarr-python and zarr-python with the zarrs codec pipeline read
every stored array of a whole store equal to the project's own reader, locally and on object storage (a store
written by the remote writer), through each engine's own API and through ``benchmarks.engines`` (the loader's path)."""

import numpy as np
import pytest
import zarr

from benchmarks.engines import ENGINES, reading_with
from store import open_store

ARRAYS = ("image", "label", "foreground")
READER_CLASS = {"project": "ChunkReader", "tensorstore": "TensorstoreReader", "zarrs": "ZarrReader"}


def _project(store) -> dict:
    """Every array of every case through the project's reader (image as stored: int16)."""
    out = {}
    for cid in store.case_ids:
        case = store.case(cid)
        full = tuple(slice(0, n) for n in case.shape)
        image = case._reader("image").read((slice(0, len(case.meta["modalities"])), *full))
        out[cid] = {"image": image, "label": case.label(), "foreground": case.foreground()}
    return out


def _tensorstore(store, cid: str, name: str) -> np.ndarray:
    import tensorstore as ts

    from benchmarks.engines import kvstore_spec

    case = store.case(cid)
    key = f"{case._group_path}/{case.arrays_paths[name]}"
    spec = {"driver": "zarr3", "kvstore": kvstore_spec(store.location, key)}
    return ts.open(spec, read=True).result().read().result()


def _zarr(store, cid: str, name: str, zarrs: bool) -> np.ndarray:
    case = store.case(cid)
    pipeline = zarr.config.get("codec_pipeline.path")
    try:
        if zarrs:
            zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
        group = zarr.open_group(store.path, mode="r")
        return np.asarray(group[f"{case._group_path}/{case.arrays_paths[name]}"][...])
    finally:
        zarr.config.set({"codec_pipeline.path": pipeline})


def _check_every_engine(store) -> None:
    want = _project(store)
    assert want and all(w["label"].any() for w in want.values())  # real content, not all fill
    for cid, arrays in want.items():
        for name in ARRAYS:
            got = {"tensorstore": _tensorstore(store, cid, name), "zarr": _zarr(store, cid, name, False),
                   "zarr+zarrs": _zarr(store, cid, name, True)}
            for how, values in got.items():
                assert values.dtype == arrays[name].dtype and np.array_equal(values, arrays[name]), (cid, name, how)
    for name in ENGINES[1:]:  # the loader's path: the same decoded values whichever engine reads
        with reading_with(name):
            other = open_store(store.path)
            assert type(other.case(store.case_ids[0])._reader("image")).__name__ == READER_CLASS[name]
            for cid in store.case_ids:
                a, b = store.case(cid), other.case(cid)
                region = tuple(slice(1, n - 2) for n in a.shape)
                assert np.array_equal(a.image(region=region), b.image(region=region)), (cid, name)
                assert np.array_equal(a.label(region), b.label(region)), (cid, name)
                assert np.array_equal(a.decode_checked()[0].numpy(), b.decode_checked()[0].numpy()), (cid, name)
    after = open_store(store.path).case(store.case_ids[0])  # the project's own reader again, once the block ends
    assert type(after._reader("image")).__name__ == READER_CLASS["project"]


def test_every_engine_reads_a_local_store_as_the_project_does(tiny_store):
    _check_every_engine(open_store(tiny_store))


def test_every_engine_reads_a_store_written_to_object_storage(s3_server, tiny_cohort):
    from prep.build import BuildConfig, build_store

    from .conftest import TINY
    from .helpers import synth_spacing

    url = f"s3://{s3_server()}/brats.zarr"
    rep = build_store(BuildConfig(source=str(tiny_cohort), store=url, workers=0, spacing=synth_spacing(TINY)),
                      progress=False)
    assert rep.ok
    _check_every_engine(open_store(url))
    _check_ome(open_store(url))


def test_an_unknown_engine_is_named():
    with pytest.raises(ValueError, match="engine 'fast': the store readers are project, tensorstore"), \
            reading_with("fast"):
        pass


def _check_ome(store) -> None:
    """Each case group is an OME-Zarr 0.5 image (validated by ome-zarr-models): image on c, x, y, z in
    millimetres, its label layer labels/seg on x, y, z; scale and translation place every voxel where the stored
    affine does, in both."""
    from ome_zarr_models.v05.image import Image

    for cid in store.case_ids:
        case = store.case(cid)
        group = zarr.open_group(store.path, mode="r")[case._group_path]
        image = Image.from_zarr(group)
        ms = image.ome_attributes.multiscales
        assert [m.datasets[0].path for m in ms] == ["image"]
        assert [a.name for a in ms[0].axes] == ["c", "x", "y", "z"] and ms[0].axes[0].type == "channel"
        assert [a.unit for a in ms[0].axes[1:]] == ["millimeter"] * 3
        label = image.labels.get_image_labels_group("seg").ome_attributes.multiscales
        assert [m.datasets[0].path for m in label] == ["0"] and [a.name for a in label[0].axes] == ["x", "y", "z"]
        aff = np.asarray(case.meta["stored_affine"])
        for m, lead in zip((ms[0], label[0]), (1, 0)):
            scale, shift = (t.model_dump() for t in m.datasets[0].coordinateTransformations)
            idx = np.array([3, 5, 7])
            world = np.asarray(scale["scale"][lead:]) * idx + np.asarray(shift["translation"][lead:])
            assert np.allclose(world, (aff @ [*idx, 1])[:3])


def test_case_groups_carry_ome_zarr_geometry(tiny_store, tmp_path):
    _check_ome(open_store(tiny_store))
    # a wrong axis count is caught by the same validation (so the check above can fail)
    import json
    import shutil

    from ome_zarr_models.v05.image import Image

    copy = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, copy)
    case = open_store(copy).case(open_store(copy).case_ids[0])
    meta_path = copy / case._group_path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["ome"]["multiscales"][0]["axes"].pop(0)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        Image.from_zarr(zarr.open_group(str(copy), mode="r")[case._group_path])
