"""Postprocessing rules, learned on validation (evaluate.tuning) and replayed by every command, as nnU-Net and the
BraTS 2023 winners do.

Two kinds of rule, applied to the final label map on its own grid:

- per region (WT, TC, ET, RC, outer regions first), predicted 26-connected components under k mm^3 are removed
  from the region and the regions inside it (a removed WT speck becomes background, a removed TC speck oedema,
  a removed ET speck non-enhancing core); a case's largest component of the region is never removed, so a rule
  never deletes a region's only lesion;
- ET smaller than v mm^3 in total is relabelled as non-enhancing core (a tiny enhancing tumour is usually a false
  one, and a missed ET scores the penalty in every BraTS scorer).

``RUN/postprocessing.json`` holds them (``evaluate.tuning`` writes it); ``evaluate`` and ``evaluate predict`` read
it (``load_rules``) and apply it (``apply``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.conventions import compatible, region_masks, regions_to_label
from train.runfolder import POSTPROCESSING
from train.runs import RunError

from .metrics import voxel_mm3

FILE = POSTPROCESSING  # the rules file of a run folder (train.runfolder names it)
ET_RELABEL = "ET relabel"  # the rule that relabels a small ET as non-enhancing core, beside the region names
ORDER = ("WT", "TC", "ET", "RC")  # outer regions first: a removed WT speck takes its TC and ET with it
REMOVES = {"WT": ("WT", "TC", "ET"), "TC": ("TC", "ET"), "ET": ("ET",), "RC": ("RC",)}


class PostprocessingError(RunError):
    """A postprocessing.json that cannot be applied to this run or store; the message names the file."""


@dataclass(frozen=True)
class Rules:
    convention: str
    regions: tuple[str, ...]
    min_component_mm3: dict = field(default_factory=dict)  # region -> k (absent or 0: no rule)
    et_relabel_below_mm3: float = 0.0  # 0: no rule

    def describe(self) -> list[str]:
        """The rules in force, one line each (empty: none)."""
        out = [f"{r} components under {k:g} mm^3 removed" for r, k in self.min_component_mm3.items() if k]
        if self.et_relabel_below_mm3:
            out.append(f"ET under {self.et_relabel_below_mm3:g} mm^3 in total relabelled as non-enhancing core")
        return out

    def with_rule(self, region: str, mm3: float) -> Rules:
        """These rules with one more: ``region``'s components under ``mm3`` removed, or (``region`` ET_RELABEL) ET
        under ``mm3`` in total relabelled."""
        if region == ET_RELABEL:
            return Rules(self.convention, self.regions, self.min_component_mm3, float(mm3))
        return Rules(self.convention, self.regions, {**self.min_component_mm3, region: float(mm3)},
                     self.et_relabel_below_mm3)


def apply(label: np.ndarray, spacing, rules: Rules | None, convention: str | None = None) -> np.ndarray:
    """The label map (X, Y, Z) after the rules; ``spacing`` in mm per axis; ``convention`` of the label map
    (default: the rules'). No rules in force: the same array."""
    if rules is None or not rules.describe():
        return label
    from scipy.ndimage import label as components

    conv = convention or rules.convention
    names = rules.regions
    where = {n: i for i, n in enumerate(names)}
    r = region_masks(label, conv, names)
    voxel = voxel_mm3(spacing)
    for region in ORDER:
        k = rules.min_component_mm3.get(region, 0)
        if not k or region not in where:
            continue
        lab, n = components(r[where[region]], np.ones((3, 3, 3), bool))
        if not n:
            continue
        sizes = np.bincount(lab.ravel())
        small = sizes * voxel < k
        small[0] = False
        small[1 + int(np.argmax(sizes[1:]))] = False  # the largest stays
        gone = small[lab]
        for inner in REMOVES[region]:
            if inner in where:
                r[where[inner]] &= ~gone
    v = rules.et_relabel_below_mm3
    if v and "ET" in where and 0 < r[where["ET"]].sum() * voxel < v:
        r[where["ET"]] = False  # still in TC: non-enhancing core
    return regions_to_label(r, conv, names)


def load_rules(run_dir, convention: str, regions) -> Rules | None:
    """The run's postprocessing.json, checked against the label convention and regions it is applied to; None
    when the run has none."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise PostprocessingError(f"{path} is damaged ({type(e).__name__}: {e}): run 'python -m evaluate tune-"
                                  f"postprocessing --run-dir {run_dir}' again, or pass --no-postprocessing") from None
    return rules_from(d, path, convention, regions)


def rules_from(d: dict, source: Path, convention: str, regions) -> Rules:
    """Rules from a postprocessing record (postprocessing.json, or a model card's ``postprocessing``), checked
    against the label convention and regions they are applied to; ``source`` names the file in every message."""
    try:
        rules = Rules(d["convention"], tuple(d["regions"]), {k: float(v) for k, v in d["min_component_mm3"].items()},
                      float(d["et_relabel_below_mm3"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PostprocessingError(f"{source} is damaged ({type(e).__name__}: {e}): tune postprocessing again "
                                  f"('python -m evaluate tune-postprocessing'), or pass --no-postprocessing") from None
    if not (compatible(convention, rules.convention) or compatible(rules.convention, convention)):
        raise PostprocessingError(f"{source} was made for {rules.convention} labels, these are {convention} labels: "
                                  f"tune it again on this run, or pass --no-postprocessing")
    if tuple(regions) != rules.regions:
        raise PostprocessingError(f"{source} was made for regions {' '.join(rules.regions)}, the model outputs "
                                  f"{' '.join(regions)}: tune it again on this run, or pass --no-postprocessing")
    return rules
