"""The performance table of docs/performance.md, generated from the benchmark JSON files (never typed by hand)."""

from __future__ import annotations

import json
from pathlib import Path

PAGE = Path("docs/performance.md")
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
GPU_START, GPU_END = "<!-- perf-table-gpu:start -->", "<!-- perf-table-gpu:end -->"


def _load(out: Path, name: str) -> dict | None:
    p = Path(out) / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def machine(d: dict) -> str:
    """The machine a result was measured on, as the table names it."""
    m = d["machine"]
    return f"{m['gpu'] or m['cpu']}, {m['cores']} cores" + ("" if m["gpu"] else " (CPU)")


def _synth_rows(s: dict) -> list[str]:
    """CPU seconds per synthetic case."""
    return [f"| synth | CPU s per case, {'x'.join(map(str, s['shape']))} | {s['cpu_s_per_case']['median']:.2f} | "
            f"<= 2 | {machine(s)} |"]


def _prep_rows(p: dict) -> list[str]:
    """Build against decode-only time, worker scaling, store size, memory, nnU-Net's preprocessing, the build's
    start-up."""
    rows = []
    for w, r in p["workers"].items():
        rows.append(f"| prep | build / decode-only time, {w} worker(s), {p['cases']} cases "
                    f"{'x'.join(map(str, p['shape']))} | {r['build_over_decode']:.2f}x "
                    f"({r['build_cases_per_s']:.2f} vs {r['decode_cases_per_s']:.2f} cases/s) | <= 1.5x | "
                    f"{machine(p)} |")
    rows.append(f"| prep | speed-up 1 -> 2 workers | {p['speedup_1_to_2_workers']:.2f}x | ~2x | {machine(p)} |")
    rows.append(f"| prep | store bytes / source .nii.gz bytes | {p['store_over_source']:.2f} | <= 1 | "
                f"{machine(p)} |")
    peak = max(r["peak_rss_mb_per_worker"] for r in p["workers"].values())
    rows.append(f"| prep | peak memory per worker | {peak:.0f} MB | < 1536 MB | {machine(p)} |")
    if (pe := p.get("peers")) and "nnunet" in pe:
        nn, ours = pe["nnunet"], pe["build_store"]
        rows.append(f"| prep | nnU-Net v2 {nn['version']} / build-store, {nn['cases']} cases, {nn['processes']} "
                    f"process: s per case (preprocess; fingerprint + preprocess) | "
                    f"{pe['per_case_preprocess_over_build']:.1f}x; "
                    f"{pe['per_case_fingerprint_plus_preprocess_over_build']:.1f}x "
                    f"({nn['per_case_s']['preprocess']:.2f}; "
                    f"{nn['per_case_s']['fingerprint'] + nn['per_case_s']['preprocess']:.2f} vs "
                    f"{ours['per_case_s']:.2f} s) | >= 3x; >= 10x | {machine(p)} |")
        wall = pe["wall_fingerprint_plan_preprocess_over_build"]
        rows.append(f"| prep | nnU-Net v2 fingerprint + plan + preprocess / build-store, wall for the "
                    f"{nn['cases']} cases; bytes written | {wall:.1f}x "
                    f"({nn['wall_s']['total_s']:.1f} vs {ours['wall_s']:.1f} s); {pe['bytes_over_build']:.2f}x "
                    f"({nn['bytes_written'] / 1e6:.0f} vs {ours['bytes_written'] / 1e6:.0f} MB) | >= 8x | "
                    f"{machine(p)} |")
    if st := p.get("startup"):
        rows.append(f"| prep | build-store fixed start-up + shut-down, --workers 1, {st['cases']} cases | "
                    f"{st['fixed_s']:.2f} s (command {st['command_wall_s']['median']:.2f} s) | <= 3 s | "
                    f"{machine(p)} |")
    return rows


