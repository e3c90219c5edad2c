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
