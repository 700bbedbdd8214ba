"""Bootstrap confidence intervals over cases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Largest number of bootstrap draws x cases resampled in one vectorised block.
_BLOCK_ELEMENTS = 4_000_000


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Percentile bootstrap of the mean over cases: ``(mean, lo, hi)``.

    ``values`` holds one finite number per case (shape [m], m >= 1). ``n`` resamples of m
    cases with replacement are drawn from ``numpy.random.default_rng(seed)``; ``lo``/``hi``
    are the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means. Deterministic
    for a seed. An empty cohort raises ValueError (tables mark it instead of printing 0).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("empty cohort: no values to bootstrap")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap values must be finite")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    m = x.size
    rows = max(1, _BLOCK_ELEMENTS // m)
    means = np.empty(n, dtype=np.float64)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        means[start:start + k] = x[rng.integers(0, m, size=(k, m))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(x.mean()), float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval and the cohort size it was computed on."""

    mean: float
    lo: float
    hi: float
    n: int


def estimate(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Estimate | None:
    """:func:`bootstrap_ci` over the finite entries of ``values`` with their count; None if none."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    mean, lo, hi = bootstrap_ci(x, n=n_boot, seed=seed, alpha=alpha)
    return Estimate(mean, lo, hi, int(x.size))
