"""`unibrain evaluate --convention paper`: the authors' metric rules (released-checkpoint-protocol.md §4).

Golden values on hand-built arrays for the uint8 quantisation and the whole-slice PSNR/SSIM (checked
against scikit-image called here on independently built arrays), the last-target rule, the middle
lesion slice, and the runner/CLI wiring on the tiny fixtures of test_evaluate.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from slices_helpers import save_slices_folder
from test_evaluate import FAST, FULL, make_slice
from test_evaluate import write_slices as write_eval_slices
from typer.testing import CliRunner

from unibrain_cli.cli.app import app
from unibrain_cli.data.slicing import choose_slices
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation import runner as R
from unibrain_cli.evaluation.metrics import (
    PSNR_CAP_DB,
    paper_image_scores,
    prediction_uint8,
    reference_uint8,
)
from unibrain_cli.evaluation.scenarios import middle_lesion_index, paper_slice_position, scored_targets
from unibrain_cli.modalities import MODALITIES

S = 32


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    return write_eval_slices(tmp_path_factory.mktemp("slices") / "SLICES")


# --------------------------------------------------------------------------- uint8 quantisation


def test_uint8_quantisation_golden():
    x = np.array([-0.1, 0.0, 0.2, 0.5, 0.501, 0.999, 1.0, 1.2])
    # reference: numpy round (half to even: 127.5 -> 128), clipped to [0, 1] first
    assert reference_uint8(x).tolist() == [0, 0, 51, 128, 128, 255, 255, 255]
    assert reference_uint8(x).dtype == np.uint8
    # prediction: the authors' decoder truncates
    assert prediction_uint8([x]).tolist() == [0, 0, 51, 127, 127, 254, 255, 255]
    # two draws: each truncated, averaged, truncated again
    d1 = np.array([0.5, 0.1, 1.0])    # -> 127, 25, 255
    d2 = np.array([0.503, 0.1, 0.0])  # -> 128, 25, 0
    assert prediction_uint8([d1, d2]).tolist() == [127, 25, 127]
    with pytest.raises(ValueError, match="at least one draw"):
        prediction_uint8([])


def test_paper_scores_golden_whole_slice_with_background():
    """A 16x16 slice whose central 8x8 'brain' is 10 grey levels off, background 0 in both: PSNR over
    the whole slice = 20 log10(255 / 10) + 10 log10(256 / 64) (the background quarters the MSE)."""
    ref = np.zeros((16, 16), np.uint8)
    ref[4:12, 4:12] = 100
    pred = ref.copy()
    pred[4:12, 4:12] = 110
    scores = paper_image_scores(pred, ref)
    assert scores["psnr"] == pytest.approx(20 * math.log10(25.5) + 10 * math.log10(4.0), abs=1e-9)
    assert scores["psnr"] == pytest.approx(34.151403521958725, abs=1e-9)
    # one grey level everywhere: 20 log10(255)
    assert paper_image_scores(ref + 1, ref)["psnr"] == pytest.approx(48.1308036086791, abs=1e-9)
    # identical slices: the cap (scikit-image says inf)
    assert paper_image_scores(ref, ref) == {"psnr": PSNR_CAP_DB, "ssim": 1.0}
    with pytest.raises(ValueError, match="uint8"):
        paper_image_scores(pred.astype(np.float32), ref)


def test_paper_scores_equal_skimage_on_independent_arrays():
    """Float slices through the convention equal scikit-image on arrays quantised here by hand."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:S, 0:S]
    brain = (yy - 15.5) ** 2 / 144 + (xx - 15.5) ** 2 / 100 <= 1
    ref = np.where(brain, rng.uniform(0.1, 0.9, (S, S)), 0.0)
    draws = [np.clip(ref + np.where(brain, rng.normal(0, 0.05, (S, S)), 0.0), 0, 1) for _ in range(3)]

    ref_u8 = np.array([[round(v * 255) for v in row] for row in ref], dtype=np.uint8)  # Python's round
    dec = [np.array([[int(v * 255) for v in row] for row in d], dtype=np.float64) for d in draws]
    pred_u8 = np.array((dec[0] + dec[1] + dec[2]) / 3, dtype=np.float64).astype(np.uint8)
    want_psnr = peak_signal_noise_ratio(ref_u8 / 255.0, pred_u8 / 255.0, data_range=1)
    want_ssim = structural_similarity(ref_u8 / 255.0, pred_u8 / 255.0, data_range=1)

    assert np.array_equal(reference_uint8(ref), ref_u8) and np.array_equal(prediction_uint8(draws), pred_u8)
    got = R.convention_scores(draws, ref, brain, "paper")
    assert got["psnr"] == pytest.approx(want_psnr, abs=1e-12) and got["ssim"] == pytest.approx(want_ssim, abs=1e-12)
    assert math.isnan(got["psnr_brain"]) and math.isnan(got["ssim_brain"])
    # ours on the same draws: the float mean, plus the brain-masked pair
    ours = R.convention_scores(draws, ref, brain, "ours")
    mean = np.mean(np.stack(draws), axis=0)
    assert ours["psnr"] == pytest.approx(peak_signal_noise_ratio(ref, mean, data_range=1), abs=1e-12)
    assert np.isfinite(ours["psnr_brain"]) and ours["psnr_brain"] < ours["psnr"]
    # the slice usability sees under the paper convention is the uint8 ensemble / 255
    assert np.array_equal(R.method_slice(draws, "paper"), (pred_u8 / 255.0).astype(np.float32))


