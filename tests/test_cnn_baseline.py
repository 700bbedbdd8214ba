"""`unibrain evaluate --baselines cnn`: the supervised CNN reference (evaluation/classifier.py) as Table-1 rows.

The tiny random checkpoint and slice maker of test_evaluate.py, on a slices folder of its own: three
training classes whose slices differ in brightness (so a few CNN steps learn something), and test
cases outside the T1 cohort, with two classes and without a label.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from slices_helpers import save_slices_folder
from test_evaluate import FULL, S, make_slice, one_line_error, runner

from unibrain_cli.cli.app import app
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation import runner as R
from unibrain_cli.evaluation import tables
from unibrain_cli.evaluation.classifier import train_classifier
from unibrain_cli.evaluation.scenarios import scenario_inputs
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.released.evaluate import evaluate_released

CNN_STEPS = 25
SCENARIOS = ("t1", "complete")
#: case -> (split, modalities, diseases ("|"-joined, "" = no label))
CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
    **{f"tr{i}": ("train", FULL, ("glioma", "stroke", "metastasis")[i % 3]) for i in range(9)},
    "tr9": ("train", ("t1", "t2"), "glioma|stroke"),  # two classes: not a training label
    "te0": ("test", FULL, "glioma"),
    "te1": ("test", (*FULL, "dwi", "adc"), "stroke"),
    "te2": ("test", ("t2", "flair"), "wmh"),  # no T1: in the complete cohort only
    "te3": ("test", FULL, "metastasis|stroke"),  # two classes: either is a hit
    "te4": ("test", ("t1",), ""),  # no label: in the cohorts, not in Top-1
    "te5": ("test", ("t1", "t2"), "metastasis"),
}
BRIGHTNESS = {"glioma": 1.0, "metastasis": 0.8, "stroke": 0.6}
KW = {"scenarios": ",".join(SCENARIOS), "chain": True, "thinking_tokens": 3, "answer_tokens": 6}


def write_cnn_slices(root: Path, seed: int = 0) -> Path:
    """Two slices per case (k = 1 the eval slice), scaled by the first class's brightness."""
    rng = np.random.default_rng(seed)
    rows, slices = [], []
    for case, (split, mods, diseases) in CASES.items():
        for k in range(2):
            sl = make_slice(rng, mods, S)
            sl["images"] = sl["images"] * BRIGHTNESS.get(diseases.split("|")[0], 0.9)
            slices.append(sl)
            rows.append({"slice_id": f"{case}:{k}", "case_id": case, "subset": "synthetic", "split": split,
                         "diseases": diseases, "slice_k": k, "is_eval": k == 1, "shard": "", "row": 0,
                         "modalities": "|".join(m for m in MODALITIES if m in mods), "lesion_area_px": 10,
                         "impression": "a lesion"})
    return save_slices_folder(root, rows, slices, S, shard_rows=len(slices))


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    return write_cnn_slices(tmp_path_factory.mktemp("slices") / "SLICES")


@pytest.fixture(scope="module")
def cnn_run(ckpt, slices, tmp_path_factory) -> R.EvalResult:
    return R.evaluate(ckpt, slices, tmp_path_factory.mktemp("eval") / "CNN", baselines="copy,cnn",
                      cnn_steps=CNN_STEPS, **KW)


@pytest.fixture(scope="module")
def default_run(ckpt, slices, tmp_path_factory) -> R.EvalResult:
    return R.evaluate(ckpt, slices, tmp_path_factory.mktemp("eval") / "DEFAULT", **KW)


def test_parse_baselines_accepts_cnn():
    assert R.BASELINES == ("copy", "unet", "two-stage", "cnn")
    assert R.parse_baselines("cnn,copy") == ("copy", "cnn")
    assert R.parse_baselines(["CNN", "two-stage", "unet"]) == ("unet", "two-stage", "cnn")
    with pytest.raises(UserError, match="--baselines.*unknown baseline 'resnet'.*two-stage, cnn"):
        R.parse_baselines("cnn,resnet")


