"""Case discovery for BraTS folders (2018-2021 and 2023+ layouts).

A case is a folder ``<case_id>/`` holding ``<case_id>_<suffix>.nii.gz`` (2018-2021: t1, t1ce, t2, flair, seg) or
``<case_id>-<suffix>.nii.gz`` (2023+: t1n, t1c, t2w, t2f, seg), at any depth under the cohort folder: folders
without BraTS-named NIfTI files are walked into (hidden ones are reported, not entered). A case under a folder
named ``HGG`` or ``LGG`` (BraTS 2018-2020 as downloaded) keeps that grade. Modalities are mapped to one vocabulary
(t1, t1ce, t2, flair); the BraTS 2023+ task (GLI, MEN, MET, PED, SSA, GoAT) comes from the case id. Files that are
not BraTS-named are ignored. The Medical Segmentation Decathlon's Task01_BrainTumour (``dataset.json``,
``imagesTr/`` 4D images, ``labelsTr/``, ``imagesTs/``) is read as well: its channels split into the four
modalities by ``dataset.json``'s order, its labels mapped to the BraTS 2021 convention by their names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from store.conventions import MODALITIES, task_of

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
    grade: str | None = None  # HGG or LGG: BraTS 2018-2020 cases under a folder of that name
    # the Medical Segmentation Decathlon (layout "msd"): every modality is a channel of one 4D file
    channels: dict | None = None  # modality -> channel index in the 4D image
    n_channels: int | None = None  # the channels dataset.json lists
    source_labels: dict | None = None  # source label value -> its BraTS 2021 value (MSD's 1 oedema -> 2, ...)
    root: Path | None = None  # the cohort folder it was found under (None: a case folder given by itself)

    def source_name(self, path: Path) -> str:
        """How the store records one of the case's files: its name where it lies in ``<root>/<case_id>/``, else
        its path relative to the cohort folder (nested cohorts, MSD's imagesTr/ and labelsTr/)."""
        path = Path(path)
        if self.root is None or path.parent.name == self.case_id and path.parent.parent == self.root:
            return path.name
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    @property
    def label_convention(self) -> str:
        """The convention of the labels as read (MSD labels are mapped to BraTS 2021's)."""
        return "brats2021" if self.layout == "msd" else self.layout

    @property
    def task(self) -> str:
        """The BraTS task the case id names (gli for ids of no task)."""
        return task_of(self.case_id)

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
        return "brats2021" if self.layout == "msd" else self.layout

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


def discover_case(folder: str | Path, require_seg: bool = True, required=MODALITIES,
                  grade: str | None = None) -> CaseFiles:
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
    return CaseFiles(case_id, layout, {m: images[m] for m in MODALITIES if m in images}, seg, grade)


GRADES = ("HGG", "LGG")
# the Medical Segmentation Decathlon's Task01_BrainTumour (MONAI's BraTS tutorial data): dataset.json's names
MSD_MODALITIES = {"flair": "flair", "t1w": "t1", "t1": "t1", "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce",
                  "t2w": "t2", "t2": "t2"}
MSD_LABELS = {"background": 0, "edema": 2, "oedema": 2, "non-enhancing tumor": 1, "non-enhancing tumour": 1,
              "enhancing tumor": 4, "enhancing tumour": 4}
MSD_FIX = ("a Task01_BrainTumour dataset.json names the four modalities (FLAIR, T1w, t1gd, T2w) and the labels "
           "background, edema, non-enhancing tumor, enhancing tumour")


def is_msd(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir()


def msd_conventions(folder: Path) -> tuple[dict, int, dict]:
    """(modality -> channel, channel count, source label -> BraTS 2021 label) from an MSD dataset.json; a
    DiscoveryError naming the file and the fix for anything else."""
    import json

    path = folder / "dataset.json"
    try:
        meta = json.loads(path.read_text())
        modality, labels = meta["modality"], meta["labels"]
        channels = {MSD_MODALITIES[str(v).strip().lower()]: int(k) for k, v in modality.items()
                    if str(v).strip().lower() in MSD_MODALITIES}
        unknown_labels = [v for v in labels.values() if str(v).strip().lower() not in MSD_LABELS]
        lut = {int(k): MSD_LABELS[str(v).strip().lower()] for k, v in labels.items()
               if str(v).strip().lower() in MSD_LABELS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DiscoveryError(f"{path}: not a readable MSD dataset.json ({type(e).__name__}: {e}); {MSD_FIX}") from None
    if sorted(channels) != sorted(MODALITIES) or len(channels) != len(modality):
        raise DiscoveryError(f"{path}: modalities {list(modality.values())} are not the four BraTS modalities; "
                             f"{MSD_FIX}")
    if unknown_labels or sorted(lut.values()) != [0, 1, 2, 4]:
        raise DiscoveryError(f"{path}: labels {list(labels.values())} are not the BraTS tumour labels "
                             f"(unknown: {unknown_labels or 'none'}); {MSD_FIX}")
    return channels, len(modality), {str(k): v for k, v in sorted(lut.items())}


def discover_msd(folder: Path, rel: str, require_seg: bool, add, cohort: Cohort) -> None:
    """The cases of an MSD dataset folder: ``imagesTr/<case>.nii.gz`` (4D) with ``labelsTr/<case>.nii.gz``, and
    with ``require_seg`` False also ``imagesTs`` (no labels). ``add(case, rel)`` takes each case."""
    channels, n, lut = msd_conventions(folder)
    parts = [("imagesTr", "labelsTr")] + ([] if require_seg else [("imagesTs", None)])
    if require_seg and (folder / "imagesTs").is_dir():
        cohort.skipped[f"{rel}/imagesTs" if rel else "imagesTs"] = (
            "unlabelled test cases: 'python -m evaluate predict' reads them")
    for images, labels in parts:
        for f in sorted((folder / images).glob("*.nii*")) if (folder / images).is_dir() else []:
            m = _NIFTI.match(f.name)
            if f.name.startswith(".") or not m:  # macOS's ._ files come with the MSD archive
                continue
            cid, where = m.group("stem"), f"{rel}/{images}/{f.name}" if rel else f"{images}/{f.name}"
            seg = folder / labels / f.name if labels else None
            if seg is not None and not seg.is_file():
                if require_seg:
                    cohort.problems[where] = f"case {cid}: missing label {labels}/{f.name}"
                    continue
                seg = None
            add(CaseFiles(cid, "msd", {mod: f for mod in MODALITIES}, seg, None, channels, n, lut), where)


def discover(root: str | Path, require_seg: bool = True, required=MODALITIES) -> Cohort:
    """Find every case under ``root``, at any depth. Bad cases are collected in ``Cohort.problems`` (keyed by the
    folder's path under ``root``), never silently dropped; a case of another layout or task than the cohort's
    first is one of them."""
    root = Path(root)
    if not root.is_dir():
        raise DiscoveryError(f"cohort folder {root} does not exist or is not a folder")
    cohort = Cohort(root=root, layout=None)
    where: dict[str, str] = {}  # case id -> the folder it was found in
    tasks: list[str] = []

    def add(folder: Path | CaseFiles, rel: str, grade: str | None = None) -> None:
        if isinstance(folder, CaseFiles):
            case = folder
        else:
            try:
                case = discover_case(folder, require_seg=require_seg, required=required, grade=grade)
            except DiscoveryError as e:
                cohort.problems[rel] = str(e)
                return
        case = dataclasses.replace(case, root=root)
        if case.case_id in where:
            cohort.problems[rel] = f"case {case.case_id}: found twice, in {where[case.case_id]} and {rel}; keep one"
            return
        if cohort.layout is None:
            cohort.layout = case.layout
        elif case.layout != cohort.layout:
            cohort.problems[case.case_id] = (
                f"case {case.case_id}: {case.layout} layout in a {cohort.layout} cohort ({rel}); build each layout "
                f"into its own store")
            return
        if tasks and case.task != tasks[0]:
            cohort.problems[case.case_id] = (
                f"case {case.case_id}: task {case.task.upper()} in a {tasks[0].upper()} cohort ({rel}); build each "
                f"task into its own store (the lesion-wise scorer's parameters differ per task)")
            return
        tasks.append(case.task)
        where[case.case_id] = rel
        cohort.cases.append(case)

    def walk(folder: Path, rel: str, grade: str | None, ancestors: frozenset) -> None:
        try:
            children = sorted(folder.iterdir())
        except OSError as e:
            cohort.problems[rel or "."] = f"folder {rel or root}: cannot be listed ({e.strerror or e})"
            return
        for child in children:
            name = f"{rel}/{child.name}" if rel else child.name
            if child.is_symlink() and not child.exists():
                cohort.problems[name] = f"case folder {name}: a symbolic link that leads nowhere (broken, or a loop)"
                continue
            if not child.is_dir():
                continue
            if child.name.startswith("."):
                cohort.skipped[name] = "hidden folder"
                continue
            real = child.resolve()
            if real in ancestors:
                cohort.problems[name] = f"folder {name}: a symbolic link back to a folder above it (a loop)"
                continue
            try:
                holds_case = any(_parse(f.name) for f in child.iterdir() if f.is_file())
            except OSError as e:
                cohort.problems[name] = f"case folder {name}: cannot be listed ({e.strerror or e})"
                continue
            if holds_case:
                add(child, name, grade)
            elif is_msd(child):
                discover_msd(child, name, require_seg, add, cohort)
            else:
                walk(child, name, child.name.upper() if child.name.upper() in GRADES else grade, ancestors | {real})

    if is_msd(root):  # the MSD folder itself (Task01_BrainTumour)
        discover_msd(root, "", require_seg, add, cohort)
    else:
        walk(root, "", None, frozenset({root.resolve()}))
    if not cohort.cases and not cohort.problems:
        raise DiscoveryError(f"no BraTS cases found in {root} (nor in its subfolders)")
    return cohort