def _loader_rows(lo: dict) -> list[str]:
    """Augmented samples/s of each loader variant against the seed's chain, and --cache none delivery and memory."""
    rows = []
    v = lo["variants"]
    patch = lo["sample"].split(" ")[2]
    for k, r in v.items():
        rows.append(f"| loader | {k}: samples/s ({patch}, batch {lo['batch']}) | {r['samples_per_s']:.2f} "
                    f"({r['ratio_to_seed']:.1f}x seed) | | {machine(lo)} |")
    rows.append(f"| loader | ram+aug / seed | {lo['ratios']['ram+aug / seed']:.1f}x | >= 50x | {machine(lo)} |")
    rows.append(f"| loader | ram+aug / monai | {lo['ratios']['ram+aug / monai']:.1f}x | >= 2x | {machine(lo)} |")
    rows.append(f"| loader | none delivery, {v['none'].get('loader_workers', 2)} loader threads | "
                f"{v['none']['samples_per_s']:.1f} patches/s | >= 20 (CPU) | {machine(lo)} |")
    if m := lo.get("memory", {}).get("none"):
        rows.append(f"| loader | none: process memory peak ({lo['cases']} cases) | "
                    f"{m['process_rss_peak_mb']:.0f} MB ({m['added_mb']:.0f} MB added by the mode) | < 2048 MB | "
                    f"{machine(lo)} |")
    return rows


def _train_rows(t: dict) -> list[str]:
    """Step time with the real loader against a fixed batch, data wait, and scaling over processes."""
    rows = []
    rows.append(f"| train | step time, real loader / fixed batch ({'x'.join(map(str, t['patch']))}, batch 2, "
                f"{t['precision']}) | {t['real_over_fixed_step_time']:.3f} | <= 1.10 (CPU) | {machine(t)} |")
    rows.append(f"| train | data-wait share of a step | {100 * t['real_loader']['data_wait_share']:.1f}% | "
                f"< 5% (GPU) | {machine(t)} |")
    if nn := t.get("real_loader_nnunet_augmentation"):
        rows.append(f"| train | --augmentation nnunet (read {'x'.join(map(str, nn['read']))}): data-wait share; step "
                    f"time / fixed batch | {100 * nn['data_wait_share']:.1f}%; {nn['over_fixed_step_time']:.3f} | "
                    f"< 5% (GPU) | {machine(t)} |")
    if (sc := t.get("scaling")) and "skipped" not in sc:
        rows.append(f"| train | samples/s, 2 processes / 1 (torchrun, {sc['1']['threads_per_process']} / "
                    f"{sc['2']['threads_per_process']} threads each) | {sc['samples_per_s_2_over_1']:.2f}x | "
                    f">= 1.8x (one GPU per process) | {machine(t)} |")
        rows.append(f"| train | ram cache memory on the node, 2 processes / 1 | "
                    f"{sc['cache_memory_2_over_1']:.2f}x | <= 1.1x | {machine(t)} |")
    return rows


def _scale_rows(sc: dict) -> list[str]:
    """Build cost per case as the cohort grows, opening and verifying a large store, object storage."""
    rows = []
    ns = [str(n) for n in sc["counts"]]
    lo, hi = sc["per_n"][ns[0]], sc["per_n"][ns[-1]]
    ratio = lo["cases_per_s_last_tenth"] / hi["cases_per_s_last_tenth"]
    rows.append(f"| scale | build cost per case at N={ns[-1]} / N={ns[0]} ({'x'.join(map(str, sc['grid']))}, 2 "
                f"workers) | {ratio:.2f}x | <= 1.1x | {machine(sc)} |")
    rows.append(f"| scale | open + list a {ns[-1]}-case store; root metadata | {hi['open_and_list_s']:.3f} s; "
                f"{hi['root_metadata_bytes'] / 1e6:.2f} MB | < 1 s | {machine(sc)} |")
    rows.append(f"| scale | store verify, {ns[-1]} cases; loader first batch | {hi['verify_s']:.1f} s; "
                f"{hi['loader_first_batch_s']:.2f} s | | {machine(sc)} |")
    if (r := sc.get("object_storage")) and "skipped" not in r:
        rows.append(f"| scale | --cache none patches/s, local S3 server / local disk ({r['loader_threads']} "
                    f"threads, 3x96^3) | {r['s3_over_local']:.2f}x ({r['s3_patches_per_s']['median']:.1f} vs "
                    f"{r['local_patches_per_s']['median']:.1f}) | >= 0.5x | {machine(sc)} |")
    return rows


