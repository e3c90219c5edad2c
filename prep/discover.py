"""Case discovery for BraTS folders (2018-2021 and 2023+ layouts).

A case is a folder ``<root>/<case_id>/`` holding ``<case_id>_<suffix>.nii.gz`` (2021: t1, t1ce, t2, flair, seg)
or ``<case_id>-<suffix>.nii.gz`` (2023: t1n, t1c, t2w, t2f, seg). Modalities are mapped to one vocabulary
(t1, t1ce, t2, flair). Folders without any BraTS-named NIfTI and files that are not BraTS-named are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from store.conventions import MODALITIES

LAYOUTS: dict[str, dict] = {
    "brats2021": {"sep": "_", "suffixes": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}},
    "brats2023": {"sep": "-", "suffixes": {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}},
}
SEG_SUFFIX = "seg"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NIFTI = re.compile(r"^(?P<stem>.+?)(?P<ext>\.nii(\.gz)?)$")


class DiscoveryError(ValueError):
    """A cohort folder that cannot be used; the message names the case and the file."""


@dataclass(frozen=True)
class CaseFiles:
    """The source files of one case. ``images`` maps the vocabulary name (t1, t1ce, t2, flair) to a path."""

    case_id: str
    layout: str
    images: dict[str, Path]
    seg: Path | None

    @property
    def label_convention(self) -> str:
        return self.layout

    @property
    def patient_id(self) -> str:
        """BraTS 2023 ids end in a timepoint (``-000``); cases of one patient must share a split."""
        if self.layout == "brats2023":
            return re.sub(r"-\d+$", "", self.case_id)
        return self.case_id


@dataclass
class Cohort:
    root: Path
    layout: str | None
    cases: list[CaseFiles] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # case id -> one-line reason
    skipped: dict[str, str] = field(default_factory=dict)  # folder name -> why it was not looked into

    @property
    def label_convention(self) -> str | None:
        return self.layout

    def raise_for_problems(self) -> None:
        if self.problems:
            raise DiscoveryError("; ".join(self.problems.values()))


def _parse(name: str) -> tuple[str, str, str] | None:
    """File name -> (prefix, separator, suffix) when it is BraTS-named, else None."""
    m = _NIFTI.match(name)
    if not m:
        return None
    stem = m.group("stem")
    for sep in ("_", "-"):
        prefix, s, suffix = stem.rpartition(sep)
        if s and prefix and _known_suffix(sep, suffix.lower()):
            return prefix, sep, suffix.lower()
    return None


def _known_suffix(sep: str, suffix: str) -> bool:
    if suffix == SEG_SUFFIX:
        return True
    return any(sep == lay["sep"] and suffix in lay["suffixes"] for lay in LAYOUTS.values())


def _layout_of(sep: str, suffixes: set[str]) -> str | None:
    for name, lay in LAYOUTS.items():
        if sep == lay["sep"] and (suffixes - {SEG_SUFFIX}) <= set(lay["suffixes"]):
            return name
    return None


def discover_case(folder: str | Path, require_seg: bool = True, required=MODALITIES) -> CaseFiles:
    """Discover one case folder; raise DiscoveryError naming the case and the file on bad input.

    ``required``: the modalities that must be present (all four by default; inference asks only for the ones
    its model reads). ``CaseFiles.images`` holds those found."""
    folder = Path(folder)
    case_id = folder.name
    if not _CASE_ID.match(case_id):
        raise DiscoveryError(f"case {case_id!r}: case id is not a plain name (letters, digits, '_', '-', '.')")
    found: dict[str, list[Path]] = {}
    seps: set[str] = set()
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        parsed = _parse(f.name)
        if parsed is None:
            continue  # unrelated file
        prefix, sep, suffix = parsed
        if prefix != case_id:
            raise DiscoveryError(f"case {case_id}: file {f.name} does not belong to this case (prefix {prefix!r})")
        seps.add(sep)
        found.setdefault(suffix, []).append(f)
    if not found:
        raise DiscoveryError(f"case {case_id}: no BraTS NIfTI files in {folder}")
    layout = _layout_of(seps.pop(), set(found)) if len(seps) == 1 else None
    if layout is None:
        names = ", ".join(p.name for ps in found.values() for p in ps)
        raise DiscoveryError(f"case {case_id}: files mix BraTS 2021 and 2023 naming ({names})")
    for suffix, paths in found.items():
        if len(paths) > 1:
            raise DiscoveryError(
                f"case {case_id}: two files for {suffix}: {', '.join(p.name for p in paths)}"
            )
    lay = LAYOUTS[layout]
    images: dict[str, Path] = {}
    for suffix, name in lay["suffixes"].items():
        if suffix in found:
            images[name] = found[suffix][0]
        elif name in required:
            raise DiscoveryError(
                f"case {case_id}: missing modality {name} (expected {case_id}{lay['sep']}{suffix}.nii.gz)"
            )
    seg = found.get(SEG_SUFFIX, [None])[0]
    if seg is None and require_seg:
        raise DiscoveryError(f"case {case_id}: missing seg (expected {case_id}{lay['sep']}seg.nii.gz)")
    return CaseFiles(case_id, layout, {m: images[m] for m in MODALITIES if m in images}, seg)


def discover(root: str | Path, require_seg: bool = True, required=MODALITIES) -> Cohort:
    """Find every case under ``root``. Bad cases are collected in ``Cohort.problems``, never silently dropped."""
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(f"cohort folder {root} does not exist or is not a folder")
    cohort = Cohort(root=root, layout=None)
    for folder in sorted(root.iterdir()):
        if folder.is_symlink() and not folder.exists():
            cohort.problems[folder.name] = (f"case folder {folder.name}: a symbolic link that leads nowhere "
                                            f"(broken, or a loop)")
            continue
        if not folder.is_dir():
            continue
        if folder.name.startswith("."):
            cohort.skipped[folder.name] = "hidden folder"
            continue
        try:
            if not any(_parse(f.name) for f in folder.iterdir() if f.is_file()):
                continue  # an unrelated folder
        except OSError as e:
            cohort.problems[folder.name] = f"case folder {folder.name}: cannot be listed ({e.strerror or e})"
            continue
        try:
            case = discover_case(folder, require_seg=require_seg, required=required)
        except DiscoveryError as e:
            cohort.problems[folder.name] = str(e)
            continue
        if cohort.layout is None:
            cohort.layout = case.layout
        elif case.layout != cohort.layout:
            cohort.problems[case.case_id] = (
                f"case {case.case_id}: {case.layout} layout in a {cohort.layout} cohort"
            )
            continue
        cohort.cases.append(case)
    if not cohort.cases and not cohort.problems:
        raise DiscoveryError(f"no BraTS cases found in {root}")
    return cohort