# --------------------------------------------------------------------------- what is scored


def test_last_target_only():
    chain = ("t2", "flair", "t1ce")
    assert scored_targets(chain, "paper") == ("t1ce",)
    assert scored_targets(chain, "ours") == chain
    assert scored_targets(("t2",), "paper") == ("t2",) and scored_targets((), "paper") == ()
    with pytest.raises(ValueError, match="unknown convention"):
        scored_targets(chain, "theirs")


def test_middle_lesion_slice():
    mask = np.zeros((8, 8, 12), bool)
    mask[2:5, 3:6, 3:7] = True  # lesion on z = 3, 4, 5, 6 (an even count)
    ks = np.flatnonzero(mask.any(axis=(0, 1)))
    assert middle_lesion_index(ks) == 5  # ks[4 // 2]: the upper middle
    # the slicer's eval slice is the centre of the extent, (3 + 6) // 2 = 4: one slice apart
    assert choose_slices(mask, np.ones_like(mask), per_case=1)[0] == (4, True)
    assert middle_lesion_index([3, 4, 5, 6, 7]) == 5
    assert middle_lesion_index([9, 2, 3]) == 3  # a split lesion: the middle element, not the extent centre
    with pytest.raises(ValueError, match="no lesion"):
        middle_lesion_index([])


def test_paper_slice_position_among_stored_slices():
    # all lesion slices stored, unordered: the middle of 2, 3, 4, 5 is 4 (the slicer flagged 3)
    assert paper_slice_position([3, 2, 5, 4], [9, 4, 4, 8], [True, False, False, False]) == 3
    # lesion on some stored slices only: the middle of the lesion ones (11, 12) is 12
    assert paper_slice_position([10, 11, 12], [0, 5, 5], [True, False, False]) == 2
    # no lesion on any stored slice: the eval slice
    assert paper_slice_position([40, 41, 42], [0, 0, 0], [False, True, False]) == 1
    assert paper_slice_position([7], [0], [False]) == 0