def _readers_rows(rd: dict) -> list[str]:
    """The Zarr engines on the same patches, locally and on object storage."""
    rows = []
    loc = rd["local"]
    rows.append("| readers | --cache none patches/s, 2 loader threads (" + ", ".join(loc) + f"), "
                f"4x{'x'.join(map(str, rd['patch']))} | " + " / ".join(
                    f"{v['none_2_threads']['median']:.1f}" for v in loc.values()) + f" | | {machine(rd)} |")
    rows.append("| readers | ram cache fill, s (" + ", ".join(loc) + ") | " + " / ".join(
        f"{v['ram_fill_s']['median']:.2f}" for v in loc.values()) + f" | | {machine(rd)} |")
    if alone := rd.get("read_alone"):
        ms = alone["ms_per_patch"]
        patch = f"{alone['channels']}x{'x'.join(map(str, alone['patch']))}"
        figures = " / ".join(f"{v['median']:.1f}" for v in ms.values())
        rows.append(f"| readers | read alone, one thread: ms per {patch} patch + label ({'; '.join(ms)}) | {figures} | "
                    f"project <= tensorstore + conversion, <= 1.3x its int16 read; fresh arrays: project <= "
                    f"tensorstore + numpy | {machine(rd)} |")
    if s3 := (rd.get("object_storage") or {}).get("readers"):
        rows.append("| readers | local S3 server: patches/s; requests per patch (" + ", ".join(s3) + ") | " +
                    " / ".join(f"{v['s3_patches_per_s']['median']:.1f}; {v['s3_requests_per_patch']['median']:.1f}"
                               for v in s3.values()) + f" | | {machine(rd)} |")
    return rows


def _infer_rows(i: dict) -> list[str]:
    """Inference per case against the bare sliding window, TTA, the exported model, scoring."""
    rows = []
    s = i["seconds_per_case"]
    ours = next(v for k, v in s.items() if k.startswith("ours"))
    bare = next(v for k, v in s.items() if k.startswith("bare"))
    ours, bare = (v["median"] if isinstance(v, dict) else v for v in (ours, bare))
    over = f"{i['cases']} cases " if "cases" in i else ""
    rows.append(f"| infer | s per case {over}{'x'.join(map(str, i['grid']))}: ours / bare sliding window | "
                f"{ours:.2f} / {bare:.2f} ({i['ours_over_bare']:.2f}x) | <= 1.2x (CPU), 1.5x (GPU) | "
                f"{machine(i)} |")
    if t := i.get("tta"):
        rows.append(f"| infer | --tta / plain pass ({t['cases']} case(s)) | {t['tta_over_plain']:.2f}x | <= 8.5x | "
                    f"{machine(i)} |")
    if (e := i.get("exported")) and "skipped" not in e:
        rows.append(f"| infer | exported ONNX model (onnxruntime) / torch float32, s per case | "
                    f"{e['onnxruntime_s_per_case']:.2f} / {e['torch_s_per_case']:.2f} "
                    f"({e['onnxruntime_over_torch']:.2f}x) | <= 1x (CPU) | {machine(i)} |")
    if (bd := i.get("bundle")) and "skipped" not in bd:
        rows.append(f"| infer | MONAI bundle under MONAI's runner / evaluate predict --model, s per case | "
                    f"{bd['bundle_s_per_case']:.2f} / {bd['predict_s_per_case']:.2f} "
                    f"({bd['bundle_over_predict']:.2f}x) | <= 1.5x (CPU) | {machine(i)} |")
    if (sc := i.get("scoring_seconds_per_case")) and "all" in sc:
        parts = "; ".join(f"{k} {sc[k]['median']:.2f}" for k in ("legacy", "brats2023", "brats2025"))
        rows.append(f"| infer | scoring one case {'x'.join(map(str, i['grid']))}, all families, s ({parts}) | "
                    f"{sc['all']['median']:.2f} | < 2 (CPU) | {machine(i)} |")
    return rows


