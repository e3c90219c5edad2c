"""The typed record a build hands the store for each case; the store validates it and alone knows how it is
spelled in the case's attributes (FORMAT.md, "Case attributes")."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .conventions import LABEL_CONVENTIONS, MODALITIES, TASKS
from .format import FormatError

GEOMETRY_KEYS = ("source_affine", "source_shape", "resampled_affine", "resampled_shape", "crop_box",
                 "stored_affine", "spacing_mm", "orientation")
# The way back from the stored grid to the source grid (prep.preprocess.to_source_grid): probabilities uncropped
# (0 outside the crop), then resampled linearly onto the source affine and shape, padded as MONAI's Spacing pads on
# the way in (border), then thresholded. The plan records it and the model card describes it from here.
SOURCE_GRID = {"interpolation": "bilinear", "padding_mode": "border"}


@dataclass(frozen=True)
class CaseRecord:
    case_id: str
    patient_id: str
    modalities: tuple[str, ...]
    label_convention: str | None
    source_files: dict  # modality or "seg" -> file name (in <cohort>/<case_id>/), else path from the cohort folder
    source_sha256: dict  # modality or "seg" -> sha256 of that file
    geometry: dict  # GEOMETRY_KEYS: what maps the stored grid back to the source
    normalization: dict  # modality -> {"mean", "std"} in source units
    label_counts: dict  # label value (str) -> voxels on the stored grid
    region_counts: dict  # region -> voxels
    foreground_counts: dict  # region -> rows of the foreground array
    params_hash: str
    task: str = "gli"  # the BraTS task the case id names (gli, men, met, ped, ssa, goat)
    grade: str | None = None  # HGG or LGG for BraTS 2018-2020 cases from folders of that name
    source_labels: dict | None = None  # source seg value (str) -> stored value, where they differ (MSD)
    layout: str | None = None  # the source's file layout: brats2021 (2018-2021 naming), brats2023, msd

    def validate(self) -> None:
        """Refuse a record the format cannot hold, naming the case and the field."""
        def bad(field: str, why: str):
            raise FormatError(f"case {self.case_id}: record field {field} {why}")

        if not self.case_id or "/" in self.case_id:
            bad("case_id", "must be a plain name")
        if not set(self.modalities) <= set(MODALITIES) or len(set(self.modalities)) != len(self.modalities):
            bad("modalities", f"must be distinct names among {', '.join(MODALITIES)}")
        if self.label_convention is not None and self.label_convention not in LABEL_CONVENTIONS:
            bad("label_convention", f"must be one of {', '.join(LABEL_CONVENTIONS)}")
        if set(self.source_files) != set(self.source_sha256):
            bad("source_sha256", "must name the same files as source_files")
        if missing := [k for k in GEOMETRY_KEYS if k not in self.geometry]:
            bad("geometry", f"lacks {', '.join(missing)}")
        for k in ("source_affine", "resampled_affine", "stored_affine"):
            a = self.geometry[k]
            if len(a) != 4 or any(len(row) != 4 for row in a):
                bad(f"geometry.{k}", "must be a 4x4 matrix")
        for k in ("source_shape", "resampled_shape", "spacing_mm"):
            if len(self.geometry[k]) != 3:
                bad(f"geometry.{k}", "must have 3 entries")
        if set(self.normalization) != set(self.modalities):
            bad("normalization", "must have one entry per modality")
        if self.task not in TASKS:
            bad("task", f"must be one of {', '.join(TASKS)}")
        if self.grade not in (None, "HGG", "LGG"):
            bad("grade", "must be HGG, LGG or absent")

    def to_attrs(self) -> dict:
        """The case attributes as FORMAT.md spells them (geometry keys at the top level)."""
        d = asdict(self)
        geometry = d.pop("geometry")
        d["modalities"] = list(d["modalities"])
        return {**d, **geometry}