def test_cnn_rows_match_a_retrained_classifier(cnn_run, slices):
    """Per scenario: the CNN rows are UniBrain's cohort (same n), their class is what a classifier
    trained again with the same seed and steps predicts, top1 = top1_closed = the hit (NaN without a
    label), and the table's Top-1 is the mean of those hits."""
    frame = pd.read_csv(cnn_run.out / "table1_cases.csv")
    cnn = frame[frame["method"] == R.METHOD_CNN]
    summary = cnn_run.tables["table1"].summary.set_index(["method", "scenario"])
    cases, _ = R.load_cases(slices, "test")
    predicted = set()
    for sc in SCENARIOS:
        rows = cnn[cnn["scenario"] == sc].set_index("slice_id")
        uni = frame[(frame["method"] == R.METHOD_UNIFIED) & (frame["scenario"] == sc)]
        assert list(rows.index) == list(uni["slice_id"])
        assert summary.loc[(R.METHOD_CNN, sc), "n"] == summary.loc[(R.METHOD_UNIFIED, sc), "n"] == len(rows)
        cohort = [c for c in cases if scenario_inputs(sc, c.present) is not None]
        model = train_classifier(slices, sc, steps=CNN_STEPS, seed=0)
        present = np.array([[m in c.present for m in MODALITIES] for c in cohort])
        preds = model.predict(np.stack([c.images for c in cohort]), present)
        hits = [math.nan if not c.diseases else float(p in c.diseases) for c, p in zip(cohort, preds, strict=True)]
        assert list(rows.loc[[c.slice_id for c in cohort], "pred_closed"]) == preds
        assert rows["pred_text"].tolist() == rows["pred_closed"].tolist()
        got = rows.loc[[c.slice_id for c in cohort], ["top1", "top1_closed"]].to_numpy()
        np.testing.assert_array_equal(got, np.array([hits, hits]).T)
        assert rows["rouge1"].isna().all() and rows["rate"].isna().all()
        row = summary.loc[(R.METHOD_CNN, sc)]
        assert row["top1_mean"] == pytest.approx(100 * np.nanmean(hits))
        assert row["top1_closed_mean"] == row["top1_mean"] and row["top1_n"] == sum(np.isfinite(hits))
        predicted |= set(preds)
    assert len(predicted) > 1  # the golden check compares more than one class
    by_scenario = cnn.groupby("scenario")["slice_id"].agg(set)
    assert "te2:1" in by_scenario["complete"] and "te2:1" not in by_scenario["t1"]  # no T1


def test_cnn_table_rows_note_and_eval_json(cnn_run):
    t = cnn_run.tables["table1"]
    assert list(t.summary["method"]) == [m for m in (R.METHOD_UND, R.METHOD_UNIFIED, R.METHOD_CNN) for _ in SCENARIOS]
    shown = t.display[t.display["Method"] == R.METHOD_CNN]
    assert (shown["ROUGE-1"] == tables.NOT_RUN).all() and (shown["RaTE"] == tables.NOT_RUN).all()
    assert (shown["Top-1 (%)"] == shown[R.TOP1_CLOSED.label]).all()
    note = (f"CNN reference: a supervised 97k-parameter CNN per scenario ({CNN_STEPS} steps of 32 train-split "
            "slices, evaluation/classifier.py)")
    assert note in (cnn_run.out / "table1.md").read_text()
    summary = json.loads((cnn_run.out / "eval.json").read_text())
    assert summary["cnn_steps"] == CNN_STEPS and summary["baselines"] == ["copy", "cnn"]
    assert summary["unet_steps"] is None
    table2 = pd.read_csv(cnn_run.out / "table2_cases.csv")
    assert R.METHOD_COPY in set(table2["method"]) and R.METHOD_CNN not in set(table2["method"])


def test_default_tables_are_unchanged(cnn_run, default_run):
    """Without cnn: no CNN rows, no note, cnn_steps None; the other rows are those of the cnn run."""
    md = (default_run.out / "tables.md").read_text()
    assert R.METHOD_CNN not in md and "97k" not in md
    assert json.loads((default_run.out / "eval.json").read_text())["cnn_steps"] is None
    base = pd.read_csv(default_run.out / "table1.csv")
    with_cnn = pd.read_csv(cnn_run.out / "table1.csv")
    pd.testing.assert_frame_equal(base, with_cnn[with_cnn["method"] != R.METHOD_CNN].reset_index(drop=True))
    assert (default_run.out / "table2.csv").read_bytes() == (cnn_run.out / "table2.csv").read_bytes()


def test_cli_cnn_with_all_slices(ckpt, slices, tmp_path):
    """--cnn-steps reaches the runner; --eval-slices all: a CNN row per slice, the table per case."""
    out = tmp_path / "E"
    res = runner.invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--scenario", "t1",
                              "--max-cases", "2", "--eval-slices", "all", "--thinking-tokens", "0",
                              "--answer-tokens", "2", "--baselines", "cnn", "--cnn-steps", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "eval.json").read_text())["cnn_steps"] == 3
    frame = pd.read_csv(out / "table1_cases.csv")
    cnn = frame[frame["method"] == R.METHOD_CNN]
    uni = frame[frame["method"] == R.METHOD_UNIFIED]
    assert list(cnn["slice_id"]) == list(uni["slice_id"]) and len(cnn) == 2 * cnn["case_id"].nunique()
    row = pd.read_csv(out / "table1.csv").set_index("method").loc[R.METHOD_CNN]
    assert row["n"] == cnn["case_id"].nunique()
    assert row["top1_mean"] == pytest.approx(100 * cnn.groupby("case_id")["top1"].mean().mean())


def test_cnn_is_refused_where_it_cannot_apply(ckpt, slices, tmp_path):
    with pytest.raises(UserError, match="--baselines.*'cnn'.*--protocol native"):
        evaluate_released(None, None, slices, tmp_path / "R", baselines="copy,cnn")
    assert not (tmp_path / "R").exists()
    one_line_error(["--ckpt", ckpt, "--data", slices, "--baselines", "cnn", "--cnn-steps", "0",
                    "--out", tmp_path / "E"], "--cnn-steps")
    with pytest.raises(UserError, match="--cnn-steps.*>= 1"):
        R.fit_baselines(slices, ("cnn",), (), 1, 0, "cpu", False, SCENARIOS, cnn_steps=0)
