from prep.splits import make_splits


def _cases(n, start=0):
    return {f"BraTS2021_{i:05d}": f"BraTS2021_{i:05d}" for i in range(start, start + n)}


def test_ratios_and_folds_over_train_val():
    s = make_splits(_cases(100), seed=0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (75, 15, 10)
    assert not set(s["train"]) & set(s["val"]) and not set(s["test"]) & (set(s["train"]) | set(s["val"]))
    trval = set(s["train"]) | set(s["val"])
    assert len(s["folds"]) == 5
    vals = [set(f["val"]) for f in s["folds"]]
    assert set().union(*vals) == trval and sum(len(v) for v in vals) == len(trval)  # a partition
    for f in s["folds"]:
        assert set(f["train"]) | set(f["val"]) == trval and not set(f["train"]) & set(f["val"])
        assert 17 <= len(f["val"]) <= 18


def test_seeded_and_deterministic():
    assert make_splits(_cases(40), seed=1) == make_splits(_cases(40), seed=1)
    assert make_splits(_cases(40), seed=1)["test"] != make_splits(_cases(40), seed=2)["test"]


def test_stable_when_cases_are_added():
    first = make_splits(_cases(40), seed=0)
    more = make_splits(_cases(60), seed=0, previous=first)
    for k in ("train", "val", "test"):
        assert set(first[k]) <= set(more[k])
    old_fold = {c: i for i, f in enumerate(first["folds"]) for c in f["val"]}
    new_fold = {c: i for i, f in enumerate(more["folds"]) for c in f["val"]}
    assert all(new_fold[c] == f for c, f in old_fold.items())
    assert abs(len(more["test"]) - 6) <= 1 and abs(len(more["val"]) - 9) <= 1


def test_patients_stay_together():
    cases = {f"BraTS-GLI-{p:05d}-{t:03d}": f"BraTS-GLI-{p:05d}" for p in range(30) for t in range(2)}
    s = make_splits(cases, seed=0)
    where = {c: k for k in ("train", "val", "test") for c in s[k]}
    for p in range(30):
        assert where[f"BraTS-GLI-{p:05d}-000"] == where[f"BraTS-GLI-{p:05d}-001"]
    fold = {c: i for i, f in enumerate(s["folds"]) for c in f["val"]}
    for p in range(30):
        a, b = f"BraTS-GLI-{p:05d}-000", f"BraTS-GLI-{p:05d}-001"
        assert fold.get(a) == fold.get(b)


def test_tiny_cohort_keeps_a_training_case():
    s = make_splits(_cases(2), seed=0)
    assert len(s["train"]) >= 1 and len(s["train"]) + len(s["val"]) + len(s["test"]) == 2
