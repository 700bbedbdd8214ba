"""Evaluation metrics of the paper: PSNR, SSIM, ROUGE-1, Top-1 and (optionally) RaTEScore.

Conventions (DESIGN.md section 6):

- Images are 2D (or nD) float arrays on the [0, 1] intensity scale of the prepared data;
  both ``pred`` and ``ref`` are clipped to [0, 1] before scoring and scored with
  scikit-image at ``data_range=1``.
- "Brain" variants restrict the score to a binary mask: PSNR uses the MSE over the mask
  voxels only; SSIM is the mean of scikit-image's full SSIM map over the mask pixels (the
  local windows still see the neighbourhood, as in the full-field score).
- A perfect reconstruction has MSE 0 and an infinite PSNR; we report it as
  :data:`PSNR_CAP_DB` (100 dB, i.e. an MSE floor of 1e-10) everywhere so means, bootstrap
  intervals and tables stay finite and consistent.
- Text metrics are fractions in [0, 1]; tables multiply them by 100 like the paper.
- The authors' convention (``--convention paper``; :func:`reference_uint8`,
  :func:`prediction_uint8`, :func:`paper_image_scores`): slices quantised to uint8 (reference
  rounded, prediction truncated like their decoder, ``sample_time`` draws averaged then
  truncated), scored on ``uint8 / 255`` over the whole slice with ``data_range=1``.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from unibrain_cli.errors import UserError
from unibrain_cli.modalities import DISEASES

#: PSNR reported for a perfect reconstruction (MSE == 0), in dB.
PSNR_CAP_DB: float = 100.0

#: Sub-folders of a RaTEScore models directory: the NER model and the synonym encoder,
#: named like their Hugging Face repositories (Angelakeke/RaTE-NER-Deberta,
#: FremyCompany/BioLORD-2023-C).
RATESCORE_NER_DIR = "RaTE-NER-Deberta"
RATESCORE_EVAL_DIR = "BioLORD-2023-C"


def _prepare_pair(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[
    np.ndarray, np.ndarray, np.ndarray | None
]:
    """Validate shapes, clip to [0, 1] as float64, and binarise the mask."""
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(ref).all()):
        raise ValueError("pred/ref contain NaN or inf")
    pred = np.clip(pred, 0.0, 1.0)
    ref = np.clip(ref, 0.0, 1.0)
    m = None
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != ref.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {ref.shape}")
        if not m.any():
            raise ValueError("mask selects no pixels; cannot score inside an empty mask")
    return pred, ref, m


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of ``pred`` against ``ref`` (both [0, 1], same shape).

    With ``mask`` (binary, same shape) the MSE is taken over the mask voxels only.
    A perfect match returns :data:`PSNR_CAP_DB`.
    """
    pred, ref, m = _prepare_pair(pred, ref, mask)
    if m is not None:
        pred, ref = pred[m], ref[m]
    if mean_squared_error(ref, pred) <= 10.0 ** (-PSNR_CAP_DB / 10.0):
        return PSNR_CAP_DB
    return float(peak_signal_noise_ratio(ref, pred, data_range=1.0))


