"""Metrics: golden values against direct numpy formulas, text metrics, diagnosis extraction."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from unibrain_cli.errors import UserError
from unibrain_cli.evaluation.diagnosis import SYNONYMS, extract_diagnosis
from unibrain_cli.evaluation.metrics import (
    PSNR_CAP_DB,
    disease_set,
    imputation_metrics,
    psnr,
    ratescore,
    ratescore_unavailable_reason,
    rouge1_f,
    ssim,
    top1,
    top1_hits,
)
from unibrain_cli.modalities import DISEASES


def _pair(seed: int = 0, s: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = uniform_filter(rng.random((s, s)), 5)
    pred = np.clip(ref + 0.05 * rng.standard_normal((s, s)), 0, 1)
    yy, xx = np.mgrid[:s, :s]
    mask = (yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 3) ** 2
    return pred, ref, mask


def _ssim_map(x: np.ndarray, y: np.ndarray, win: int = 7) -> np.ndarray:
    """Wang et al. SSIM with a uniform window and sample covariance (scikit-image's defaults)."""
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
    norm = win * win / (win * win - 1)
    ux, uy = uniform_filter(x, win), uniform_filter(y, win)
    vx = norm * (uniform_filter(x * x, win) - ux * ux)
    vy = norm * (uniform_filter(y * y, win) - uy * uy)
    vxy = norm * (uniform_filter(x * y, win) - ux * uy)
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def test_psnr_matches_formula() -> None:
    pred, ref, mask = _pair()
    assert psnr(pred, ref) == pytest.approx(10 * np.log10(1.0 / np.mean((pred - ref) ** 2)), rel=1e-12)
    inside = 10 * np.log10(1.0 / np.mean((pred[mask] - ref[mask]) ** 2))
    assert psnr(pred, ref, mask) == pytest.approx(inside, rel=1e-12)


def test_masked_psnr_ignores_outside() -> None:
    pred, ref, mask = _pair(1)
    spoiled = pred.copy()
    spoiled[~mask] = 1.0 - ref[~mask]
    assert psnr(spoiled, ref, mask) == psnr(pred, ref, mask)
    assert psnr(spoiled, ref) < psnr(pred, ref) - 3


def test_ssim_matches_formula() -> None:
    pred, ref, mask = _pair(2)
    smap = _ssim_map(ref, pred)
    assert ssim(pred, ref) == pytest.approx(smap[3:-3, 3:-3].mean(), abs=1e-10)
    assert ssim(pred, ref, mask) == pytest.approx(smap[mask].mean(), abs=1e-10)


def test_identical_images_and_caps() -> None:
    _, ref, mask = _pair(3)
    assert ssim(ref, ref) == pytest.approx(1.0)
    assert ssim(ref, ref, mask) == pytest.approx(1.0)
    assert psnr(ref, ref) == PSNR_CAP_DB and psnr(ref, ref, mask) == PSNR_CAP_DB
    scores = imputation_metrics(ref, ref, mask)
    assert scores == {"psnr": PSNR_CAP_DB, "ssim": pytest.approx(1.0), "psnr_brain": PSNR_CAP_DB,
                      "ssim_brain": pytest.approx(1.0)}
    # out-of-range predictions are clipped to [0, 1] before scoring
    assert psnr(ref + (ref > 0.5) * 2.0, np.where(ref > 0.5, 1.0, ref)) == PSNR_CAP_DB


def test_metric_errors() -> None:
    pred, ref, mask = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(pred[:-1], ref)
    with pytest.raises(ValueError, match="no pixels"):
        ssim(pred, ref, np.zeros_like(mask))
    with pytest.raises(ValueError, match="NaN"):
        psnr(np.full_like(ref, np.nan), ref)


def test_rouge1_known_values() -> None:
    assert rouge1_f("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge1_f("Enhancing lesions.", "lesion enhances") == pytest.approx(1.0)  # Porter stemmer on
    assert rouge1_f("glioma", "stroke") == 0.0
    # reference first: P = 1/1, R = 1/4 -> F = 0.4
    assert rouge1_f("left frontal glioma seen", "glioma") == pytest.approx(0.4)


def test_top1() -> None:
    preds = ["glioma", "stroke", None, "wmh"]
    truth = ["glioma", "metastasis", "stroke", {"wmh", "stroke"}]
    np.testing.assert_array_equal(top1_hits(preds, truth), [1, 0, 0, 1])
    assert top1(preds, truth) == 0.5
    assert np.isnan(top1([], []))
    assert disease_set("stroke|wmh") == {"stroke", "wmh"}
    with pytest.raises(ValueError, match="unknown disease"):
        disease_set("tumour")
    with pytest.raises(ValueError, match="2 predictions for 1 cases"):
        top1_hits(["glioma", "wmh"], ["glioma"])


PHRASES: list[tuple[str, str | None]] = [
    ("Final Diagnosis: Glioblastoma", "glioma"),
    ("Impression: large mass. Final Diagnosis: GBM.", "glioma"),
    ("A high-grade glial tumour in the left frontal lobe.", "glioma"),
    ("Findings consistent with oligodendroglioma.", "glioma"),
    ("Low-grade astrocytoma.", "glioma"),
    ("Extra-axial dural-based meningioma with a dural tail.", "meningioma"),
    ("Multiple metastases at the grey-white junction.", "metastasis"),
    ("Metastatic disease is favoured.", "metastasis"),
    ("Secondary deposits in both hemispheres.", "metastasis"),
    ("Acute infarction in the left MCA territory.", "stroke"),
    ("Acute ischaemic changes with restricted diffusion.", "stroke"),
    ("Final diagnosis: ischemic stroke", "stroke"),
    ("Chronic small vessel ischaemic disease.", "wmh"),
    ("Periventricular white matter hyperintensities, Fazekas 2.", "wmh"),
    ("Leukoaraiosis.", "wmh"),
    ("Microangiopathic change in the deep white matter.", "wmh"),
    ("No evidence of infarction.", None),
    ("Without evidence of metastatic disease.", None),
    ("No acute infarct. Findings consistent with glioma.", "glioma"),
    ("No significant mass effect, consistent with meningioma.", "meningioma"),
    ("Metastasis is unlikely; favour glioma.", "glioma"),
    ("Metastasis cannot be excluded.", "metastasis"),
    ("The findings mention glioma. Final Diagnosis: stroke", "stroke"),
    ("Final Diagnosis: uncertain. Probably metastasis.", "metastasis"),
    ("Final Diagnosis: not a glioma; white matter hyperintensities", "wmh"),
    ("Normal brain MRI.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), PHRASES)
def test_extract_diagnosis(text: str, expected: str | None) -> None:
    assert extract_diagnosis(text) == expected


def test_synonym_table_covers_the_classes() -> None:
    assert set(SYNONYMS) == set(DISEASES)
    for cls in DISEASES:
        assert extract_diagnosis(f"Final Diagnosis: {cls}") == cls


def test_ratescore_unavailable(tmp_path: Path) -> None:
    refs, hyps = ["glioma in the left frontal lobe"], ["left frontal glioma"]
    assert ratescore(refs, hyps, None) is None
    assert ratescore_unavailable_reason(None) == "no RaTEScore models directory given"
    with pytest.raises(UserError, match="does not exist"):
        ratescore(refs, hyps, tmp_path / "nope")
    with pytest.raises(UserError, match="RaTE-NER-Deberta/config.json"):
        ratescore(refs, hyps, tmp_path)
    for sub in ("RaTE-NER-Deberta", "BioLORD-2023-C"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps({}))
    if importlib.util.find_spec("RaTEScore") is None:
        assert "does not import" in ratescore_unavailable_reason(tmp_path)
        assert ratescore(refs, hyps, tmp_path) is None
