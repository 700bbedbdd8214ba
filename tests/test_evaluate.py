"""`unibrain evaluate`: Tables 1-3 end to end on a tiny random checkpoint and a tiny slices folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from slices_helpers import save_slices_folder
from typer.testing import CliRunner

from unibrain_cli.cli.app import app
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation import runner as R
from unibrain_cli.evaluation.baselines import fit_copy_nearest
from unibrain_cli.evaluation.metrics import PSNR_CAP_DB
from unibrain_cli.evaluation.scenarios import (
    CHAIN_KEYS,
    chain_applies,
    parse_scenarios,
    scenario_inputs,
    scenario_targets,
)
from unibrain_cli.evaluation.tables import EMPTY
from unibrain_cli.modalities import MODALITIES

S = 32  # the tiny recipe's slice size
FULL = ("t1", "t2", "flair", "t1ce")
#: case -> (split, modalities, disease, impression)
CASES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    **{f"tr{i}": ("train", FULL, "glioma", "enhancing glioma") for i in range(3)},
    "te0": ("test", FULL, "glioma", "left frontal glioma with oedema"),
    "te1": ("test", (*FULL, "dwi", "adc"), "stroke", "acute infarct"),
    "te2": ("test", ("t2", "flair"), "wmh", "white matter hyperintensities"),
    "va0": ("val", ("t1", "t2"), "metastasis", "metastases"),
}
FAST = {"thinking_tokens": 3, "answer_tokens": 6, "baselines": "none"}


def make_slice(rng: np.random.Generator, mods: tuple[str, ...], size: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    brain = ((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.35) ** 2 <= 1.0
    lesion = ((yy - 0.45) ** 2 + (xx - 0.55) ** 2 <= 0.01) & brain
    f = 0.5 + 0.5 * np.sin(6 * yy + rng.uniform(0, 1)) * np.cos(5 * xx)
    images = np.zeros((6, size, size), np.float32)
    for c, m in enumerate(MODALITIES):
        if m in mods:
            base = f if c % 2 == 0 else 1 - f
            images[c] = np.clip(0.2 + 0.6 * base + 0.2 * lesion + rng.normal(0, 0.01, base.shape), 0, 1) * brain
    present = np.array([m in mods for m in MODALITIES], np.uint8)
    return {"images": images, "present": present, "mask": lesion.astype(np.uint8),
            "labels": lesion.astype(np.uint8), "brain": brain.astype(np.uint8)}


def write_slices(root: Path, size: int = S, seed: int = 0) -> Path:
    """A slices folder (unibrain-slices/1): one eval slice + one other slice per case, one shard."""
    rng = np.random.default_rng(seed)
    rows, slices = [], []
    for case, (split, mods, disease, impression) in CASES.items():
        for k in range(2):
            slices.append(make_slice(rng, mods, size))
            rows.append({
                "slice_id": f"{case}:{k}", "case_id": case, "subset": "synthetic", "split": split,
                "diseases": disease, "slice_k": k, "is_eval": k == 1, "shard": "", "row": 0,
                "modalities": "|".join(m for m in MODALITIES if m in mods),
                "lesion_area_px": 10, "lesion_w_mm": 4.0, "lesion_h_mm": 4.0,
                "findings_2d": json.dumps({m: "a lesion" for m in mods}),
                "findings_3d": json.dumps({m: "a lesion" for m in mods}),
                "global_finding_2d": "a lesion", "global_finding": "a lesion", "impression": impression,
            })
    return save_slices_folder(root, rows, slices, size, shard_rows=len(slices))


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    return write_slices(tmp_path_factory.mktemp("slices") / "SLICES")


@pytest.fixture(scope="module")
def full_run(ckpt, slices, tmp_path_factory) -> R.EvalResult:
    out = tmp_path_factory.mktemp("eval") / "EVAL"
    return R.evaluate(ckpt, slices, out, split="test", chain=True, ensemble=2, baselines="copy,unet,two-stage",
                      unet_steps=2, thinking_tokens=3, answer_tokens=6)


# --------------------------------------------------------------------------- scenarios


def test_scenarios_and_chains():
    assert parse_scenarios("all") == ("t1", "t1_t2", "t1_t2_flair", "complete")
    assert parse_scenarios("complete, T1") == ("t1", "complete")
    with pytest.raises(UserError, match="--scenario.*unknown scenario 'flair'.*t1_t2_flair"):
        parse_scenarios("flair")
    present = ("t1", "t2", "flair", "t1ce", "dwi", "adc")
    assert scenario_inputs("t1_t2", present) == ("t1", "t2")
    assert scenario_inputs("complete", ("flair", "t1")) == ("t1", "flair")
    assert scenario_inputs("t1_t2_flair", ("t1", "t2")) is None
    assert scenario_inputs("t1", present, known=("t2",)) is None
    assert scenario_targets(("t1",), present) == ("t2", "flair", "t1ce", "dwi", "adc")
    assert scenario_targets(("t1", "t2"), ("t1", "t2", "adc", "t1ce"), known=("t1", "t2", "t1ce")) == ("t1ce",)
    assert CHAIN_KEYS == ("t1->t2", "t1,t2->flair", "t1,t2,flair->t1ce")
    assert chain_applies(("t1", "t2"), "flair", FULL) and not chain_applies(("t1", "t2"), "flair", ("t1", "t2"))


def test_unet_time_line_sets_the_unets_beside_the_unified_stage():
    line = R.unet_time_line({"t1->t2": 10.2, "t1,t2->flair": 20.0}, 500, 230.6)
    assert line == ("Training time: U-Nets 30 s in all, 500 steps each (T1w → T2w 10 s, T1w, T2w → T2f 20 s); "
                    "the checkpoint's unified stage 231 s (the run's metrics.jsonl).")
    assert R.unet_time_line({"t1->t2": 1.0}, 2, None).endswith("unknown (a model folder, not a training run).")


def test_parse_baselines():
    assert R.parse_baselines("two-stage,copy") == ("copy", "two-stage")
    assert R.parse_baselines("none") == () and R.parse_baselines("") == ()
    with pytest.raises(UserError, match="--baselines.*resvit"):
        R.parse_baselines("copy,resvit")


# --------------------------------------------------------------------------- end to end


def test_outputs_exist(full_run: R.EvalResult):
    out = full_run.out
    for name in ("table1_cases.csv", "table2_cases.csv", "table1.md", "table1.csv", "table2.md", "table2.csv",
                 "tables.md", "qualitative.png", "bars_top1.png", "bars_psnr.png", "eval.json",
                 "recipe.resolved.toml"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".EVAL*")), "temporary folder left behind"
    summary = json.loads((out / "eval.json").read_text())
    assert summary["cases"] == 3 and summary["case_ids"] == ["te0", "te1", "te2"]
    assert summary["cohorts"]["table1"] == {"t1": 2, "t1_t2": 2, "t1_t2_flair": 2, "complete": 3}
    assert summary["cohorts"]["table2"] == {k: 2 for k in CHAIN_KEYS}
    assert summary["ratescore"].startswith("unavailable")
    assert len(summary["seconds"]["per_case"]) == 3 and summary["seconds"]["per_case_mean"] > 0
    assert set(full_run.figures) == {"qualitative", "bars_top1", "bars_psnr"}
    # the U-Nets' training time is recorded and printed beside the unified stage's (a model folder: unknown)
    assert set(summary["seconds"]["unet_fit"]) == set(CHAIN_KEYS)
    assert all(s > 0 for s in summary["seconds"]["unet_fit"].values())
    assert summary["seconds"]["unified_stage"] is None
    assert [ln for ln in full_run.tables["table2"].footer if ln.startswith("Training time: U-Nets")] == [
        R.unet_time_line(summary["seconds"]["unet_fit"], 2, None)]


def test_table1_rows_columns_and_cohorts(full_run: R.EvalResult):
    t1 = full_run.tables["table1"]
    assert list(t1.display.columns) == ["Method", "Scenario", "n", "Top-1 (%)", "Top-1 closed-set (%)", "ROUGE-1",
                                        "RaTE"]
    assert list(zip(t1.summary["method"], t1.summary["scenario"])) == [
        (m, s) for m in (R.METHOD_UND, R.METHOD_UNIFIED) for s in ("t1", "t1_t2", "t1_t2_flair", "complete")]
    assert list(t1.summary["n"]) == [2, 2, 2, 3] * 2
    assert (t1.display["RaTE"] == "unavailable").all()
    assert t1.display["Top-1 closed-set (%)"].str.match(r"^\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]$").all()
    cases = pd.read_csv(full_run.out / "table1_cases.csv")
    uni = cases[cases["method"] == R.METHOD_UNIFIED].set_index(["scenario", "case_id"])
    # the missing modalities the case HAS are imputed, in canonical order; complete imputes nothing
    assert uni.loc[("t1", "te1"), "imputed"] == "t2|flair|t1ce|dwi|adc"
    assert uni.loc[("t1_t2_flair", "te0"), "imputed"] == "t1ce"
    assert pd.isna(uni.loc[("complete", "te2"), "imputed"]) and uni.loc[("complete", "te2"), "inputs"] == "t2|flair"
    und = cases[cases["method"] == R.METHOD_UND]
    assert und["imputed"].isna().all()
    # metrics against the case's own reference and labels
    assert cases["pred_closed"].isin(["glioma", "meningioma", "metastasis", "stroke", "wmh"]).all()
    truth = cases["case_id"].map({"te0": "glioma", "te1": "stroke", "te2": "wmh"})
    assert np.array_equal(cases["top1_closed"].to_numpy(), (cases["pred_closed"] == truth).to_numpy(float))
    row = cases.iloc[0]
    from unibrain_cli.evaluation.metrics import rouge1_f

    imp = "" if pd.isna(row["impression"]) else row["impression"]
    assert row["rouge1"] == pytest.approx(rouge1_f(CASES[row["case_id"]][3], imp))


def test_table1_classes_agrees_with_the_cases(full_run: R.EvalResult):
    """The per-class table is written beside Table 1 and counts what table1_cases.csv holds."""
    t = full_run.tables["table1_classes"]
    assert (full_run.out / "table1_classes.csv").is_file() and t.title in (full_run.out / "tables.md").read_text()
    cases = pd.read_csv(full_run.out / "table1_cases.csv")
    s = t.summary.set_index(["method", "scenario"])
    assert list(s.index) == [(m, sc) for m in (R.METHOD_UND, R.METHOD_UNIFIED)
                             for sc in ("t1", "t1_t2", "t1_t2_flair", "complete")]
    for (m, sc), r in s.iterrows():
        g = cases[(cases["method"] == m) & (cases["scenario"] == sc)]
        assert r["n"] == len(g)
        for c in ("glioma", "stroke", "wmh"):
            part = g[g["diseases"] == c]
            assert r[f"n_{c}"] == len(part)
            if len(part):
                assert r[f"top1_{c}"] == pytest.approx(100 * part["top1_closed"].mean())
            assert r[f"pred_{c}"] == pytest.approx(100 * (g["pred_closed"] == c).mean())
    assert json.loads((full_run.out / "eval.json").read_text())["tables"]["table1_classes"]


def test_table2_rows_and_baselines(full_run: R.EvalResult):
    t2 = full_run.tables["table2"]
    methods = [R.METHOD_UNIFIED, "UniBrain* (2 seeds)", R.METHOD_COPY, R.METHOD_UNET, R.METHOD_TWO_STAGE]
    assert list(dict.fromkeys(t2.summary["method"])) == methods
    assert list(t2.summary["n"]) == [2] * 15
    disp = t2.display.set_index(["Method", "Chain"])["Top-1 (%)"]
    assert (disp.loc[R.METHOD_COPY] == "-").all() and (disp.loc[R.METHOD_UNET] == "-").all()
    assert not (disp.loc[R.METHOD_TWO_STAGE] == "-").any()
    cases = pd.read_csv(full_run.out / "table2_cases.csv")
    # two-stage uses the U-Net's slices: same fidelity, usability measured
    u = cases[cases["method"] == R.METHOD_UNET].set_index(["chain", "case_id"])
    ts = cases[cases["method"] == R.METHOD_TWO_STAGE].set_index(["chain", "case_id"])
    assert np.allclose(u["psnr"], ts["psnr"]) and ts["usability"].notna().all() and u["usability"].isna().all()
    ens = cases[cases["method"] == "UniBrain* (2 seeds)"]
    assert (ens["seeds"] == 2).all() and ens["psnr"].between(0, PSNR_CAP_DB).all()
    assert (cases["ssim_brain"] <= 1).all()


def test_copy_row_matches_the_baseline(full_run: R.EvalResult, slices: Path):
    copy = fit_copy_nearest(slices, "train")
    cases, _ = R.load_cases(slices, "test")
    frame = pd.read_csv(full_run.out / "table2_cases.csv")
    for case in cases:
        if case.case_id == "te2":
            continue
        img = copy.impute(case.images, None, case.input_brain(("t1",)), ("t1",), "t2")
        row = frame[(frame["method"] == R.METHOD_COPY) & (frame["chain"] == "t1->t2") & (frame["case_id"] == case.case_id)]
        assert row["psnr"].item() == pytest.approx(R.image_scores(img, case.image("t2"), case.brain)["psnr"])


def test_truth_imputation_scores_the_cap(ckpt, slices, tmp_path, monkeypatch):
    monkeypatch.setattr(R.ModelEvaluator, "chain_images",
                        lambda self, case, inputs, target, seeds: [case.image(target) for _ in seeds])
    res = R.evaluate(ckpt, slices, tmp_path / "E", scenarios="complete", chain=True, ensemble=2, **FAST)
    frame = pd.read_csv(tmp_path / "E" / "table2_cases.csv")
    assert len(frame) == 12  # 2 methods x 3 chains x 2 cases
    assert np.allclose(frame["psnr"], PSNR_CAP_DB) and np.allclose(frame["psnr_brain"], PSNR_CAP_DB)
    assert np.allclose(frame["ssim"], 1.0) and np.allclose(frame["ssim_brain"], 1.0)
    s = res.tables["table2"].summary
    assert np.allclose(s["psnr_mean"], PSNR_CAP_DB) and np.allclose(s["ssim_lo"], 1.0)


def test_copy_imputation_equals_the_copy_row(ckpt, slices, tmp_path, monkeypatch):
    copy = fit_copy_nearest(slices, "train")
    monkeypatch.setattr(R.ModelEvaluator, "chain_images",
                        lambda self, case, inputs, target, seeds: [copy.impute(case.images, None,
                                                                               case.input_brain(inputs), inputs,
                                                                               target)] * len(seeds))
    res = R.evaluate(ckpt, slices, tmp_path / "E", scenarios="complete", chain=True,
                     **{**FAST, "baselines": "copy"})
    s = res.tables["table2"].summary.set_index(["method", "chain"])
    for col in ("psnr", "ssim", "psnr_brain", "ssim_brain"):
        for suffix in ("mean", "lo", "hi"):
            assert np.allclose(s.loc[R.METHOD_UNIFIED, f"{col}_{suffix}"], s.loc[R.METHOD_COPY, f"{col}_{suffix}"])


def test_empty_cohort_is_marked(ckpt, slices, tmp_path):
    res = R.evaluate(ckpt, slices, tmp_path / "E", split="val", scenarios="t1,t1_t2_flair", chain=False, **FAST)
    t1 = res.tables["table1"]
    rows = t1.display.set_index(["Method", "Scenario"])
    assert (rows.loc[(R.METHOD_UNIFIED, "T1w + T2w + T2f")] == EMPTY).sum() == 4  # the four metric cells
    assert rows.loc[(R.METHOD_UNIFIED, "T1w + T2w + T2f"), "n"] == 0
    assert rows.loc[(R.METHOD_UNIFIED, "T1w only"), "n"] == 1
    assert "empty cohort" in (tmp_path / "E" / "table1.md").read_text()
    assert not (tmp_path / "E" / "table2.md").exists() and not (tmp_path / "E" / "bars_psnr.png").exists()


def test_out_dir_is_refused_unless_force(ckpt, slices, tmp_path):
    out = tmp_path / "E"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty.*--force"):
        R.evaluate(ckpt, slices, out, scenarios="complete", chain=False, **FAST)
    R.evaluate(ckpt, slices, out, scenarios="complete", chain=False, force=True, max_cases=1, **FAST)
    assert (out / "table1.md").is_file() and not (out / "keep.txt").exists()
    assert json.loads((out / "eval.json").read_text())["cases"] == 1


def test_ablation_table(ckpt, slices, tmp_path):
    root = tmp_path / "abl"
    root.mkdir()
    for v in ("A", "B", "C", "full"):
        (root / v).symlink_to(ckpt, target_is_directory=True)
    res = R.evaluate(root, slices, tmp_path / "E", scenarios="t1", chain=True, ablation=True, **FAST)
    t3 = res.tables["table3"]
    assert list(t3.display["Model"]) == ["A", "B", "C", "UniBrain"]
    assert list(t3.display["n (und.)"]) == [2, 2, 2, 2] and list(t3.display["n (gen.)"]) == [0, 2, 2, 2]
    assert t3.display.loc[0, "PSNR (dB)"] == "-"
    # identical weights and seed: B, C and UniBrain reproduce the same numbers
    assert len(set(t3.display.loc[1:, "PSNR (dB)"])) == 1
    assert (tmp_path / "E" / "table3.md").is_file()
    with pytest.raises(UserError, match="lacks C/, full/"):
        (root / "C").unlink()
        (root / "full").unlink()
        R.evaluate(root, slices, tmp_path / "E2", ablation=True, **FAST)


def test_probe_in_eval_json_and_tables(full_run: R.EvalResult, ckpt, slices):
    """The T1 -> T2 conditioning probe runs with the chains: eval.json and the line under Table 2."""
    from unibrain_cli.evaluation.probe import conditioning_probe

    summary = json.loads((full_run.out / "eval.json").read_text())
    probe = summary["probe"]
    assert probe["n"] == 2 and probe["case_ids"] == ["te0", "te1"] and probe["chain"] == "t1->t2"
    for k in ("own", "other", "none", "psnr_own", "psnr_other", "psnr_none", "conditioning_gap_db"):
        assert isinstance(probe[k], float) and np.isfinite(probe[k]), k
    assert probe["conditioning_gap_db"] == pytest.approx(probe["psnr_own"] - probe["psnr_other"], abs=1e-12)
    assert summary["seconds"]["probe"] > 0
    # the same computation as `python -m unibrain_cli.evaluation.probe RUN SLICES`
    alone = conditioning_probe(ckpt, slices, split="test")
    assert {k: pytest.approx(v, rel=1e-5) for k, v in alone.items()} == {k: probe[k] for k in alone}
    line = R.probe_line(probe)
    assert line.startswith("Conditioning probe (T1w → T2w, n=2)") and f"{probe['conditioning_gap_db']:+.2f} dB" in line
    assert line in (full_run.out / "tables.md").read_text() and line in (full_run.out / "table2.md").read_text()
    assert full_run.tables["table2"].footer[0] == line  # then the U-Nets' training time (test_outputs_exist)
    assert len(full_run.tables["table2"].footer) == 2


def test_no_probe_without_chains(ckpt, slices, tmp_path):
    res = R.evaluate(ckpt, slices, tmp_path / "E", scenarios="complete", chain=False, max_cases=1, **FAST)
    assert res.summary["probe"] is None and json.loads((tmp_path / "E" / "eval.json").read_text())["probe"] is None
    assert "Conditioning probe" not in (tmp_path / "E" / "tables.md").read_text()


def ring_case(size: int = S) -> R.EvalCase:
    """T1 only inside a small disc; T2, FLAIR and T1ce also in a ring around it (the target's brain
    extends beyond the inputs'). The stored brain is the union (the larger disc), like the slicer's."""
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    inner, outer = r <= 0.25 * size, r <= 0.45 * size
    rng = np.random.default_rng(1)
    images = np.zeros((6, size, size), np.float32)
    for c, m in enumerate(MODALITIES[:4]):
        images[c] = (0.3 + 0.6 * rng.random((size, size))) * (inner if m == "t1" else outer)
    images[0, size // 2, size // 2] = 0.0  # a normalisation pinhole inside the T1 brain
    return R.EvalCase(slice_id="ring:0", case_id="ring", diseases=("glioma",), present=FULL, images=images,
                      brain=outer, impression="glioma")


def test_input_brain_is_the_inputs_mask():
    case = ring_case()
    inner = case.image("t1") > 0
    inner[S // 2, S // 2] = True  # the hole is filled
    assert np.array_equal(case.input_brain(("t1",)), inner)
    assert np.array_equal(case.input_brain(("t1", "t2")), case.brain)
    assert case.brain.sum() > inner.sum()


def test_no_method_takes_the_targets_extent(ckpt, slices, monkeypatch):
    """Every prediction (UniBrain, ensemble, copy-nearest, U-Net, two-stage, Table-1 imputations) is
    zeroed outside the INPUTS' mask, never given the target's brain extent."""
    import torch

    from unibrain_cli.evaluation.baselines import UNetBaseline, UNetConfig
    from unibrain_cli.inference.checkpoint import load_for_inference

    case = ring_case()
    inner, ring = case.input_brain(("t1",)), case.brain & ~case.input_brain(("t1",))
    scored: list[np.ndarray] = []
    generated: list[np.ndarray] = []
    real_scores, real_chain = R.image_scores, R.impute_chain

    def scores(pred, ref, brain):
        assert brain is case.brain  # the evaluation region stays the reference brain
        scored.append(np.asarray(pred))
        return real_scores(pred, ref, brain)

    def chain(*args, **kwargs):
        res = real_chain(*args, **kwargs)
        generated.extend(v.numpy() for v in res.images.values())
        return res

    monkeypatch.setattr(R, "image_scores", scores)
    monkeypatch.setattr(R, "impute_chain", chain)
    torch.manual_seed(0)
    base = R.Baselines(copy=fit_copy_nearest(slices, "train"), unets={"t1->t2": UNetBaseline(UNetConfig(("t1",), "t2"))},
                       names=("copy", "unet", "two-stage"))
    ev = R.ModelEvaluator(load_for_inference(ckpt), R.Settings(thinking_tokens=0, answer_tokens=0))
    res = R.evaluate_pass(ev, [case], ("t1",), ("t1->t2",), understanding=False, ensemble=2, baselines=base)
    assert [r["method"] for r in res.table2] == [R.METHOD_UNIFIED, "UniBrain* (2 seeds)", R.METHOD_COPY,
                                                 R.METHOD_UNET, R.METHOD_TWO_STAGE]
    assert len(scored) == 5 and len(generated) == 4  # t2, flair, t1ce (Table 1) + the second seed's t2
    for img in scored + generated:
        assert not img[~inner].any() and img[inner].any()
    assert ring.sum() > 100


def test_table1_first_target_is_the_table2_chain_image(ckpt, slices):
    """The memo shortcut: Table 1's first imputed target equals a fresh Table-2 chain imputation."""
    from unibrain_cli.inference.checkpoint import load_for_inference

    cases, _ = R.load_cases(slices, "test")
    case = next(c for c in cases if c.case_id == "te0")
    settings = R.Settings(thinking_tokens=3, answer_tokens=0)
    ev = R.ModelEvaluator(load_for_inference(ckpt), settings)
    ev.unified_row(case, "t1_t2")
    memo = ev.memo[(("t1", "t2"), "flair", 0)]
    fresh = R.ModelEvaluator(load_for_inference(ckpt), settings).chain_images(case, ("t1", "t2"), "flair", [0, 1])
    assert np.allclose(memo, fresh[0], atol=1e-5) and not np.allclose(fresh[0], fresh[1])



def test_chain_memo_never_crosses_cases(ckpt, slices):
    """Imputing another case's chain with the same evaluator gives that case's image, not a memo hit."""
    from unibrain_cli.inference.checkpoint import load_for_inference

    cases, _ = R.load_cases(slices, "test")
    a, b = [c for c in cases if {"t1", "t2"} <= set(c.present)][:2]
    settings = R.Settings(thinking_tokens=0, answer_tokens=0)
    ev = R.ModelEvaluator(load_for_inference(ckpt), settings)
    first = ev.chain_images(a, ("t1",), "t2", [0])[0]
    second = ev.chain_images(b, ("t1",), "t2", [0])[0]
    fresh = R.ModelEvaluator(load_for_inference(ckpt), settings).chain_images(b, ("t1",), "t2", [0])[0]
    assert np.allclose(second, fresh, atol=1e-5) and not np.allclose(first, second)

# --------------------------------------------------------------------------- CLI errors

runner = CliRunner()


def one_line_error(args: list[str], *needles: str) -> str:
    res = runner.invoke(app, ["evaluate", *map(str, args)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_cli_size_mismatch_names_both_sizes(ckpt, tmp_path):
    other = write_slices(tmp_path / "S16", size=16)
    one_line_error(["--ckpt", ckpt, "--data", other, "--out", tmp_path / "E"], "32x32", "16x16", "--size 32")


def test_cli_empty_split(ckpt, slices, tmp_path):
    one_line_error(["--ckpt", ckpt, "--data", slices, "--split", "unsplit", "--out", tmp_path / "E"],
                   "--split", "'unsplit'", "test", "train", "val")


def test_cli_unknown_scenario(ckpt, slices, tmp_path):
    one_line_error(["--ckpt", ckpt, "--data", slices, "--scenario", "t2_only", "--out", tmp_path / "E"],
                   "--scenario", "t2_only", "t1, t1_t2, t1_t2_flair, complete")


def test_cli_not_a_checkpoint(slices, tmp_path):
    (tmp_path / "junk").mkdir()
    one_line_error(["--ckpt", tmp_path / "junk", "--data", slices, "--out", tmp_path / "E"],
                   "not a UniBrain checkpoint", "junk")


def test_cli_runs_and_prints_tables(ckpt, slices, tmp_path):
    res = runner.invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--scenario", "t1",
                              "--max-cases", "1", "--thinking-tokens", "2", "--answer-tokens", "4",
                              "--baselines", "none", "--out", str(tmp_path / "E")])
    assert res.exit_code == 0, res.output
    assert "Table 1" in res.output and "bars_top1" in res.output and "s per case" in res.output


def test_cli_steps_reach_the_sampler(ckpt, slices, tmp_path):
    psnr = {}
    for steps in ("1", "2"):
        out = tmp_path / f"E{steps}"
        res = runner.invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--scenario", "t1",
                                  "--thinking-tokens", "0", "--answer-tokens", "0", "--chain",
                                  "--baselines", "none", "--steps", steps, "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "eval.json").read_text())["sample_steps"] == int(steps)
        psnr[steps] = pd.read_csv(out / "table2_cases.csv")["psnr"].to_numpy(dtype=float)
        assert "Conditioning probe" in res.output  # the line under Table 2 in the terminal
    assert psnr["1"].size > 0 and psnr["1"].shape == psnr["2"].shape and not np.allclose(psnr["1"], psnr["2"])


def test_image_guidance_scale_is_applied_recorded_and_checked(ckpt, slices, tmp_path):
    """--cfg-img-scale replaces the recipe's image guidance: eval.json records it and the chain images change
    (the image-free context is queried); a negative scale is a one-line error naming the flag."""
    kw = dict(scenarios="t1", chain=True, **FAST)
    off = R.evaluate(ckpt, slices, tmp_path / "A", **kw)
    on = R.evaluate(ckpt, slices, tmp_path / "B", cfg_img_scale=2.0, **kw)
    assert off.summary["cfg_img_scale"] == 1.0 and on.summary["cfg_img_scale"] == 2.0
    a = pd.read_csv(tmp_path / "A" / "table2_cases.csv")
    b = pd.read_csv(tmp_path / "B" / "table2_cases.csv")
    assert not np.allclose(a["psnr"].to_numpy(), b["psnr"].to_numpy())
    one_line_error(["--ckpt", ckpt, "--data", slices, "--cfg-img-scale", "-1", "--out", tmp_path / "C"],
                   "--cfg-img-scale")


def test_thinking_plan_is_applied_recorded_and_checked(ckpt, slices, tmp_path):
    """--thinking-plan replaces the recipe's flow.thinking_plan: eval.json and the tables' note record it, the
    forced plan changes the thinking and so the chain images; an unknown plan is a one-line error."""
    kw = dict(scenarios="t1", chain=True, **{**FAST, "thinking_tokens": 4})
    gen = R.evaluate(ckpt, slices, tmp_path / "A", **kw)
    forced = R.evaluate(ckpt, slices, tmp_path / "B", thinking_plan="forced", **kw)
    assert gen.summary["thinking_plan"] == "generated" and forced.summary["thinking_plan"] == "forced"
    assert any("flow.thinking_plan = forced" in n for n in forced.tables["table2"].notes)
    assert any("flow.thinking_plan = generated" in n for n in gen.tables["table2"].notes)
    a = pd.read_csv(tmp_path / "A" / "table2_cases.csv")["psnr"].to_numpy(dtype=float)
    b = pd.read_csv(tmp_path / "B" / "table2_cases.csv")["psnr"].to_numpy(dtype=float)
    assert a.size > 0 and not np.allclose(a, b)
    one_line_error(["--ckpt", ckpt, "--data", slices, "--thinking-plan", "copied", "--out", tmp_path / "C"],
                   "--thinking-plan")


def test_batched_pass_equals_one_by_one(ckpt, slices, monkeypatch):
    """`--batch-size`: the rows of a pass computed 2 slices at a time (ragged last batch, cases
    outside some cohorts, a 2-seed ensemble) equal the one-by-one rows: the same answers, closed-set
    classes and imputed-slice scores; and the batched pass never falls back to one-by-one chains."""
    from unibrain_cli.inference.checkpoint import load_for_inference

    cases = R.load_cases(slices, "test")[0] + R.load_cases(slices, "train")[0][:2]
    assert len(cases) % 2 != 0

    def run(batch_size: int) -> R.PassResult:
        settings = R.Settings(thinking_tokens=3, answer_tokens=6, batch_size=batch_size)
        ev = R.ModelEvaluator(load_for_inference(ckpt), settings)
        return R.evaluate_pass(ev, cases, parse_scenarios("all"), CHAIN_KEYS, ensemble=2)

    one = run(1)
    calls = []
    real = R.impute_chain
    monkeypatch.setattr(R, "impute_chain", lambda *a, **k: calls.append(1) or real(*a, **k))
    many = run(2)
    assert calls == []
    assert len(one.table1) == len(many.table1) > 10 and len(one.table2) == len(many.table2) > 5
    for a, b in zip(one.table1, many.table1, strict=True):
        for key in a:
            if key == "seconds":
                continue
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), key
            else:
                assert a[key] == b[key], key
    for a, b in zip(one.table2, many.table2, strict=True):
        assert (a["method"], a["chain"], a["slice_id"]) == (b["method"], b["chain"], b["slice_id"])
        for key in ("psnr", "ssim", "psnr_brain", "usability"):
            assert a[key] == pytest.approx(b[key], abs=1e-3, nan_ok=True), key