def _augment_rows(a: dict) -> list[str]:
    """nnU-Net's augmentation chain: samples/s of each arm, ours over nnU-Net's own data path where it was measured
    (else over batchgeneratorsv2's process pool, said so)."""
    arms = "; ".join(f"{k} {v['median']:.2f}" for k, v in a["samples_per_s"].items())
    over = a.get("ours_over_nnunet_data_path")
    if isinstance(over, dict):
        ratios = "; ".join(f"--cache {m} {r:.2f}x" for m, r in over.items()) + " of nnU-Net's own data path"
        goal = ">= 5x (ram), 3x (none) nnU-Net's own data path"
    else:
        ratios = "; ".join(f"--cache {m} {r:.1f}x" for m, r in a["ours_over_batchgeneratorsv2_pool"].items()) + (
            " of batchgeneratorsv2 on every core")
        goal = ">= 5x (ram), 3x (none) nnU-Net's own data path (not measured)"
    return [f"| augment | nnU-Net's chain, samples/s ({'x'.join(map(str, a['patch']))} from "
            f"{'x'.join(map(str, a['read']))}, 4 channels): {arms} | {ratios} | {goal} | {machine(a)} |"]


def _predict_cluster_rows(c: dict) -> list[str]:
    """evaluate predict in one process against a local Dask cluster of 1 and 2 workers."""
    s = {k: v["median"] for k, v in c["seconds_per_case"].items()}
    return [f"| predict-cluster | s per case, {c['cases']} cases {'x'.join(map(str, c['grid']))}, whole command: "
            f"one process / 1 worker / 2 workers | {s['one process']:.2f} / {s['1 worker']:.2f} / "
            f"{s['2 workers']:.2f} (2 workers {c['two_over_one_worker']:.2f}x the cases/s of 1; 1 worker "
            f"{c['one_worker_over_one_process']:.2f}x one process's time, "
            f"{c.get('one_worker_over_one_thread', float('nan')):.2f}x one process on one torch thread) | "
            f">= 1.7x; <= 1.1x | {machine(c)} |"]


def _report_rows(r: dict) -> list[str]:
    return [f"| report | the demo run's report.html: MB; s to open in headless Chromium, network refused | "
            f"{r['bytes'] / 1e6:.2f}; {r['chromium_load_s']['median']:.3f} | <= 5 MB; < 2 s | {machine(r)} |"]


STAGES = (("synth", _synth_rows), ("prep", _prep_rows), ("loader", _loader_rows), ("train", _train_rows),
          ("scale", _scale_rows), ("readers", _readers_rows), ("infer", _infer_rows), ("augment", _augment_rows),
          ("predict-cluster", _predict_cluster_rows), ("report", _report_rows))


def render(out: str | Path) -> str:
    """The table (markdown) of every stage whose ``<stage>.json`` is in ``out``."""
    rows = ["| stage | measure | figure | goal | machine |", "|---|---|---|---|---|"]
    for name, stage_rows in STAGES:
        if (result := _load(Path(out), name)) is not None:
            rows += stage_rows(result)
    return "\n".join(rows)


