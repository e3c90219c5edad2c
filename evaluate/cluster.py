"""``evaluate predict --source ... --workers N | --scheduler ADDRESS``: a cohort's cases predicted on a Dask cluster.

The driver discovers the cohort and checks the output as the one-process path does, then submits one task per
case (``predict_task``). A worker loads the model once, on its first case, and keeps it for the next ones (a
module-level cache keyed by what was loaded, which lives as long as the worker process); each case is read,
predicted and written there, atomically (a temporary file renamed), so a file at its final name is a finished
prediction. A worker that dies has its tasks moved to the others by the scheduler, as build-store's are; a case
that fails is one line and the others are finished. The workers of a LocalCluster are one-thread processes, and
torch in each uses that one thread.
"""

from __future__ import annotations

import json

_LOADED: dict = {}


def _predictor(spec: dict):
    """(load, infer, finish) of ``spec``'s model on this worker, loaded on its first case."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _LOADED:
        import torch
        from distributed import get_worker

        from .predictions import _model_and_device, _postprocessing_rules, _predictor

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
    """One case predicted and written on a worker; its case id."""
    from pathlib import Path

    load, infer, finish = _predictor(spec)
    job = (case, Path(path))
    pre = load(job)
    finish(job, pre, infer(pre))
    return case.case_id


def predict_on_cluster(spec: dict, jobs: list, progress: bool = True, scheduler: str | None = None,
                       workers: int = 0):
    """Predict (CaseFiles, output path) jobs on the cluster at ``scheduler`` or a LocalCluster of ``workers``
    processes; returns (written case ids, {case: reason}), as the one-process path does."""
    from distributed import as_completed

    from prep.build import connect
    from store.progress import progress_bar

    written, failed = [], {}
    client, cluster = connect(scheduler, workers)
    bar = progress_bar(len(jobs), "predict", "case", enabled=progress)
    try:
        futures = {client.submit(predict_task, spec, case, str(path), key=f"predict-{case.case_id}", pure=False):
                   case.case_id for case, path in jobs}
        for fut in as_completed(futures):
            bar.update()
            cid = futures[fut]
            try:
                fut.result()
                written.append(cid)
            except Exception as e:  # noqa: BLE001 (a bad case is reported, the others go on)
                failed[cid] = str(e) if str(e).startswith("case ") else f"case {cid}: {type(e).__name__}: {e}"
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return sorted(written), failed