def write_four_slice_folder(root: Path) -> Path:
    """Two test cases with 4 stored slices each (k = 10..13, lesion on all, the slicer's eval slice
    k = 11) and one case without lesion (eval slice k = 21); images differ per slice."""
    rng = np.random.default_rng(3)
    rows, arrays = [], []
    for case, lesion in (("a", True), ("b", True), ("n", False)):
        base = 20 if not lesion else 10
        for j, k in enumerate(range(base, base + 4)):
            arrays.append(make_slice(rng, FULL, S))
            rows.append({"slice_id": f"{case}:{k}", "case_id": case, "subset": "synthetic", "split": "test",
                         "diseases": "glioma", "slice_k": k, "is_eval": j == 1, "shard": "", "row": 0,
                         "modalities": "|".join(m for m in MODALITIES if m in FULL),
                         "lesion_area_px": 10 + j if lesion else 0, "lesion_w_mm": 4.0, "lesion_h_mm": 4.0,
                         "findings_2d": "{}", "findings_3d": "{}", "global_finding_2d": "", "global_finding": "",
                         "impression": "glioma"})
    return save_slices_folder(root, rows, arrays, S, shard_rows=len(arrays))


def test_load_cases_paper_scores_the_middle_lesion_slice(tmp_path):
    folder = write_four_slice_folder(tmp_path / "S4")
    ours, _ = R.load_cases(folder, "test")
    paper, _ = R.load_cases(folder, "test", convention="paper")
    assert [c.slice_id for c in ours] == ["a:11", "b:11", "n:21"]
    assert [c.slice_id for c in paper] == ["a:12", "b:12", "n:21"]  # [10, 11, 12, 13][4 // 2] = 12
    idx = pd.read_parquet(folder / "index.parquet")
    row = int(idx.index[idx["slice_id"] == "a:12"][0])
    from safetensors.numpy import load_file

    stored = load_file(str(folder / "shards" / idx.loc[row, "shard"]))["images"][int(idx.loc[row, "row"])]
    assert np.array_equal(paper[0].images, stored)
    # the same seeded subset of cases in both conventions
    sub_o, _ = R.load_cases(folder, "test", max_cases=2, seed=5)
    sub_p, _ = R.load_cases(folder, "test", max_cases=2, seed=5, convention="paper")
    assert [c.case_id for c in sub_o] == [c.case_id for c in sub_p]
    conv = R.convention_summary("paper", folder, "test", paper)
    assert conv["name"] == "paper" and conv["slices"]["same_slice_as_ours"] == 1
    assert conv["slices"]["other_slice"] == [{"case_id": "a", "slice_k": 12, "ours_slice_k": 11},
                                             {"case_id": "b", "slice_k": 12, "ours_slice_k": 11}]
    assert conv["slices"]["stored_slices_per_case"] == {"min": 4, "max": 4}
    assert conv["slices"]["stored_lesion_slices_per_case"] == {"min": 0, "max": 4}
    assert "2 of 3 cases on another slice" in R.convention_line(conv)
    assert "slices" not in R.convention_summary("ours", folder, "test", ours)
    with pytest.raises(UserError, match="--convention.*unknown convention 'theirs'"):
        R.load_cases(folder, "test", convention="theirs")


# --------------------------------------------------------------------------- runner and CLI


def test_unified_row_scores_the_last_target_of_its_chain(ckpt, slices, monkeypatch):
    """Table 1 under the paper convention: PSNR/SSIM of the chain's LAST imputed target only."""
    from unibrain_cli.inference.checkpoint import load_for_inference

    generated: dict[str, np.ndarray] = {}
    real_chain = R.impute_chain

    def chain(*args, **kwargs):
        res = real_chain(*args, **kwargs)
        generated.update({k: v.numpy() for k, v in res.images.items()})
        return res

    monkeypatch.setattr(R, "impute_chain", chain)
    cases, _ = R.load_cases(slices, "test", convention="paper")
    case = next(c for c in cases if c.case_id == "te1")  # t1, t2, flair, t1ce, dwi, adc
    ev = R.ModelEvaluator(load_for_inference(ckpt), R.Settings(thinking_tokens=0, answer_tokens=0, convention="paper"))
    row = ev.unified_row(case, "t1")
    assert row["imputed"] == "t2|flair|t1ce|dwi|adc" and row["scored_target"] == "adc"
    want = paper_image_scores(prediction_uint8([generated["adc"]]), reference_uint8(case.image("adc")))
    assert row["psnr"] == want["psnr"] and row["ssim"] == want["ssim"]
    ours = R.ModelEvaluator(load_for_inference(ckpt), R.Settings(thinking_tokens=0, answer_tokens=0))
    assert "scored_target" not in ours.unified_row(case, "t1")


