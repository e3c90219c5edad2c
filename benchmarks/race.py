"""The race's arithmetic and its report, made from every saved part of ``python -m benchmarks nnunet``: each
system's Dice per region over its seeds (mean and range), paired bootstrap intervals over the test cases against
nnU-Net, our anytime curve and our time to nnU-Net's Dice with its interval, where the time went, the load, the
table, the PNG and the per-case CSV."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from store.conventions import REGIONS

SHARES = {"W/4": 0.25, "W/2": 0.5, "W": 1.0}  # our points, as shares of nnU-Net's whole wall time W


def grid_for(spacing_mm: float, fov_mm) -> tuple[int, ...]:
    """The cohort's grid at ``spacing_mm``: the field of view in whole voxels (240 x 240 x 155 mm at 4 mm: 60 x 60 x
    39)."""
    if spacing_mm <= 0:
        raise ValueError(f"--spacing must be a positive number of millimetres, not {spacing_mm:g}")
    return tuple(max(1, round(f / spacing_mm)) for f in fov_mm)


def patch_for(shape) -> int:
    """Our patch side for a cohort grid: a multiple of 16 (the UNet's four levels) within about 85% of the
    smallest side (the brain's crop), 16 to 64 voxels: 64 at 2 mm and finer, 32 at 4 mm."""
    return 16 * max(1, min(4, int(0.85 * min(shape)) // 16))


def time_to_reach(points: list[tuple[float, float]], target: float) -> dict:
    """When the curve ``points`` ((whole wall seconds, mean Dice), in time order) first reaches ``target``: linear
    between the two points around the crossing; by the first point when it already reaches it (an upper bound,
    nothing earlier was measured); None when no point does."""
    for i, (t, d) in enumerate(points):
        if d >= target:
            if i == 0:
                return {"seconds": t, "how": "by our first point (an upper bound)"}
            (t0, d0) = points[i - 1]
            return {"seconds": t0 + (target - d0) / (d - d0) * (t - t0), "how": "interpolated between our points"}
    return {"seconds": None, "how": "not reached"}


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def nnunet_epochs(fold_dir: Path) -> list[dict]:
    """nnU-Net's own training log (``training_log_*.txt`` in its fold folder): per epoch, its pseudo-Dice per label
    (on the validation patches it draws), their mean and the epoch's seconds."""
    logs = sorted(Path(fold_dir).glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    epochs: list[dict] = []
    for line in logs[-1].read_text().splitlines() if logs else ():
        text = line.split(": ", 1)[-1]
        if text.startswith("Pseudo dice"):
            values = [float(v) for v in _NUMBER.findall(re.sub(r"np\.float\d+\(", "", text[len("Pseudo dice"):]))]
            epochs.append({"epoch": len(epochs), "pseudo_dice": values,
                           "mean_pseudo_dice": float(np.mean(values)) if values else None})
        elif text.startswith("Epoch time:") and epochs:
            epochs[-1]["epoch_s"] = float(_NUMBER.findall(text)[0])
    return epochs


COLUMNS = {"legacy": "dice", "brats2023": "brats2023_dice"}
TTA = {"none": "no test-time augmentation", "mirror": "mirroring (8 flips) at test time"}
NAMES = {"nnunet": "nnU-Net v2", "ours": "ours (default recipe)", "ours-nnunet-aug": "ours, --augmentation nnunet"}


def case_means(scores: dict, prefix: str) -> dict[str, float]:
    """Per case, the mean of the region Dice columns ``prefix_{tc,wt,et}``."""
    return {c: float(np.mean([row[f"{prefix}_{r.lower()}"] for r in REGIONS])) for c, row in scores.items()}


def summary(scores: dict) -> dict:
    """Means over cases of every Dice column, the mean Dice (TC, WT, ET) per family, and the mean HD95."""
    out = {}
    for prefix in COLUMNS.values():
        for r in REGIONS:
            out[f"{prefix}_{r.lower()}"] = float(np.nanmean([row[f"{prefix}_{r.lower()}"] for row in scores.values()]))
        out[f"mean_{prefix}"] = float(np.mean([out[f"{prefix}_{r.lower()}"] for r in REGIONS]))
    out["mean_hd95"] = float(np.nanmean([np.mean([row[f"hd95_{r.lower()}"] for r in REGIONS])
                                         for row in scores.values()]))
    return out


def over_seeds(parts: list[dict], tta: str) -> dict:
    """Each column's mean over the seeds' runs and its range (min, max), and each seed's own figures."""
    per_seed = {p["seed"]: summary(p["scores"][tta]) for p in parts}
    cols = next(iter(per_seed.values()))
    return {"seeds": sorted(per_seed), "per_seed": per_seed,
            **{c: {"mean": float(np.mean([v[c] for v in per_seed.values()])),
                   "min": float(min(v[c] for v in per_seed.values())),
                   "max": float(max(v[c] for v in per_seed.values()))} for c in cols}}


def _seed_average(parts: list[dict], tta: str, column) -> dict[str, float]:
    """Per test case, ``column(row)`` averaged over the seeds' runs."""
    cases = sorted(parts[0]["scores"][tta])
    return {c: float(np.mean([column(p["scores"][tta][c]) for p in parts])) for c in cases}


def paired(ours: list[dict], theirs: list[dict], tta: str) -> dict:
    """Ours minus nnU-Net per region and for the mean, legacy and brats2023: per case each side averaged over its
    seeds, the mean difference over cases with its 95% bootstrap interval; and the seed-by-seed differences of the
    means (mean and range over the pairs of runs with the same seed)."""
    from evaluate.report import bootstrap_ci

    out = {}
    for family, prefix in COLUMNS.items():
        cols = {r: (lambda row, r=r, x=prefix: row[f"{x}_{r.lower()}"]) for r in REGIONS}
        cols["mean"] = lambda row, x=prefix: float(np.mean([row[f"{x}_{r.lower()}"] for r in REGIONS]))
        for name, col in cols.items():
            a, b = _seed_average(ours, tta, col), _seed_average(theirs, tta, col)
            d = np.array([a[c] - b[c] for c in sorted(b)])
            d = d[~np.isnan(d)]
            lo, hi = bootstrap_ci(d)
            seeds = sorted({p["seed"] for p in ours} & {p["seed"] for p in theirs})
            by_seed = [np.nanmean([col(x) for x in _only(ours, s)["scores"][tta].values()])
                       - np.nanmean([col(x) for x in _only(theirs, s)["scores"][tta].values()]) for s in seeds]
            out[f"{family} {name}"] = {"mean_difference": float(d.mean()), "ci95": [lo, hi], "cases": int(d.size),
                                       "seed_pairs": {"mean": float(np.mean(by_seed)), "min": float(min(by_seed)),
                                                      "max": float(max(by_seed)), "n": len(by_seed)}
                                       if by_seed else None}
    return out


def _only(parts, seed):
    return next(p for p in parts if p["seed"] == seed)


def anytime(ours: list[dict], theirs: list[dict], n: int = 2000, seed: int = 0) -> dict:
    """Our curve (each point's whole wall seconds and test mean legacy Dice, averaged over seeds) against
    nnU-Net's final mean Dice (averaged over its seeds), and our time to reach it: the estimate and a 95% interval
    from resampling the test cases (a resample our curve never reaches counts as never)."""
    names = [pt["point"] for pt in ours[0]["curve"]]
    per_point = {}
    for name in names:
        pts = [next(pt for pt in p["curve"] if pt["point"] == name) for p in ours]
        scores = [pt.get("scores") or p["scores"]["none"] for pt, p in zip(pts, ours)]
        per_point[name] = {"whole_s": float(np.mean([pt["whole_s"] for pt in pts])),
                           "cases": [case_means(s, "dice") for s in scores]}
    cases = sorted(theirs[0]["scores"]["none"])
    target_cases = [case_means(p["scores"]["none"], "dice") for p in theirs]

    def reach(idx):
        curve = [(v["whole_s"], float(np.mean([np.mean([s[cases[i]] for i in idx]) for s in v["cases"]])))
                 for v in per_point.values()]
        target = float(np.mean([np.mean([t[cases[i]] for i in idx]) for t in target_cases]))
        return curve, target, time_to_reach(curve, target)

    curve, target, estimate = reach(np.arange(len(cases)))
    rng = np.random.default_rng(seed)
    draws = [reach(rng.integers(0, len(cases), len(cases)))[2]["seconds"] for _ in range(n)]
    finite = np.array([np.inf if d is None else d for d in draws])
    lo, hi = (float(np.percentile(finite, q)) for q in (2.5, 97.5))
    return {"points": {k: {"whole_s": t, "mean_dice": d} for k, (t, d) in zip(per_point, curve)},
            "nnunet_mean_dice": target, "time_to_nnunet_dice": estimate,
            "ci95_s": [lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None],
            "never_reached_share": float(np.mean(~np.isfinite(finite)))}


def _fmt_range(v: dict) -> str:
    return f"{v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})"


def _fmt_ci(p: dict) -> str:
    return f"{p['mean_difference']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"


def table(systems: dict, stats: dict, pairs: dict) -> str:
    """One row per system and test-time augmentation: the whole wall time and its parts (means over seeds), each
    region's Dice and the mean (mean over seeds, range in brackets), the brats2023 mean, and the paired difference
    of the mean legacy Dice against nnU-Net with its interval."""
    head = ["| system | seeds | test-time augmentation | whole wall time (prepare + train + predict) | "
            + " | ".join(f"Dice {r}" for r in REGIONS) + " | mean Dice | mean brats2023 Dice | vs nnU-Net (mean "
            "Dice) |", "|---|---|---|---|" + "---|" * 6]
    for system, parts in systems.items():
        b = {k: float(np.mean([p["breakdown_s"][k] for p in parts])) for k in parts[0]["breakdown_s"]}
        train = sum(v for k, v in b.items() if k not in ("preprocessing_s", "prediction_s"))
        whole = float(np.mean([p["whole_s"] for p in parts]))
        for tta in TTA:
            s = stats[system][tta]
            walls = (f"{b['preprocessing_s']:.0f} + {train:.0f} + {b['prediction_s']:.0f} = {whole:.0f} s"
                     if tta == "none" else
                     f"+ {np.mean([p['prediction_tta_s'] for p in parts]):.0f} s to predict, outside W")
            vs = _fmt_ci(pairs[system][tta]["legacy mean"]) if system != "nnunet" else "-"
            head.append(f"| {NAMES[system]} | {len(parts)} | {tta} | {walls} | "
                        + " | ".join(_fmt_range(s[f"dice_{r.lower()}"]) for r in REGIONS)
                        + f" | {_fmt_range(s['mean_dice'])} | {_fmt_range(s['mean_brats2023_dice'])} | {vs} |")
    return "\n".join(head)


def region_table(pairs: dict) -> str:
    """Ours minus nnU-Net per region and family: the paired mean difference over cases with its interval, and
    the seed-by-seed differences (mean, range)."""
    keys = [f"{f} {r}" for f in COLUMNS for r in (*REGIONS, "mean")]
    lines = ["| system | test-time augmentation | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for system, by_tta in pairs.items():
        for tta, p in by_tta.items():
            lines.append(f"| {NAMES[system]} | {tta} | " + " | ".join(_fmt_ci(p[k]) for k in keys) + " |")
    return "\n".join(lines)


def time_table(systems: dict, budget_s: float) -> str:
    """Where W went, per system: each phase's seconds (mean over seeds) and its share of W; the whole against W."""
    keys = ("preprocessing_s", "start_s", "training_iterations_s", "validation_s", "epoch_end_s",
            "final_validation_s", "prediction_s")
    lines = ["| system | " + " | ".join(k[:-2].replace("_", " ") for k in keys) + " | whole | inside W |",
             "|---|" + "---|" * (len(keys) + 2)]
    for system, parts in systems.items():
        cells = []
        for k in keys:
            v = [p["breakdown_s"][k] for p in parts if k in p["breakdown_s"]]
            cells.append(f"{np.mean(v):.0f} s ({np.mean(v) / budget_s:.0%})" if v else "-")
        inside = sum(p["whole_s"] <= budget_s for p in parts)
        lines.append(f"| {NAMES[system]} | " + " | ".join(cells) +
                     f" | {np.mean([p['whole_s'] for p in parts]):.0f} s | {inside} of {len(parts)} seeds |")
    return "\n".join(lines)


def machine_words() -> str:
    from .machine import machine_info
    from .table import machine

    return machine({"machine": machine_info()})


def plot(path: Path, systems: dict, budget_s: float, title: str) -> Path:
    """Test mean legacy Dice against whole wall minutes: each nnU-Net seed's point and their mean as a dotted
    level; each of our seeds' anytime curve (W/4, W/2, W); W as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_png

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {"nnunet": "#dd8452", "ours": "#4c72b0", "ours-nnunet-aug": "#55a868"}
    for system, parts in systems.items():
        c = colours[system]
        if system == "nnunet":
            ys = [summary(p["scores"]["none"])["mean_dice"] for p in parts]
            ax.plot([p["whole_s"] / 60 for p in parts], ys, "s", color=c, label=f"{NAMES[system]}, each seed")
            ax.axhline(float(np.mean(ys)), color=c, linestyle=":", linewidth=1)
            continue
        for i, p in enumerate(parts):
            xs = [pt["whole_s"] / 60 for pt in p["curve"]]
            ys = [summary(pt.get("scores") or p["scores"]["none"])["mean_dice"] for pt in p["curve"]]
            ax.plot(xs, ys, "o-", color=c, alpha=0.5, label=f"{NAMES[system]}, each seed" if i == 0 else None)
    ax.axvline(budget_s / 60, color="grey", linestyle="--", linewidth=1)
    ax.annotate("W", (budget_s / 60, 0.02), xytext=(-12, 0), textcoords="offset points", fontsize=8)
    ax.set_xlabel("wall minutes, whole pipeline (prepare + train + predict)")
    ax.set_ylabel("test mean Dice (TC, WT, ET)")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def reproducing(parts: list[dict], budget_s: float, spacing_mm: float, quick: bool) -> str:
    """The one command that runs every part the report is made from (parts may come from several calls), each
    value spelled out, so that it does not hang on a default."""
    seeds = " ".join(str(s) for s in sorted({p["seed"] for p in parts}))
    systems = " ".join(s for s in NAMES if any(p["system"] == s for p in parts))
    return (f"python -m benchmarks nnunet{' --quick' if quick else ''} --seeds {seeds} --systems {systems} "
            f"--budget {budget_s / 60:g} --spacing {spacing_mm:g}")


def report(out_dir: Path, st: dict, parts: list[dict], budget_s: float, command: str, seconds: float,
           quick: bool = False) -> dict:
    """nnunet.json, nnunet.md, nnunet.png and nnunet-cases.csv from every saved part of this setup and budget."""
    import csv

    from .report import write_result

    systems = {s: sorted((p for p in parts if p["system"] == s), key=lambda p: p["seed"]) for s in NAMES}
    systems = {s: v for s, v in systems.items() if v}
    if "nnunet" not in systems or len(systems) < 2:
        print("nnunet: no report yet: it needs nnU-Net's parts and ours")
        return {"parts": [f"{p['system']} seed {p['seed']}" for p in parts]}
    stats = {s: {t: over_seeds(v, t) for t in TTA} for s, v in systems.items()}
    pairs = {s: {t: paired(v, systems["nnunet"], t) for t in TTA} for s, v in systems.items() if s != "nnunet"}
    # each other arm of ours against our default recipe, paired the same way (arm minus default)
    arms = {s: {t: paired(v, systems["ours"], t) for t in TTA} for s, v in systems.items()
            if s not in ("nnunet", "ours") and "ours" in systems}
    curves = {s: anytime(v, systems["nnunet"]) for s, v in systems.items() if s != "nnunet"}
    nn = systems["nnunet"]
    cohort = st["cohort"]
    verdict = {s: {"mean legacy Dice, ours minus nnU-Net": p["none"]["legacy mean"],
                   "reading": ("ours higher" if p["none"]["legacy mean"]["ci95"][0] > 0 else "nnU-Net higher"
                               if p["none"]["legacy mean"]["ci95"][1] < 0 else "no difference shown")}
               for s, p in pairs.items()}
    payload = {
        "command": reproducing(parts, budget_s, cohort["spacing_mm"][0], quick),
        "calls": sorted({p.get("command") or command for p in parts} | {command}), "budget_s": budget_s,
        "cohort": cohort,
        "setup": {k: st[k] for k in ("build_store_s", "nnunet_prepared", "probes", "load")},
        "nnunet": {"version": nn[0]["version"], "trainer": nn[0]["trainer"],
                   "regions": "WT (labels 1, 2, 3), TC (1, 3), ET (3) in its numbering, regions_class_order [2, 1, 3]",
                   "schedule": [dict(p["schedule"], seed=p["seed"], final_lr=p["final_lr"]) for p in nn],
                   "checkpoint": "final", "processes": st["probes"]["nnunet"]["processes"]},
        "seeds": {s: [p["seed"] for p in v] for s, v in systems.items()},
        "test_cases": len(nn[0]["scores"]["none"]),
        "inside_budget": {f"{p['system']} seed {p['seed']}": p["whole_s"] <= budget_s for p in parts},
        "breakdown_s": {f"{p['system']} seed {p['seed']}": p["breakdown_s"] for p in parts},
        "load": {f"{p['system']} seed {p['seed']}": p["load"] for p in parts},
        "means": stats, "paired_vs_nnunet": pairs, "arms_vs_default": arms, "anytime": curves,
        "verdict_at_W": verdict,
        "table_markdown": table(systems, stats, pairs), "regions_markdown": region_table(pairs),
        "time_markdown": time_table(systems, budget_s),
        "seconds_this_call": seconds,
        "conventions": "legacy Dice per region and the brats2023 lesion-wise Dice, no postprocessing on either side, "
                       "scored on the source grid by evaluate score; paired: per case each side averaged over its "
                       "seeds, ours minus nnU-Net, 95% percentile bootstrap over cases; W: each side's whole pipeline "
                       "(preparation run once and its time counted in every seed's W; training; prediction without "
                       "test-time augmentation); the mirrored predictions are extra, outside W. nnU-Net predicts with "
                       "its final checkpoint, ours with its best (validation loss)."}
    write_result(out_dir, "nnunet", payload)
    _write_md(Path(out_dir), payload, systems)
    plot(Path(out_dir) / "nnunet.png", systems, budget_s,
         f"the race: {cohort['split']['test']} test cases at {cohort['spacing_mm'][0]:g} mm, W = {budget_s / 60:g} "
         f"min, {machine_words()}")
    with open(Path(out_dir) / "nnunet-cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "seed", "tta", "case", *(f"dice_{r.lower()}" for r in REGIONS),
                    *(f"brats2023_dice_{r.lower()}" for r in REGIONS)])
        for system, ps in systems.items():
            for p in ps:
                for tta in TTA:
                    for case, r in sorted(p["scores"][tta].items()):
                        w.writerow([system, p["seed"], tta, case,
                                    *(f"{r[f'{x}_{y.lower()}']:.4f}" for x in COLUMNS.values() for y in REGIONS)])
    print(payload["table_markdown"])
    return payload


def _write_md(out_dir: Path, payload: dict, systems: dict) -> None:
    c, b = payload["cohort"], payload["budget_s"]
    lines = [f"`{payload['command']}`: {c['cases']} synthetic cases (confounders "
             f"{'on' if c.get('confounders') else 'off'}, generator {c.get('generator_sha256', '?')[:12]}) at "
             f"{c['spacing_mm'][0]:g} mm ({'x'.join(map(str, c['grid']))} voxels), split {c['split']['train']} "
             f"training / {c['split']['val_seen']} validation / {c['split']['test']} test cases; W = {b / 60:g} min "
             f"per side and seed; seeds: " + "; ".join(f"{NAMES[s]} {', '.join(str(p['seed']) for p in v)}"
                                                       for s, v in systems.items()) + ".", "",
             payload["table_markdown"], "", "Ours minus nnU-Net per region, paired over the test cases (95% "
             "bootstrap interval):", "", payload["regions_markdown"], "", "Where W went (mean over seeds, share of W; "
             "nnU-Net's phases timed by its trainer, ours from metrics.jsonl; start: the process's start and end "
             "around its training loop):", "", payload["time_markdown"], ""]
    for s, a in payload["anytime"].items():
        t, ci = a["time_to_nnunet_dice"], a["ci95_s"]
        lines.append(f"{NAMES[s]}: time to nnU-Net's mean Dice ({a['nnunet_mean_dice']:.3f}): " + (
            f"{t['seconds']:.0f} s ({t['how']}), 95% interval over cases "
            f"[{'never' if ci[0] is None else f'{ci[0]:.0f} s'}, {'never' if ci[1] is None else f'{ci[1]:.0f} s'}]"
            if t["seconds"] is not None else "not reached") + ".")
    for s, by_tta in payload["arms_vs_default"].items():
        lines.append(f"{NAMES[s]} minus {NAMES['ours']}, mean legacy Dice paired over the test cases: " + "; ".join(
            f"{tta} {d['mean_difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            + (f" (same-seed pairs {d['seed_pairs']['min']:+.3f} to {d['seed_pairs']['max']:+.3f})"
               if d["seed_pairs"] else "")
            for tta, d in ((t, by_tta[t]["legacy mean"]) for t in TTA)) + ".")
    (out_dir / "nnunet.md").write_text("\n".join(lines) + "\n")