def _replace_between(text: str, start: str, end: str, body: str, where: Path) -> str:
    if start not in text or end not in text:
        raise ValueError(f"{where} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_page(out: str | Path, page: str | Path = PAGE) -> None:
    """Rewrite the page's table from ``out``, and its GPU table from ``out/gpu`` where that folder holds results
    (``benchmarks/gpu.sh`` writes them there)."""
    page, out = Path(page), Path(out)
    table = render(out)
    text = _replace_between(page.read_text(), START, END, table, page)
    if list(out.glob("gpu/*.json")):
        text = _replace_between(text, GPU_START, GPU_END, render(out / "gpu"), page)
    page.write_text(text)
    print(table)


# The README's headline table, generated from the same files (tests/test_docs.py holds the README to it)
README = Path("README.md")
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def _loader_headline(lo: dict) -> list[str]:
    v = {k: r["samples_per_s"] for k, r in lo["variants"].items()}
    return [f"| augmented 4 x 128^3 training samples/s, {lo['cases']} full-size cases (`benchmarks loader`) | "
            f"{v['ram+aug']:.1f} (`--cache ram`, augmented on the device with the seed's transforms) | MONAI's "
            f"chain from NIfTI: {v['monai']:.2f} ({v['ram+aug'] / v['monai']:.1f}x fewer); the seed's chain: "
            f"{v['seed']:.2f} | {machine(lo)} |"]


def _prep_headline(p: dict) -> list[str]:
    rows = []
    if peers := p.get("peers"):
        nn, ours = peers["nnunet"], peers["build_store"]
        rows.append(f"| preprocessing {nn['cases']} full-size cases, wall, 1 process (`benchmarks prep --peers`) | "
                    f"`build-store`: {ours['wall_s']:.1f} s | nnU-Net v2 {nn['version']} fingerprint + plan + "
                    f"preprocess: {nn['wall_s']['total_s']:.1f} s "
                    f"({peers['wall_fingerprint_plan_preprocess_over_build']:.1f}x) | {machine(p)} |")
    rows.append(f"| store size / source `.nii.gz` (`benchmarks prep`) | {p['store_over_source']:.2f} | | "
                f"{machine(p)} |")
    return rows


def _infer_headline(i: dict) -> list[str]:
    s = i["seconds_per_case"]
    ours = next(v for k, v in s.items() if k.startswith("ours"))
    bare = next(v for k, v in s.items() if k.startswith("bare"))
    extra = []
    if e := i.get("exported"):
        extra.append(f"ONNX: {e['onnxruntime_s_per_case']:.2f} s")
    if b := i.get("bundle"):
        extra.append(f"the MONAI bundle under MONAI's runner: {b['bundle_s_per_case']:.2f} s")
    ratio = ours / bare
    verdict = "within" if ratio <= 1.2 else "over"
    rows = [f"| inference per full-size case, whole path, {i['cases']} cases (`benchmarks infer`) | {ours:.2f} s"
            + (f" ({'; '.join(extra)})" if extra else "") + f" | MONAI's bare sliding window on tensors: {bare:.2f} s "
            f"({ratio:.2f}x: {verdict} the 1.2x goal) | {machine(i)} |"]
    if sc := i.get("scoring_seconds_per_case"):
        rows.append(f"| scoring one full-size case, all three families (`benchmarks infer`) | "
                    f"{sc['all']['median']:.2f} s | | {machine(i)} |")
    return rows


def _models_headline(m: dict) -> list[str]:
    walls = [r["wall_s"] for a in m["arms"].values() for r in a["runs"]]
    seeds = {len(a["runs"]) for a in m["arms"].values()}
    best = max(m["arms"].items(), key=lambda kv: kv[1]["mean_dice"])
    c = m["cohort"]
    return [f"| training, {len(m['arms'])} architectures with a time limit of {m['minutes_per_run']:g} min each "
            f"(runs took {min(walls):.0f}-{max(walls):.0f} s), {c['cases']} synthetic cases at "
            f"{c['spacing_mm'][0]:g} mm, {'/'.join(map(str, sorted(seeds)))} seeds, {c['test_cases']} test cases "
            f"(`benchmarks models`) | best: {best[0].split(' (')[0]}, a four-level UNet (`{best[1]['flags']}`): "
            f"mean Dice {best[1]['mean_dice']:.3f} | | {machine(m)} |"]


def _race_headline(r: dict) -> list[str]:
    if "paired_vs_nnunet" not in r:  # a result from before the race had seeds, regions and a budget
        return []
    c, nn = r["cohort"], r["nnunet"]
    ours, theirs = r["means"]["ours"]["none"]["mean_dice"], r["means"]["nnunet"]["none"]["mean_dice"]
    d = r["paired_vs_nnunet"]["ours"]["none"]["legacy mean"]
    sched = nn["schedule"]
    epochs = sorted({s["epochs"] for s in sched})
    span = lambda v: f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f} over seeds)"  # noqa: E731
    return [f"| the race, each side's whole pipeline within W = {r['budget_s'] / 60:g} min, {c['cases']} synthetic "
            f"cases at {c['spacing_mm'][0]:g} mm, {r['test_cases']} test cases, {len(r['seeds']['ours'])} seeds a "
            f"side, no test-time augmentation (`{r['command']}`) | mean Dice {span(ours)} | nnU-Net v2 "
            f"{nn['version']} 3d_fullres on regions, its trainer fitted to W "
            f"({'-'.join(map(str, epochs))} epochs of {sched[0]['iterations_per_epoch']} iterations): {span(theirs)}; "
            f"ours minus nnU-Net {d['mean_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
            f"({r['verdict_at_W']['ours']['reading']}) | {machine(r)} |"]


