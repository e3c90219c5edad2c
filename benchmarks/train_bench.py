"""Training step throughput: the real loader (+ device augmentation) vs one fixed batch already on the device
(nnU-Net's no-data-loading benchmark), so a slowdown can be blamed on the right side."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from train.runfolder import read_metrics

from .cohort import bench_inputs
from .report import bar_chart, summarize, write_result


def scaling(b, amp: bool, steps: int) -> dict:
    """Samples/s and the memory the ram cache adds on the node, with 1 and 2 processes under torchrun (the
    trainer's own figures from metrics.jsonl: the second epoch's throughput, the cache's resident memory summed
    over the node's ranks). On a GPU machine each process takes one GPU, where there are two."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    import torch

    gpus = torch.cuda.device_count()
    if 0 < gpus < 2:
        return {"skipped": f"{gpus} GPU on this machine: 2 processes need 2 GPUs"}
    out = {}
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as run_dir, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                   str(port), "-m", "train", "--store", b.store, "--run-dir", run_dir, "--epochs", "2",
                   "--steps-per-epoch", str(steps), "--patch-size", *map(str, b.patch), "--batch-size", "2",
                   "--channels", *map(str, b.channels), "--cache", "ram", "--workers", "2", "--max-val-cases", "1",
                   "--fold", "0",
                   *(["--amp"] if amp else [])]
            threads = max(1, (os.cpu_count() or 1) // nproc)
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if r.returncode:
                raise RuntimeError(f"torchrun with {nproc} process(es) failed: {r.stderr[-2000:]}")
            last = read_metrics(run_dir)[-1]
        out[str(nproc)] = {"samples_per_s": last["samples_per_s"], "cache_bytes_per_node": last["cache_bytes_per_node"],
                           "cache_rss_added_per_node": last["cache_rss_added_per_node"],
                           "threads_per_process": threads}
    one, two = out["1"], out["2"]
    return {**out, "steps_per_epoch": steps,
            "samples_per_s_2_over_1": two["samples_per_s"] / one["samples_per_s"],
            "cache_memory_2_over_1": two["cache_rss_added_per_node"] / max(one["cache_rss_added_per_node"], 1),
            "goals": {"samples_per_s_2_over_1 (one GPU per process)": ">= 1.8",
                      "cache_memory_2_over_1": "<= 1.1"}}


def _step_times(batches, step, augment, n_steps: int) -> tuple[list, list, list]:
    """Seconds of ``n_steps`` training steps fed by the loader's ``batches`` (augmented on the device, as the
    trainer does), the part of each spent waiting for the batch, and seconds of as many steps on one fixed batch
    already on the device; the first step of each is a warm-up, not counted."""
    real_steps, waits = [], []
    for i in range(n_steps + 1):
        t0 = time.perf_counter()
        img, lab = next(batches)
        t1 = time.perf_counter()
        step(*augment.step(img, lab))
        t2 = time.perf_counter()
        if i:  # the first step warms up
            real_steps.append(t2 - t0)
            waits.append(t1 - t0)
    fixed_img, fixed_lab = augment.step(*next(batches))  # a batch of the patch's size, on the device
    fixed_steps = []
    for i in range(n_steps + 1):
        t0 = time.perf_counter()
        step(fixed_img, fixed_lab)
        if i:
            fixed_steps.append(time.perf_counter() - t0)
    return real_steps, waits, fixed_steps


def run(out_dir: Path, work: Path, size: str = "full", amp: bool = False, steps: int | None = None) -> dict:
    import torch

    from store import open_store
    from train.augment import BatchAugment
    from train.config import TrainConfig
    from train.device import amp_context
    from train.engine import train_step
    from train.loader import TrainLoader
    from train.models import build, make_loss
    from train.nnunet_augment import NnunetBatchAugment
    from train.validation import label_to_regions

    b = bench_inputs(work, size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # a GPU step takes milliseconds: more of them for a stable median
    n_steps = steps or {"full": 6, "quick": 6, "tiny": 2}[size] * (5 if device.type == "cuda" else 1)
    cfg = TrainConfig(store=b.store, patch_size=b.patch, batch_size=2, channels=b.channels, amp=amp)
    store = open_store(b.store)
    torch.manual_seed(0)
    model = build(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = make_loss(cfg)  # the trainer's own loss and step
    autocast, scaler, amp_desc = amp_context(cfg, device)
    augment = BatchAugment(seed=0)

    def step(img, lab):
        train_step(model, opt, loss_fn, autocast, scaler, img, label_to_regions(lab, store.label_convention))

    cache = "gpu" if device.type == "cuda" else "ram"

    def batches(patch):
        loader = TrainLoader(b.store, store.case_ids, cfg.modalities, patch=patch, batch_size=2, cache=cache,
                             workers=2, device=device, seed=0)
        e = 0
        while True:
            yield from loader.epoch(e)
            e += 1

    real_steps, waits, fixed_steps = _step_times(batches(b.patch), step, augment, n_steps)
    nn_aug = NnunetBatchAugment(b.patch, seed=0)  # --augmentation nnunet: the enlarged read, nnU-Net's chain
    nn_steps, nn_waits, _ = _step_times(batches(nn_aug.read_size(b.patch)), step, nn_aug, n_steps)
    real_med, fixed_med = statistics.median(real_steps), statistics.median(fixed_steps)
    res = {
        "size": size, "patch": list(b.patch), "batch_size": 2, "channels": list(b.channels), "device": str(device),
        "precision": amp_desc, "cache": cache, "workers": 2, "steps": n_steps,
        "real_loader": {"steps_per_s": 1 / real_med, "step_s": summarize(real_steps),
                        "data_wait_share": sum(waits) / sum(real_steps),
                        "wait_is": "time blocked on the loader for the next batch; augmentation on the device "
                                   "counts as step time"},
        "fixed_batch": {"steps_per_s": 1 / fixed_med, "step_s": summarize(fixed_steps)},
        "real_loader_nnunet_augmentation": {
            "read": list(nn_aug.read_size(b.patch)), "steps_per_s": 1 / statistics.median(nn_steps),
            "step_s": summarize(nn_steps), "data_wait_share": sum(nn_waits) / sum(nn_steps),
            "over_fixed_step_time": statistics.median(nn_steps) / fixed_med},
        "real_over_fixed_step_time": real_med / fixed_med,
        "scaling": scaling(b, amp, steps=4 if device.type == "cpu" else 20),
        "goals": {"real_over_fixed_step_time (CPU)": "<= 1.10",
                  "data_wait_share (GPU, --amp, 128^3, batch 2)": "< 0.05"},
    }
    write_result(out_dir, "train", res)
    bar_chart(out_dir / "train.png", f"train step, {'x'.join(map(str, b.patch))} batch 2, {device}, {amp_desc}",
              "steps / s", {"real loader + aug": {k: 1 / v for k, v in summarize(real_steps).items() if k != "n"},
                            "fixed batch": {k: 1 / v for k, v in summarize(fixed_steps).items() if k != "n"}},
              log=False)
    wait = 100 * res["real_loader"]["data_wait_share"]
    print(f"train: real loader {1 / real_med:.3f} steps/s (data wait {wait:.1f}%), fixed batch "
          f"{1 / fixed_med:.3f} steps/s; step time ratio {res['real_over_fixed_step_time']:.3f}")
    nn = res["real_loader_nnunet_augmentation"]
    print(f"train, --augmentation nnunet: {nn['steps_per_s']:.3f} steps/s (data wait "
          f"{100 * nn['data_wait_share']:.1f}%), step time ratio to the fixed batch {nn['over_fixed_step_time']:.3f}")
    sc = res["scaling"]
    if "skipped" not in sc:
        print(f"train: 2 processes / 1: {sc['samples_per_s_2_over_1']:.2f}x samples/s, ram cache memory on the "
              f"node {sc['cache_memory_2_over_1']:.2f}x")
    return res
