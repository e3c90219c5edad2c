"""Train/val/test split by patient and k folds over train + val, stable when cases are added.

The first build splits its patients with a seeded shuffle (0.75 / 0.15 / 0.10) and sklearn's KFold over
train + val, as the seed did. A later build keeps every earlier assignment and gives each new patient, in a
seeded order, to the split (and fold) furthest below its share, so that adding cases never moves one.
"""

from __future__ import annotations

import numpy as np

RATIOS = {"train": 0.75, "val": 0.15, "test": 0.10}
N_FOLDS = 5


def _first_split(patients: list[str], rng: np.random.Generator) -> dict[str, str]:
    order = [patients[i] for i in rng.permutation(len(patients))]
    n = len(order)
    n_test = int(round(RATIOS["test"] * n))
    n_val = int(round(RATIOS["val"] * n))
    if n - n_test - n_val < 1:  # tiny cohorts: keep at least one training patient
        n_test, n_val = max(0, min(n_test, n - 1)), max(0, min(n_val, n - 1 - min(n_test, n - 1)))
    out = {}
    for i, p in enumerate(order):
        out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _first_folds(patients: list[str], seed: int, strata: dict[str, str] | None = None) -> dict[str, int]:
    """KFold over ``patients``; with ``strata`` (patient -> group), sklearn's StratifiedKFold, so each fold keeps
    the groups' ratio (where every group has at least as many patients as there are folds)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    k = min(N_FOLDS, len(patients))
    if k < 2:
        return {}
    labels = [strata[p] for p in patients] if strata else None
    if labels and min(labels.count(g) for g in set(labels)) >= k:
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(patients, labels)
    else:
        parts = KFold(n_splits=k, shuffle=True, random_state=seed).split(patients)
    folds = {}
    for f, (_, val_idx) in enumerate(parts):
        for i in val_idx:
            folds[patients[i]] = f
    return folds


def make_splits(case_patients: dict[str, str], seed: int, previous: dict | None = None,
                strata: dict[str, str] | None = None) -> dict:
    """Splits for the cases ``case_patients`` (case id -> patient id). ``strata`` (patient -> group, e.g. the
    grade) keeps each group's ratio in every split and fold: each group is split by itself, its folds drawn
    stratified, and a later build gives a new patient the split (and fold) furthest below its share among the
    patients of its own group.

    Returns ``{"train": [...], "val": [...], "test": [...], "folds": [{"train", "val"}...], "seed", "ratios",
    "patients": {patient: {"split", "fold"}}}`` with case ids sorted inside each list.
    """
    patients = sorted(set(case_patients.values()))
    prev = (previous or {}).get("patients", {})
    known = {p: prev[p] for p in patients if p in prev}
    new = [p for p in patients if p not in known]
    rng = np.random.default_rng(seed)
    group = (lambda p: strata[p]) if strata else (lambda p: "")
    if not known:
        split_of = {}
        for g in sorted({group(p) for p in patients}):
            split_of.update(_first_split([p for p in patients if group(p) == g], rng))
        trval = sorted(p for p in patients if split_of[p] != "test")
        fold_of = _first_folds(trval, seed, strata)
    else:
        split_of = {p: rec["split"] for p, rec in known.items()}
        fold_of = {p: rec["fold"] for p, rec in known.items() if rec.get("fold") is not None}
        n_folds = max(fold_of.values(), default=-1) + 1
        for p in [new[i] for i in rng.permutation(len(new))]:
            peers = [q for q in split_of if group(q) == group(p)]
            total = len(peers) + 1
            deficit = {s: RATIOS[s] * total - sum(split_of[q] == s for q in peers) for s in RATIOS}
            split_of[p] = max(RATIOS, key=lambda s: (deficit[s], RATIOS[s]))
            if split_of[p] != "test" and n_folds:
                sizes = [sum(fold_of.get(q) == f for q in peers) for f in range(n_folds)]
                fold_of[p] = int(np.argmin(sizes))
    n_folds = max(fold_of.values(), default=-1) + 1
    by_patient: dict[str, list[str]] = {}
    for c, p in case_patients.items():
        by_patient.setdefault(p, []).append(c)

    def cases(ps):
        return sorted(c for p in ps for c in by_patient.get(p, []))

    out = {s: cases(p for p in patients if split_of[p] == s) for s in RATIOS}
    out["folds"] = [
        {"train": cases(p for p in fold_of if fold_of[p] != f), "val": cases(p for p in fold_of if fold_of[p] == f)}
        for f in range(n_folds)
    ]
    out["seed"] = seed
    out["ratios"] = RATIOS
    if strata:
        out["stratified"] = {g: {s: sum(split_of[p] == s for p in patients if group(p) == g) for s in RATIOS}
                             for g in sorted({group(p) for p in patients})}
    out["patients"] = {**prev, **{p: {"split": split_of[p], "fold": fold_of.get(p)} for p in patients}}
    return out
