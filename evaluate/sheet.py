"""One per-case score sheet: what ``evaluate`` (a run on a split) and ``evaluate score`` (a folder of predictions)
compute for a case from its two label maps, and how the cases' scores are collected, whether the cases are scored
in this process or on a Dask cluster's workers.

A case's scores (``score_label_maps``) are plain data (a row, its lesions, MONAI's per-region Dice), so a worker
can return them; the sheet (``ScoreSheet``) gathers them in any order and gives them back in case order, with
MONAI's DiceMetric mean computed as DiceMetric itself reduces its buffer (``do_metric_reduction``, "mean")."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CaseScores:
    """One case: its row (every family's scores, task, grid, voxel counts), its brats2023 lesions, and MONAI's
    DiceMetric per region (NaN where the reference region is empty, as DiceMetric ignores it)."""

    row: dict
    lesions: list
    monai_dice: list


def score_label_maps(cid: str, pred: np.ndarray, ref: np.ndarray, convention: str, spacing, families, task: str,
                     grid: str) -> CaseScores:
    """Every family of ``families`` for the label maps ``pred`` and ``ref`` (one convention, one grid of voxel size
    ``spacing``), the case's lesions where brats2023 is among them, and MONAI's per-region Dice."""
    from monai.metrics import DiceMetric

    from store.conventions import region_masks

    from .metrics import monai_dice_inputs
    from .scoring import score_case

    lesions = [] if "brats2023" in families else None
    scores = score_case(pred, ref, convention, spacing, families, case=cid, task=task, lesions=lesions)
    p_reg, g_reg = region_masks(pred, convention), region_masks(ref, convention)
    row = {"case": cid, **scores, "task": task, "grid": grid, "voxels_gt_wt": int(g_reg[1].sum()),
           "voxels_pred_wt": int(p_reg[1].sum())}
    monai = DiceMetric(include_background=True, reduction="none")(*monai_dice_inputs(p_reg, g_reg))
    return CaseScores(row, [{"case": cid, "region": r, **vars(lesion)} for r, lesion in (lesions or [])],
                      [float(v) for v in monai[0]])


@dataclass
class ScoreSheet:
    """Cases' scores as they arrive (``add``) and the cases that could not be scored (``problems``, one line
    each)."""

    cases: dict = field(default_factory=dict)
    problems: dict = field(default_factory=dict)
    order: list | None = None  # the cases' order in the reports (None: sorted by id)

    def add(self, scores: CaseScores) -> None:
        self.cases[scores.row["case"]] = scores

    @property
    def ids(self) -> list[str]:
        return [c for c in self.order if c in self.cases] if self.order is not None else sorted(self.cases)

    def __bool__(self) -> bool:
        return bool(self.cases)

    @property
    def rows(self) -> list[dict]:
        """Every scored case's row, in case order."""
        return [self.cases[c].row for c in self.ids]

    @property
    def lesions(self) -> list[dict]:
        return [lesion for c in self.ids for lesion in self.cases[c].lesions]

    def monai_dice_mean(self) -> float:
        """MONAI DiceMetric(include_background=True, reduction="mean") over the scored cases: its own reduction
        of the per-case values (NaN when no case was scored)."""
        import torch
        from monai.metrics.utils import do_metric_reduction

        if not self.cases:
            return float("nan")
        values = torch.tensor([self.cases[c].monai_dice for c in self.ids], dtype=torch.float32)
        return float(do_metric_reduction(values, "mean")[0])