HEADLINES = (("loader", _loader_headline), ("prep", _prep_headline), ("infer", _infer_headline),
             ("models", _models_headline), ("nnunet", _race_headline))


def headline(out: str | Path) -> str:
    """The README's headline table (markdown) from the results in ``out``: each row names its command and machine."""
    rows = ["| what | this project | beside it | machine |", "|---|---|---|---|"]
    for name, make in HEADLINES:
        if (result := _load(Path(out), name)) is not None:
            rows += make(result)
    return "\n".join(rows)


def update_readme(out: str | Path, readme: str | Path = README) -> None:
    """Rewrite the README's headline table, and its demo table where ``out`` holds demo.json, from ``out``."""
    readme = Path(readme)
    text = _replace_between(readme.read_text(), HEADLINE_START, HEADLINE_END, headline(out), readme)
    if (Path(out) / "demo.json").exists():
        text = _replace_between(text, DEMO_START, DEMO_END, demo_table(out), readme)
    readme.write_text(text)


DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"


def demo_table(out: str | Path) -> str:
    """The README's demo table from ``out/demo.json`` (``python -m benchmarks demo``): the test means, plain and
    with --tta, then each test case."""
    d = _load(Path(out), "demo")
    cols = [("dice_tc", "Dice TC"), ("dice_wt", "Dice WT"), ("dice_et", "Dice ET"),
            ("brats2023_dice_tc", "brats2023 Dice TC"), ("brats2023_dice_wt", "brats2023 Dice WT"),
            ("brats2023_dice_et", "brats2023 Dice ET")]

    def row(name: str, values: dict) -> str:
        return f"| {name} | " + " | ".join(f"{values[c]:.3f}" if c in values else "" for c, _ in cols) + " |"

    rows = ["| evaluation | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows.append(row(f"mean of {d['plain']['cases']} test cases, no postprocessing", d["plain"]["means"]))
    if "tta" in d:
        rows.append(row("the same, `--tta` (8 mirrorings)", d["tta"]["means"]))
    rows += [row(f"case {r['case']}", r) for r in d["plain"]["per_case"]]
    return ("\n".join(rows) + f"\n\n{machine(d)}; `{d['command']}`, then "
            "`python -m benchmarks demo --run-dir runs/demo`.")