def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Structural similarity of ``pred`` against ``ref`` (2D, [0, 1], at least 7x7 pixels).

    Without ``mask`` this is scikit-image's mean SSIM (7x7 uniform window, data_range 1).
    With ``mask`` it is the mean of the full SSIM map over the mask pixels.
    """
    pred, ref, m = _prepare_pair(pred, ref, mask)
    mssim, smap = structural_similarity(ref, pred, data_range=1.0, full=True)
    if m is None:
        return float(mssim)
    return float(smap[m].mean())


def imputation_metrics(pred: np.ndarray, ref: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """The four image scores of Table 2 for one slice: psnr, ssim, psnr_brain, ssim_brain."""
    return {
        "psnr": psnr(pred, ref),
        "ssim": ssim(pred, ref),
        "psnr_brain": psnr(pred, ref, brain),
        "ssim_brain": ssim(pred, ref, brain),
    }


# ---------------------------------------------------------------------------------------------
# the authors' image-score convention (``unibrain evaluate --convention paper``)
# ---------------------------------------------------------------------------------------------

#: ``--convention`` values: ``ours`` (float [0, 1] slices, full field + inside the reference brain)
#: and ``paper`` (the authors' ``evaluate_metrics.py``: uint8/255 whole slices, see below).
CONVENTIONS: tuple[str, ...] = ("ours", "paper")


def reference_uint8(ref: np.ndarray) -> np.ndarray:
    """A [0, 1] reference slice as the authors hold it: ``round(x * 255)`` as uint8.

    Their ground truth is the volume rescaled with ``np.round(... * 255)`` (numpy's round half
    to even) and stored as uint8; ``ref`` is clipped to [0, 1] first.
    """
    ref = np.asarray(ref, dtype=np.float64)
    if not np.isfinite(ref).all():
        raise ValueError("ref contains NaN or inf")
    return np.round(np.clip(ref, 0.0, 1.0) * 255.0).astype(np.uint8)


def prediction_uint8(draws: Sequence[np.ndarray]) -> np.ndarray:
    """The authors' generated slice from ``draws`` (N >= 1 sampled [0, 1] slices of one target).

    Each draw is decoded like theirs, ``(x * 255)`` truncated to uint8 (``.astype(np.uint8)`` after
    clamping to [0, 1]); ``sample_time`` draws are averaged (``np.mean`` over the uint8 draws) and
    the mean truncated to uint8 again. One draw gives ``floor(x * 255)``.
    """
    if len(draws) == 0:
        raise ValueError("need at least one draw")
    stack = np.stack([np.asarray(d, dtype=np.float64) for d in draws])
    if not np.isfinite(stack).all():
        raise ValueError("draws contain NaN or inf")
    decoded = np.floor(np.clip(stack, 0.0, 1.0) * 255.0)
    return np.floor(decoded.mean(axis=0)).astype(np.uint8)


def paper_image_scores(pred_u8: np.ndarray, ref_u8: np.ndarray) -> dict[str, float]:
    """PSNR/SSIM the authors' way: scikit-image on ``uint8 / 255`` over the WHOLE slice (background
    included), ``data_range=1``, SSIM with scikit-image's defaults (7x7 uniform window).

    A perfect match reads :data:`PSNR_CAP_DB` (scikit-image, and so their script, gives inf).
    """
    pred_u8, ref_u8 = np.asarray(pred_u8), np.asarray(ref_u8)
    for name, a in (("pred_u8", pred_u8), ("ref_u8", ref_u8)):
        if a.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8, got {a.dtype}")
    pred, ref = pred_u8 / 255.0, ref_u8 / 255.0
    return {"psnr": psnr(pred, ref), "ssim": ssim(pred, ref)}


@functools.lru_cache(maxsize=1)
def _rouge1_scorer():  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_f(reference: str, hypothesis: str) -> float:
    """ROUGE-1 F1 in [0, 1] (``rouge-score``, Porter stemmer on, reference first)."""
    return float(_rouge1_scorer().score(reference, hypothesis)["rouge1"].fmeasure)


def disease_set(labels: str | Iterable[str]) -> frozenset[str]:
    """A case's disease classes from a ``"|"``-joined string (the slices index) or an iterable."""
    items = labels.split("|") if isinstance(labels, str) else list(labels)
    out = frozenset(s.strip().lower() for s in items if s and s.strip())
    unknown = out - set(DISEASES)
    if unknown:
        raise ValueError(f"unknown disease class(es) {sorted(unknown)}; expected {DISEASES}")
    return out


def top1_hits(
    pred_labels: Sequence[str | None], true_label_sets: Sequence[str | Iterable[str]]
) -> np.ndarray:
    """Per-case Top-1 correctness as a float array of 0/1 (shape [n]).

    A prediction is correct when it is one of the case's disease classes; ``None`` (no
    class found in the generated text) is wrong.
    """
    if len(pred_labels) != len(true_label_sets):
        raise ValueError(f"{len(pred_labels)} predictions for {len(true_label_sets)} cases")
    return np.array(
        [float(p is not None and p in disease_set(t)) for p, t in zip(pred_labels, true_label_sets)],
        dtype=np.float64,
    )


def top1(pred_labels: Sequence[str | None], true_label_sets: Sequence[str | Iterable[str]]) -> float:
    """Top-1 accuracy in [0, 1] over the cases (see :func:`top1_hits`); NaN for no cases."""
    hits = top1_hits(pred_labels, true_label_sets)
    return float(hits.mean()) if hits.size else math.nan


def ratescore_unavailable_reason(models_dir: str | Path | None) -> str | None:
    """Why RaTEScore cannot be computed, or None when it can.

    It can only when the user names a local models directory (holding
    ``RaTE-NER-Deberta/`` and ``BioLORD-2023-C/``) and the ``RaTEScore`` package imports.
    A named directory that is missing or incomplete is a :class:`UserError`.
    """
    if models_dir is None:
        return "no RaTEScore models directory given"
    root = Path(models_dir)
    if not root.is_dir():
        raise UserError("RaTEScore models directory does not exist", str(root))
    for sub in (RATESCORE_NER_DIR, RATESCORE_EVAL_DIR):
        if not (root / sub / "config.json").is_file():
            raise UserError(
                f"missing {sub}/config.json; put the two RaTEScore models in "
                f"{RATESCORE_NER_DIR}/ and {RATESCORE_EVAL_DIR}/ under this directory",
                str(root),
            )
    try:
        importlib.import_module("RaTEScore")
    except ImportError as exc:
        return f"the RaTEScore package does not import ({exc}); install it with `pip install RaTEScore`"
    return None


def ratescore(
    references: Sequence[str],
    hypotheses: Sequence[str],
    models_dir: str | Path | None = None,
    use_gpu: bool = False,
) -> list[float] | None:
    """Per-case RaTEScore in [0, 1], or None when unavailable (never a made-up number).

    Uses the ``RaTEScore`` package with the two models read from ``models_dir`` (see
    :func:`ratescore_unavailable_reason`); tables print "unavailable" for None.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if ratescore_unavailable_reason(models_dir) is not None:
        return None
    root = Path(models_dir)  # type: ignore[arg-type]
    module = importlib.import_module("RaTEScore")
    scorer = module.RaTEScore(
        bert_model=str(root / RATESCORE_NER_DIR),
        eval_model=str(root / RATESCORE_EVAL_DIR),
        use_gpu=use_gpu,
    )
    return [float(s) for s in scorer.compute_score(list(hypotheses), list(references))]
