"""Preview figure of a phantom dataset: one row per disease, one column per modality."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unibrain_cli.data.phantom.anatomy import Grid
from unibrain_cli.io.atomic import atomic_path
from unibrain_cli.modalities import DISPLAY_NAMES, MODALITIES


def display_slice(volume: np.ndarray, grid: Grid, world_z: float) -> np.ndarray:
    """Axial slice of ``volume`` nearest to world ``world_z`` (mm), in RAS order, rotated for display
    (anterior up, subject's right on the image left, radiological convention)."""
    k = int(np.clip(round(float(grid.world_to_index(np.array([[0.0, 0.0, world_z]]))[0, 2])), 0, grid.shape[2] - 1))
    sl = volume[:, :, k].astype(np.float32)
    if grid.affine[0, 0] < 0:
        sl = sl[::-1, :]
    if grid.affine[1, 1] < 0:
        sl = sl[:, ::-1]
    return np.ascontiguousarray(np.rot90(sl)[:, ::-1])


def write_preview(rows: dict[str, dict[str, np.ndarray]], path: Path, titles: dict[str, str] | None = None) -> None:
    """Write a PNG grid: ``rows`` disease -> modality -> 2D slice; missing modalities stay blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(len(names), len(MODALITIES), figsize=(2.0 * len(MODALITIES), 2.1 * len(names)),
                             squeeze=False)
    for r, disease in enumerate(names):
        for c, mod in enumerate(MODALITIES):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = rows[disease].get(mod)
            if img is None:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "not acquired", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            else:
                top = float(np.percentile(img[img > 0], 99.5)) if (img > 0).any() else 1.0
                ax.imshow(img, cmap="gray", vmin=0.0, vmax=max(top, 1e-6), interpolation="nearest")
            if r == 0:
                ax.set_title(DISPLAY_NAMES[mod], fontsize=9)
            if c == 0:
                ax.set_ylabel((titles or {}).get(disease, disease), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, metadata={"Software": None})
    plt.close(fig)
