"""``evaluate predict --source ... --workers N | --scheduler ADDRESS`` and ``evaluate score ... --workers N |
--scheduler ADDRESS``: a cohort's cases predicted, or a folder's predictions scored, on a Dask cluster.

One design for both (``run_on_cluster``): the driver does what the one-process path does before any case (discover
the cohort, check the output), then submits one task per case, gathers each result as it completes under one
progress bar, and reports a case whose task failed as one line, the others finished. Scoring's task is
``evaluate.folders.score_file``, which returns the case's scores (``evaluate.sheet.CaseScores``); the driver puts
them on the same score sheet as the one-process path, so the reports are the same case for case.

Prediction's task is ``evaluate.predictions.predict_task``. A worker loads the model once, on its first case, and
keeps it for the next ones (a module-level cache keyed by what was loaded, which lives as long as the worker
process); each case is read, predicted and written there, atomically (a temporary file renamed), so a file at its
final name is a finished prediction, and a rescheduled task finds it and writes nothing. A worker that dies has its
tasks moved to the others by the scheduler, as build-store's are. The workers of a LocalCluster are one-thread
processes, and torch in each uses that one thread.
"""

from __future__ import annotations


def run_on_cluster(tasks: dict, what: str, scheduler: str | None = None, workers: int = 0, progress: bool = True):
    """Run ``tasks`` ({case id: (function, args)}, one per case) on the cluster at ``scheduler`` or on a
    LocalCluster of ``workers`` one-thread processes; returns ({case id: result}, {case id: reason}). A worker that
    dies has its tasks moved to the others by the scheduler (a task that kills three workers fails)."""
    from distributed import as_completed

    from prep.build import connect
    from store.progress import progress_bar

    done, failed = {}, {}
    client, cluster = connect(scheduler, workers)
    bar = progress_bar(len(tasks), what, "case", enabled=progress)
    try:
        futures = {client.submit(fn, *args, key=f"{what}-{cid}", pure=False): cid for cid, (fn, args) in tasks.items()}
        for fut in as_completed(futures):
            bar.update()
            cid = futures[fut]
            try:
                done[cid] = fut.result()
            except Exception as e:  # noqa: BLE001 (a bad case is reported, the others go on)
                # bad input names itself (as in one process); anything else is named by its case
                named = isinstance(e, (ValueError, OSError)) or str(e).startswith("case ")
                failed[cid] = str(e) if named else f"case {cid}: {type(e).__name__}: {e}"
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return done, failed