def test_paper_ensemble_row_is_the_uint8_average(ckpt, slices, tmp_path, monkeypatch):
    """With known draws (the truth and the truth + 0.1 inside the brain) the Table-2 rows equal
    scikit-image on the authors' uint8 slices built here."""
    def draws(self, case, inputs, target, seeds):
        truth = case.image(target)
        return [truth if s % 2 == 0 else np.clip(truth + 0.1 * (truth > 0), 0, 1) for s in seeds]

    monkeypatch.setattr(R.ModelEvaluator, "chain_images", draws)
    res = R.evaluate(ckpt, slices, tmp_path / "E", scenarios="complete", chain=True, ensemble=2,
                     convention="paper", **FAST)
    frame = pd.read_csv(tmp_path / "E" / "table2_cases.csv")
    assert frame["psnr_brain"].isna().all() and frame["ssim_brain"].isna().all()
    cases = {c.case_id: c for c in R.load_cases(slices, "test", convention="paper")[0]}
    for _, r in frame.iterrows():
        truth = cases[r["case_id"]].image(r["chain"].split("->")[1])
        ref = np.round(np.clip(truth.astype(np.float64), 0, 1) * 255).astype(np.uint8)
        a = np.floor(truth.astype(np.float64) * 255)
        b = np.floor(np.clip(truth + 0.1 * (truth > 0), 0, 1).astype(np.float64) * 255)
        pred = np.floor(a if r["seeds"] == 1 else (a + b) / 2).astype(np.uint8)
        assert r["psnr"] == pytest.approx(peak_signal_noise_ratio(ref / 255, pred / 255, data_range=1), abs=1e-9)
        assert r["ssim"] == pytest.approx(structural_similarity(ref / 255, pred / 255, data_range=1), abs=1e-9)
    assert list(res.tables["table2"].display.columns) == ["Method", "Chain", "n", "PSNR (dB)", "SSIM", "Top-1 (%)"]


def test_cli_convention_paper_runs_and_is_recorded(ckpt, slices, tmp_path):
    out = tmp_path / "E"
    res = CliRunner().invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--scenario", "t1",
                                   "--chain", "--ensemble", "2", "--convention", "paper", "--thinking-tokens", "0",
                                   "--answer-tokens", "0", "--baselines", "none", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Convention: paper" in res.output
    summary = json.loads((out / "eval.json").read_text())
    conv = summary["convention"]
    assert conv["name"] == "paper" and conv["slices"]["cases"] == 3 and conv["slices"]["same_slice_as_ours"] == 3
    assert "uint8" in conv["values"] and "last target" in conv["targets"] and "sample_time" in conv["ensemble"]
    t1 = pd.read_csv(out / "table1_cases.csv")
    uni = t1[t1["method"] == R.METHOD_UNIFIED].set_index("case_id")
    assert uni.loc["te0", "scored_target"] == "t1ce" and uni.loc["te1", "scored_target"] == "adc"
    assert uni[["psnr", "ssim"]].notna().all().all() and t1.loc[t1["method"] == R.METHOD_UND, "psnr"].isna().all()
    md = (out / "tables.md").read_text()
    # one convention line under each table: Table 1, Table 1 by class, Table 2
    assert "PSNR last target (dB)" in md and "PSNR brain" not in md and md.count("Convention: paper") == 3
    # the default stays ours, recorded too
    res = CliRunner().invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--scenario", "t1",
                                   "--max-cases", "1", "--thinking-tokens", "0", "--answer-tokens", "0",
                                   "--baselines", "none", "--out", str(tmp_path / "O")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "O" / "eval.json").read_text())["convention"]["name"] == "ours"
    assert "Convention: ours" in res.output


def test_cli_unknown_convention_is_one_line(ckpt, slices, tmp_path):
    res = CliRunner().invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--convention", "theirs",
                                   "--out", str(tmp_path / "E")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--convention" in lines[0] and "ours, paper" in lines[0]
