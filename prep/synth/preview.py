"""A picture of one case: middle slices of the four modalities side by side, label overlaid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store.conventions import LABEL_CONVENTIONS, MODALITIES, convention_for_labels


def save_case_preview(case, out: str | Path, title: str | None = None) -> Path:
    """Axial, coronal and sagittal slices through the tumour centre (RAS), one column per modality plus the
    label overlaid on FLAIR. ``case`` is a discovered ``CaseFiles``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.colors import ListedColormap

    def ras(path):
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asanyarray(img.dataobj), img.header.get_zooms()[:3]

    vols = {m: ras(case.images[m])[0] for m in MODALITIES}
    seg, zooms = ras(case.seg) if case.seg is not None else (np.zeros_like(vols["t1"], np.uint8), None)
    from scipy import ndimage

    parts, n = ndimage.label(seg > 0)
    if n:  # through the centre of the largest lesion
        largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(parts), parts, range(1, n + 1))))
        centre = np.argwhere(parts == largest).mean(0).astype(int)
    else:
        centre = np.array(seg.shape) // 2
    cmap = ListedColormap([(0, 0, 0, 0), (1, 0.2, 0.2, 0.6), (0.2, 1, 0.2, 0.45), (1, 1, 0.1, 0.6),
                           (0.2, 0.5, 1, 0.6)])
    convention = convention_for_labels(case.label_convention, np.unique(seg))
    conv = LABEL_CONVENTIONS[convention]
    lab = np.zeros(seg.shape, np.uint8)
    for shown, key in ((1, "necrosis"), (2, "edema"), (3, "enhancing"), (4, "cavity")):
        if key in conv:
            lab[seg == conv[key]] = shown
    views = [("axial", 2), ("coronal", 1), ("sagittal", 0)]
    fig, axes = plt.subplots(3, 5, figsize=(15, 9.5), facecolor="black")
    for r, (vname, ax_i) in enumerate(views):
        def cut(a, ax_i=ax_i):
            return np.rot90(np.take(a, centre[ax_i], axis=ax_i))

        for c, name in enumerate([*MODALITIES, "label"]):
            ax = axes[r, c]
            base = vols["flair" if name == "label" else name]
            sl = cut(base)
            ax.imshow(sl, cmap="gray", vmin=0, vmax=np.percentile(base[base > 0], 99.5) if base.any() else 1)
            if name == "label":
                ax.imshow(cut(lab), cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                legend = "NCR red, ED green, ET yellow" + (", RC blue" if "cavity" in conv else "")
                ax.set_title(name if name != "label" else f"FLAIR + label ({legend})", color="white", fontsize=8)
        axes[r, 0].text(-0.05, 0.5, vname, color="white", rotation=90, va="center", ha="right",
                        transform=axes[r, 0].transAxes)
    fig.suptitle(title or case.case_id, color="white")
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Save a dark-background slice figure as PNG (folders made as needed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    return out


CONFOUNDER_VIEWS = {  # confounder -> (the modality that shows it, title)
    "vessels": ("t1ce", "cortical vessels (T1ce)"), "sinuses": ("t1ce", "dural sinuses (T1ce)"),
    "choroid": ("t1ce", "choroid plexus (T1ce)"), "caps": ("flair", "periventricular caps (FLAIR)"),
    "foci": ("flair", "white-matter foci (FLAIR)"), "residue": ("t1ce", "skull-strip residue (T1ce)"),
}


def save_confounders_preview(seed: int, shape, out: str | Path, layout: str = "brats2021",
                             max_cases: int = 40) -> Path:
    """Each confounder (prep.synth.confounders) on the first case of the cohort ``seed`` that has it: the slice holding
    most of it, with it outlined in cyan, beside the same slice of the clean case; the label in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .generator import make_case

    found: dict = {}
    for i in range(max_cases):
        details: dict = {}
        images, label, _ = make_case(i, seed, shape, layout, True, details)
        added = details["confounders"]
        for name, flat in added.masks.items():
            if name not in found and flat.size:
                found[name] = (i, images, label, flat)
        if added.thick and "thick" not in found:
            found["thick"] = (i, images, label, added.thick[0])
        if len(found) == len(CONFOUNDER_VIEWS) + 1:
            break
    names = [n for n in (*CONFOUNDER_VIEWS, "thick") if n in found]
    fig, axes = plt.subplots(len(names), 2, figsize=(7, 3.3 * len(names)), facecolor="black", squeeze=False)
    for row, name in enumerate(names):
        i, images, label, what = found[name]
        clean = make_case(i, seed, shape, layout, False)[0]
        if name == "thick":
            mod, axis, mm = what
            mask = np.zeros(label.shape, bool)
            cut_axis, title = (axis + 1) % 3, f"thick slices: {mod.upper()} in {mm:.1f} mm slabs along axis {axis}"
        else:
            mod, title = CONFOUNDER_VIEWS[name]
            mask = np.zeros(label.size, bool)
            mask[what] = True
            mask = mask.reshape(label.shape)
            cut_axis = 2
        index = int(np.argmax(mask.sum(tuple(a for a in range(3) if a != cut_axis)))) if mask.any() else \
            label.shape[cut_axis] // 2
        for col, (vol, caption) in enumerate(((images[mod], f"case {i}: {title}"), (clean[mod], "the clean case"))):
            ax = axes[row, col]
            sl = np.rot90(np.take(vol, index, axis=cut_axis))
            ax.imshow(sl, cmap="gray", vmin=0, vmax=np.percentile(vol[vol > 0], 99.5) if vol.any() else 1)
            ax.contour(np.rot90(np.take(label, index, axis=cut_axis)) > 0, [0.5], colors="red", linewidths=0.6)
            if col == 0 and mask.any():
                ax.contour(np.rot90(np.take(mask, index, axis=cut_axis)), [0.5], colors="cyan", linewidths=0.6)
            ax.set_title(caption, color="white", fontsize=8)
            ax.set_axis_off()
    return save_figure(fig, out)
