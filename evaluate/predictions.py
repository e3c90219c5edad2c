"""Predictions for raw case folders, written as label NIfTI files in each case's source geometry and label
convention (what a challenge submission holds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train.runs import RunError


def _model_and_device(run_dir: str, ensemble: bool, device: str, model: str | None = None):
    """The run's loaded models (or the exported ``model``: a file from ``python -m train export``) and the
    device."""
    from train.device import resolve_device
    from train.runs import load_run

    dev = resolve_device(device)
    if model is None:
        return load_run(run_dir, ensemble, dev), dev
    if ensemble:
        raise RunError("--ensemble with --model: an exported model is one network already (export a k-fold run "
                       "with 'python -m train export --ensemble')")
    from .exported import load_exported

    return load_exported(model, dev), dev


def _predictor(run, dev, tta: bool, convention: str, rules=None):
    """(load, infer, finish) for ``run_pipeline``: preprocess as the run's store was built, predict, write the
    label map in the case's source geometry, after the run's postprocessing ``rules`` (postprocess.Rules)."""
    from prep.preprocess import preprocess
    from store.conventions import regions_to_label

    from .cases import regions_on_source, spacing_of, write_prediction
    from .inference import predict_probabilities
    from .postprocess import apply

    mods = tuple(run.config.modalities)
    params = run.preprocessing.get("params", {})

    def load(job):
        case, _ = job
        return preprocess(case, mods, with_label=False, margin=params.get("crop_margin", 2),
                          spacing=params.get("spacing_mm", (1.0, 1.0, 1.0)))

    def infer(pre):
        return predict_probabilities(run, pre.image, dev, tta)

    def finish(job, pre, prob):
        case, out = job
        label = regions_to_label(regions_on_source(prob, pre.geometry, run.config.threshold), convention,
                                 run.config.regions)
        label = apply(label, spacing_of(pre.geometry["source_affine"]), rules, convention)
        write_prediction(label, pre.geometry["source_affine"], out, case.images[mods[0]], case.source_labels)
        return label

    return load, infer, finish


def _postprocessing_rules(run_dir: str, run, convention: str, postprocessing: bool):
    """The rules for the run's regions (None with ``postprocessing`` off): ``run_dir``'s postprocessing.json, or an
    exported model's card's."""
    from .exported import card_rules
    from .postprocess import load_rules

    if not postprocessing:
        return None
    if run.card is not None:
        return card_rules(run, convention, run.config.regions)
    return load_rules(run_dir, convention, run.config.regions)


def _check_case_output(case_dir: str, out: str, overwrite: bool) -> Path:
    """``predict --case``'s output file, checked before any work: a .nii.gz path outside the case folder (through
    links), not a folder, not an existing file unless ``overwrite``, in a folder that can be written."""
    from prep.discover import DiscoveryError

    from .outputs import OutputError, refuse_existing, refuse_inside, writable_folder

    if not Path(case_dir).is_dir():
        raise DiscoveryError(f"--case {case_dir}: {'not a folder' if Path(case_dir).exists() else 'no such folder'}"
                             f" (one case folder, e.g. data/raw/BraTS2021_00000)")
    if "://" in str(out):
        raise OutputError(f"--out {out}: with --case, --out names a local .nii.gz file (--source writes a cohort's "
                          f"predictions to object storage)")
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"--out {out}: a folder; with --case, --out names the .nii.gz file to write (--source "
                          f"predicts a cohort into a folder)")
    if not path.name.endswith(".nii.gz"):
        raise OutputError(f"--out {out}: with --case, --out names a .nii.gz file")
    refuse_inside(path, "--out", {"--case": case_dir})
    if not overwrite:
        refuse_existing([path], "--out")
    writable_folder(path.parent, "--out")
    return path


def predict_case(run_dir: str, case_dir: str, out: str, ensemble: bool = False, device: str = "auto",
                 tta: bool = False, postprocessing: bool = True, model: str | None = None,
                 overwrite: bool = False) -> Path:
    """Predict a raw case folder and write the labels in its source geometry and label convention, after the
    run's postprocessing.json when it has one and ``postprocessing``. ``model``: an exported model file instead
    of the run (its card carries the postprocessing exported with it). ``out`` must lie outside the case folder
    and may replace an existing file only with ``overwrite``."""
    from prep.discover import discover_case

    path = _check_case_output(case_dir, out, overwrite)
    run, dev = _model_and_device(run_dir, ensemble, device, model)
    case = discover_case(case_dir, require_seg=False, required=tuple(run.config.modalities))
    convention = _output_convention(run, case.label_convention)
    rules = _postprocessing_rules(run_dir, run, convention, postprocessing)
    load, infer, finish = _predictor(run, dev, tta, convention, rules)
    pre = load((case, path))
    label = finish((case, path), pre, infer(pre))
    counts = {int(v): int(c) for v, c in zip(*np.unique(label, return_counts=True)) if v}
    print(f"{case.case_id}: wrote {path} ({'x'.join(map(str, label.shape))}, {convention} labels, "
          f"voxels per label {counts})")
    return path


MARKER = ".predicted-by.json"  # in a --source prediction folder: which model, TTA and rules wrote its files


def _identity(run, tta: bool, rules) -> dict:
    """What makes a prediction folder's files: the model files' bytes (hashed), test-time augmentation, the rules."""
    import dataclasses
    import hashlib

    h = hashlib.sha256()
    for path in run.checkpoints:
        h.update(Path(path).read_bytes())
    return {"model_sha256": h.hexdigest(), "kind": run.kind, "tta": bool(tta),
            "postprocessing": dataclasses.asdict(rules) if rules is not None else None}


class _Folder:
    """``predict --source``'s --out: a local folder (outside the cohort through links, and writable) or an
    object-storage prefix (s3://bucket/path: its bucket answers), checked before any work; what it holds, its
    marker, and each case's file, written by store.location.Location either way."""

    def __init__(self, out: str, source: str):
        from store.location import Location

        from .outputs import refuse_inside, writable_folder

        self.loc = Location(str(out))
        if self.loc.remote:
            self.loc.check_reachable()
            self.root = str(out).rstrip("/")
        else:
            self.root = refuse_inside(out, "--out", {"--source": source})
            writable_folder(self.root, "--out")
            self.loc = Location(self.root)

    def path(self, name: str):
        return f"{self.root}/{name}" if self.loc.remote else self.root / name

    def names(self) -> set[str]:
        """The files directly in the folder (one listing)."""
        return {k for k in self.loc.sizes("") if "/" not in k}

    def check_marker(self, identity: dict, overwrite: bool, there: set[str]) -> None:
        """A folder holding another model's predictions (its marker differs) is refused in one line; the marker is
        (re)written before any prediction, so an interrupted run leaves it. ``there``: ``names()``, listed once."""
        from .outputs import OutputError

        if MARKER in there and not overwrite:
            try:
                before = json.loads(self.loc.read_bytes(MARKER))
            except ValueError:
                before = None
            if before != identity:
                changed = ", ".join(k for k in identity if not isinstance(before, dict)
                                    or before.get(k) != identity[k])
                raise OutputError(f"--out {self.root} holds predictions made otherwise (their {changed} differ, by "
                                  f"its {MARKER}): choose another --out, or --overwrite to replace them")
        self.loc.write_atomic(MARKER, (json.dumps(identity, indent=2) + "\n").encode())


def _written(path) -> bool:
    """A prediction file at ``path`` (local, or an object-storage URL) is there."""
    from store.location import remote_file

    if remote := remote_file(path):
        return remote[0].exists(remote[1])
    return Path(path).exists()


def predict_folder(run_dir: str, source: str, out: str, ensemble: bool = False, device: str = "auto",
                   tta: bool = False, progress: bool = True, postprocessing: bool = True,
                   model: str | None = None, overwrite: bool = False, cluster=None) -> dict:
    """Every case folder under ``source`` (BraTS 2021, 2023 or 2024 layout, no seg needed) -> ``out/<case-id>.nii.gz``
    in its source geometry and label convention, as challenge submissions are named. Files already in ``out``
    are kept (a killed run resumes), unless ``overwrite``; a bad case is reported and the others are predicted.
    ``out`` outside the cohort (through links) and writable, checked before any work; or an object-storage URL
    (s3://bucket/prefix), each file one PUT. ``model``: an exported
    model file instead of the run. ``cluster``: evaluate.cluster.run_on_cluster with its address bound, which runs
    ``predict_task`` for each case on a Dask cluster's workers: the same files.
    ``out/.predicted-by.json`` names the model, TTA and rules that wrote the folder; another model's folder is
    refused. Returns {"written", "skipped", "failed": {case: reason}}."""
    from prep.discover import discover

    dst = _Folder(out, source)
    # on a cluster the workers predict on ``device``; this process reads the run only for what it records (its
    # modalities, convention, files and rules), on the CPU, so a driver without the workers' GPU can start them
    run, dev = _model_and_device(run_dir, ensemble, "cpu" if cluster is not None else device, model)
    cohort = discover(source, require_seg=False, required=tuple(run.config.modalities))
    failed = dict(cohort.problems)
    if not cohort.cases:
        return {"written": [], "skipped": [], "failed": failed}
    convention = _output_convention(run, cohort.label_convention)
    jobs, skipped, there = [], [], dst.names()
    for case in cohort.cases:
        name = f"{case.case_id}.nii.gz"
        (skipped.append(case.case_id) if name in there and not overwrite else jobs.append((case, dst.path(name))))
    rules = _postprocessing_rules(run_dir, run, convention, postprocessing)
    dst.check_marker(_identity(run, tta, rules), overwrite, there)
    if cluster is not None:
        spec = {"run_dir": run_dir, "ensemble": ensemble, "device": device, "model": model, "tta": tta,
                "convention": convention, "postprocessing": postprocessing}
        done, errors = cluster({case.case_id: (predict_task, (spec, case, str(path))) for case, path in jobs},
                               "predict", progress=progress)
        written = sorted(done)
    else:
        written, errors = predict_jobs(run, dev, jobs, convention, tta, progress, rules)
    failed.update(errors)
    return {"written": written, "skipped": skipped, "failed": failed, "ignored": dict(cohort.skipped)}


def predict_jobs(run, dev, jobs: list, convention: str, tta: bool = False, progress: bool = False, rules=None):
    """Predict (CaseFiles, output path) jobs through the pipeline; returns (written case ids, {case: reason})."""
    from store.progress import progress_bar

    from .pipeline import run_pipeline

    written, failed = [], {}
    bar = progress_bar(len(jobs), "predict", "case", enabled=progress)

    def on_done(job, error):
        bar.update()
        if error is None:
            written.append(job[0].case_id)
        else:
            failed[job[0].case_id] = str(error) if str(error).startswith("case ") else \
                f"case {job[0].case_id}: {type(error).__name__}: {error}"

    try:
        run_pipeline(jobs, *_predictor(run, dev, tta, convention, rules), on_done=on_done)
    finally:
        bar.close()
    return written, failed


def _output_convention(run, case_convention: str) -> str:
    """The label convention to write a case's prediction in: the case's own file naming decides (2021 vs
    2023), the run's training labels decide between 2023 and its superset 2024 (a model that outputs RC)."""
    from store.conventions import SUPERSEDED_BY, compatible

    trained = run.preprocessing.get("label_convention") or case_convention
    if compatible(trained, case_convention):
        return trained
    if SUPERSEDED_BY.get(trained) == case_convention or trained == case_convention:
        return case_convention
    raise RunError(f"the run was trained on {trained} labels; the cases are named as {case_convention} cases "
                   f"(a model predicts in the label convention it was trained on)")


# ---------------------------------------------------------------- on a cluster's worker (evaluate.cluster)

_LOADED: dict = {}


def _worker_predictor(spec: dict):
    """(load, infer, finish) of ``spec``'s model on this worker, loaded on its first case."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _LOADED:
        import torch
        from distributed import get_worker

        try:
            threads = get_worker().state.nthreads
        except ValueError:  # run in the driver (a test calling it directly)
            threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads))
        run, dev = _model_and_device(spec["run_dir"], spec["ensemble"], spec["device"], spec["model"])
        rules = _postprocessing_rules(spec["run_dir"], run, spec["convention"], spec["postprocessing"])
        _LOADED.clear()
        _LOADED[key] = _predictor(run, dev, spec["tta"], spec["convention"], rules)
    return _LOADED[key]


def predict_task(spec: dict, case, path: str) -> str:
    """One case predicted and written on a worker; its case id. A file already at ``path`` is this task's own,
    finished by an earlier attempt (on a worker that died before it could report): the driver submits only cases
    without one. So a rescheduled task writes nothing twice."""
    if _written(path):
        return case.case_id
    load, infer, finish = _worker_predictor(spec)
    job = (case, path)  # a local path or a URL: write_label_nifti takes either
    pre = load(job)
    finish(job, pre, infer(pre))
    return case.case_id
