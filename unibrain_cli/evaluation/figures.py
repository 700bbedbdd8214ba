"""Evaluation figures (matplotlib, Agg, no pyplot state): qualitative grid and bar charts.

- :func:`qualitative_grid`: one row per case, columns ``inputs | imputed | ground truth |
  |error|`` like the paper's Fig. 2, PSNR/SSIM (in the brain when a mask is given) in the
  imputed panel's title.
- :func:`metric_bars`: grouped bars (groups = scenarios or chains, one bar per method) with
  the bootstrap CI as error bars, from a :func:`~unibrain_cli.evaluation.tables.summarize` frame.

PNGs are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from unibrain_cli.evaluation.metrics import psnr, ssim
from unibrain_cli.evaluation.tables import chain_label, scenario_label
from unibrain_cli.io.atomic import atomic_path
from unibrain_cli.modalities import DISPLAY_NAMES


@dataclass(frozen=True)
class QualitativeRow:
    """One case of the qualitative grid; all images [S, S] in [0, 1].

    ``inputs`` maps modality -> image (the model's available inputs, in display order).
    """

    label: str
    inputs: Mapping[str, np.ndarray]
    imputed: np.ndarray
    truth: np.ndarray
    target: str
    brain: np.ndarray | None = None


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically; return the path."""
    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _off(ax) -> None:  # noqa: ANN001 - matplotlib Axes
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def qualitative_grid(
    rows: Sequence[QualitativeRow], path: str | Path, error_vmax: float = 0.5, title: str | None = None
) -> Path:
    """Save the ``inputs | imputed | ground truth | error`` grid as a PNG; return the path."""
    if not rows:
        raise ValueError("qualitative_grid needs at least one row")
    n_in = max(len(r.inputs) for r in rows)
    ncols = n_in + 3
    fig = Figure(figsize=(2.0 * ncols + 0.6, 2.1 * len(rows) + (0.4 if title else 0.0)))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    err_im = None
    for i, r in enumerate(rows):
        if r.imputed.shape != r.truth.shape:
            raise ValueError(f"row {r.label}: imputed {r.imputed.shape} vs truth {r.truth.shape}")
        for ax in axes[i]:
            _off(ax)
        for j, (mod, img) in enumerate(r.inputs.items()):
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_title(f"input {DISPLAY_NAMES.get(mod, mod)}", fontsize=8)
        axes[i, 0].set_ylabel(r.label, fontsize=8)
        tgt = DISPLAY_NAMES.get(r.target, r.target)
        p, s = psnr(r.imputed, r.truth, r.brain), ssim(r.imputed, r.truth, r.brain)
        where = " brain" if r.brain is not None else ""
        axes[i, n_in].imshow(r.imputed, cmap="gray", vmin=0, vmax=1)
        axes[i, n_in].set_title(f"imputed {tgt}\n{p:.2f} dB / {s:.3f}{where}", fontsize=8)
        axes[i, n_in + 1].imshow(r.truth, cmap="gray", vmin=0, vmax=1)
        axes[i, n_in + 1].set_title(f"ground truth {tgt}", fontsize=8)
        err = np.abs(np.asarray(r.imputed, np.float64) - np.asarray(r.truth, np.float64))
        err_im = axes[i, n_in + 2].imshow(err, cmap="inferno", vmin=0, vmax=error_vmax)
        axes[i, n_in + 2].set_title("|imputed - truth|", fontsize=8)
    if err_im is not None:
        fig.colorbar(err_im, ax=axes[:, -1].tolist(), fraction=0.05, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def metric_bars(
    summary: pd.DataFrame,
    metric: str,
    path: str | Path,
    group: str = "scenario",
    series: str = "method",
    ylabel: str | None = None,
    title: str | None = None,
) -> Path:
    """Grouped bar chart of ``<metric>_mean`` with ``[<metric>_lo, <metric>_hi]`` error bars.

    ``summary`` is a :func:`~unibrain_cli.evaluation.tables.summarize` frame (columns ``group``,
    ``series``, ``<metric>_mean/lo/hi``); empty cohorts and unavailable values are left blank.
    """
    for col in (group, series, f"{metric}_mean", f"{metric}_lo", f"{metric}_hi"):
        if col not in summary.columns:
            raise ValueError(f"summary lacks column {col!r}")
    groups = list(dict.fromkeys(summary[group].astype(str)))
    names = list(dict.fromkeys(summary[series].astype(str)))
    label = chain_label if group == "chain" else scenario_label
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(max(4.0, 1.6 * len(groups) + 1.5), 3.2))
    ax = fig.subplots()
    x = np.arange(len(groups))
    seen = np.zeros(len(groups), dtype=bool)
    for k, name in enumerate(names):
        sub = summary.loc[summary[series].astype(str) == name]
        sub = sub.set_axis(sub[group].astype(str).to_numpy(), axis=0)
        mean = np.array([sub[f"{metric}_mean"].get(g, np.nan) for g in groups], dtype=np.float64)
        lo = np.array([sub[f"{metric}_lo"].get(g, np.nan) for g in groups], dtype=np.float64)
        hi = np.array([sub[f"{metric}_hi"].get(g, np.nan) for g in groups], dtype=np.float64)
        ok = np.isfinite(mean)
        seen |= ok
        err = np.vstack([mean - lo, hi - mean])[:, ok]
        ax.bar(x[ok] + (k - (len(names) - 1) / 2) * width, mean[ok], width, yerr=err, capsize=2, label=name)
    for g in np.flatnonzero(~seen):
        ax.text(x[g], 0.02, "no data", transform=ax.get_xaxis_transform(), ha="center", fontsize=8, color="0.4")
    ax.set_xticks(x, [label(g) for g in groups], fontsize=8)
    ax.set_ylabel(ylabel or metric)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return save_figure(fig, path)
