"""The store's cases as OME-Zarr: the segmentation is a label layer that ome-zarr-py (napari's reader) opens with
the BraTS classes' colours and names; stores of format 1, which lack it, still read and verify says so."""

import numpy as np
import pytest

from prep.build import BuildConfig, build_store
from store import open_store
from store.cli import main as store_main
from store.conventions import LABEL_CONVENTIONS
from store.ome import CLASS_RGBA

from .conftest import TINY
from .helpers import synth_spacing


def _nodes(path: str) -> list:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(path))())
    images = [n for n in nodes if n.specs and isinstance(n.specs[0], Multiscales) and not n.load(Label)]
    labels = [n for n in nodes if n.load(Label)]
    return images, labels


def test_ome_zarr_py_opens_the_label_layer(tiny_store):
    store = open_store(tiny_store)
    assert store.format_version == 2
    for cid in store.case_ids[:2]:
        case = store.case(cid)
        images, labels = _nodes(f"{tiny_store}/{case._group_path}")
        assert len(images) == 1 and len(labels) == 1
        image, label = images[0], labels[0]
        assert image.data[0].shape == (4, *case.shape)
        np.testing.assert_array_equal(np.asarray(label.data[0]), case.label())
        conv = LABEL_CONVENTIONS[case.label_convention]
        meaning = {conv[m]: m for m in ("necrosis", "edema", "enhancing")}
        assert set(label.metadata["color"]) == set(meaning)
        for value, m in meaning.items():
            assert label.metadata["color"][value] == [c / 255 for c in CLASS_RGBA[m]]
            assert label.metadata["properties"][value]["class"] == conv["labels"][str(value)]
        # the same world coordinates as the image: scale and translation of x, y, z
        img_t = image.metadata["coordinateTransformations"][0]
        lab_t = label.metadata["coordinateTransformations"][0]
        assert img_t[0]["scale"][1:] == lab_t[0]["scale"] == list(case.spacing)
        assert img_t[1]["translation"][1:] == lab_t[1]["translation"]


def test_a_format_1_store_reads_and_verify_says_what_it_lacks(tiny_cohort, tiny_store, tmp_path, monkeypatch, capsys):
    import store.format
    import store.writer

    monkeypatch.setattr(store.format, "CURRENT", store.format.FormatV1)
    monkeypatch.setattr(store.writer, "CURRENT", store.format.FormatV1)
    old = tmp_path / "v1.zarr"
    assert build_store(BuildConfig(source=str(tiny_cohort), store=str(old), workers=0, spacing=synth_spacing(TINY)),
                       progress=False).ok
    monkeypatch.undo()
    s1, s2 = open_store(old), open_store(tiny_store)
    assert s1.format_version == 1 and s1.case_ids == s2.case_ids
    for cid in s1.case_ids:
        c1, c2 = s1.case(cid), s2.case(cid)
        assert "labels" not in c1._group and "label" in c1._group
        np.testing.assert_array_equal(c1.label(), c2.label())
        np.testing.assert_array_equal(c1.image(), c2.image())
    capsys.readouterr()
    assert store_main(["verify", str(old)]) == 0
    out = capsys.readouterr().out
    assert "format 1" in out and "lacks the OME-Zarr label layer" in out and "--overwrite" in out
    assert store_main(["verify", tiny_store]) == 0
    assert "lacks" not in capsys.readouterr().out
    # the current code builds into it only with --overwrite (the format is one of the build's parameters)
    with pytest.raises(ValueError, match="format_version: 1 here, 2 now"):
        build_store(BuildConfig(source=str(tiny_cohort), store=str(old), workers=0, spacing=synth_spacing(TINY)),
                    progress=False)
