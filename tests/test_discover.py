import pytest

from prep.discover import DiscoveryError, discover, discover_case

FILES_2021 = ("t1", "t1ce", "t2", "flair", "seg")
FILES_2023 = ("t1n", "t1c", "t2w", "t2f", "seg")


def _case(root, cid, suffixes, sep="_", ext=".nii.gz"):
    d = root / cid
    d.mkdir(parents=True)
    for s in suffixes:
        (d / f"{cid}{sep}{s}{ext}").write_bytes(b"")
    return d


def test_both_layouts_mapped_to_one_vocabulary(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _case(a, "BraTS2021_00001", FILES_2021)
    _case(a, "BraTS2021_00000", FILES_2021)
    _case(b, "BraTS-GLI-00002-001", FILES_2023, sep="-")
    c21, c23 = discover(a), discover(b)
    assert c21.layout == c21.label_convention == "brats2021"
    assert [c.case_id for c in c21.cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert c23.layout == "brats2023"
    case = c23.cases[0]
    assert list(case.images) == ["t1", "t1ce", "t2", "flair"]
    assert case.images["t1ce"].name == "BraTS-GLI-00002-001-t1c.nii.gz"
    assert case.images["flair"].name == "BraTS-GLI-00002-001-t2f.nii.gz"
    assert case.patient_id == "BraTS-GLI-00002"
    assert c21.cases[0].patient_id == "BraTS2021_00000"


def test_unrelated_files_and_folders_ignored(tmp_path):
    d = _case(tmp_path, "BraTS2021_00000", FILES_2021)
    (d / "notes.txt").write_text("x")
    (d / "BraTS2021_00000_t1_mask.png").write_bytes(b"")
    (d / ".BraTS2021_00000_t1.nii.gz").write_bytes(b"")  # hidden
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"")
    cohort = discover(tmp_path)
    assert [c.case_id for c in cohort.cases] == ["BraTS2021_00000"] and not cohort.problems


def test_missing_modality_names_case_and_file(tmp_path):
    d = _case(tmp_path, "BraTS2021_00007", ("t1", "t1ce", "flair", "seg"))
    with pytest.raises(DiscoveryError, match=r"case BraTS2021_00007: missing modality t2 .*BraTS2021_00007_t2"):
        discover_case(d)
    cohort = discover(tmp_path)
    assert not cohort.cases and "missing modality t2" in cohort.problems["BraTS2021_00007"]
    with pytest.raises(DiscoveryError, match="BraTS2021_00007"):
        cohort.raise_for_problems()


def test_missing_seg_is_an_error_unless_unlabelled(tmp_path):
    d = _case(tmp_path, "BraTS-GLI-00001-000", FILES_2023[:4], sep="-")
    with pytest.raises(DiscoveryError, match="case BraTS-GLI-00001-000: missing seg"):
        discover_case(d)
    case = discover_case(d, require_seg=False)
    assert case.seg is None and len(case.images) == 4


def test_two_files_for_one_modality(tmp_path):
    d = _case(tmp_path, "BraTS2021_00003", FILES_2021)
    (d / "BraTS2021_00003_t1.nii").write_bytes(b"")
    with pytest.raises(DiscoveryError, match=r"case BraTS2021_00003: two files for t1: .*_t1.nii"):
        discover_case(d)


def test_case_id_not_a_plain_name(tmp_path):
    d = _case(tmp_path, "BraTS 2021 (copy)", FILES_2021)
    with pytest.raises(DiscoveryError, match="not a plain name"):
        discover_case(d)
    assert "not a plain name" in discover(tmp_path).problems["BraTS 2021 (copy)"]


def test_file_of_another_case(tmp_path):
    d = _case(tmp_path, "BraTS2021_00001", FILES_2021)
    (d / "BraTS2021_00001_t2.nii.gz").rename(d / "BraTS2021_00002_t2.nii.gz")
    with pytest.raises(DiscoveryError, match="BraTS2021_00002_t2.nii.gz does not belong"):
        discover_case(d)


def test_mixed_naming_within_a_case_and_across_cases(tmp_path):
    d = _case(tmp_path / "x", "BraTS2021_00001", FILES_2021)
    (d / "BraTS2021_00001-t2w.nii.gz").write_bytes(b"")
    with pytest.raises(DiscoveryError, match="mix BraTS 2021 and 2023"):
        discover_case(d)
    root = tmp_path / "y"
    _case(root, "BraTS2021_00001", FILES_2021)
    _case(root, "BraTS-GLI-00001-000", FILES_2023, sep="-")
    cohort = discover(root)
    assert len(cohort.cases) == 1 and len(cohort.problems) == 1
    (reason,) = cohort.problems.values()
    assert "layout in a" in reason and "build each layout into its own store" in reason


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(DiscoveryError, match="no BraTS cases"):
        discover(tmp_path)
    with pytest.raises(DiscoveryError, match="does not exist"):
        discover(tmp_path / "nope")
