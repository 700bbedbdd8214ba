"""`unibrain evaluate --eval-slices all`: every stored slice of a case scored, the tables per case.

The per-case aggregation (:func:`~unibrain_cli.evaluation.tables.per_case_mean`) on golden frames,
its identity on one-row-per-case frames (the default ``eval`` stays bit-identical), the runner end
to end on the tiny fixtures of test_evaluate.py, and the impossible combinations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluate import FAST, one_line_error, runner
from test_evaluate import write_slices as write_eval_slices

from unibrain_cli.cli.app import app
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation import runner as R
from unibrain_cli.evaluation import tables
from unibrain_cli.evaluation.stats import bootstrap_ci
from unibrain_cli.evaluation.tables import TABLE1_METRICS, per_case_mean, summarize


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """test split: te0, te1, te2 with two stored slices each (k=1 the eval slice)."""
    return write_eval_slices(tmp_path_factory.mktemp("slices") / "SLICES")


# --------------------------------------------------------------------------- per-case aggregation


def test_per_case_mean_golden():
    """2 cases x 3 slices: each case's value is the mean of its slices; the estimate equals the one
    on the 2 case means (the bootstrap resamples 2 cases), n = 2."""
    rows = []
    for case, top1, rouge in (("a", (1.0, 0.0, 1.0), (0.3, 0.6, 0.9)), ("b", (0.0, 0.0, 1.0), (0.2, 0.2, 0.5))):
        for k in range(3):
            rows.append({"method": "UniBrain", "scenario": "t1", "case_id": case, "slice_id": f"{case}:{k}",
                         "top1": top1[k], "rouge1": rouge[k], "rate": np.nan})
    frame = pd.DataFrame(rows)
    agg = per_case_mean(frame, ("method", "scenario"))
    assert list(agg["case_id"]) == ["a", "b"] and list(agg["slice_id"]) == ["a:0", "b:0"]
    assert agg["top1"].tolist() == pytest.approx([2 / 3, 1 / 3]) and agg["rouge1"].tolist() == pytest.approx([0.6, 0.3])
    assert agg["rate"].isna().all()  # no finite slice value: NaN, later "unavailable"
    means = pd.DataFrame({"method": "UniBrain", "scenario": "t1", "case_id": ["a", "b"],
                          "top1": [2 / 3, 1 / 3], "rouge1": [0.6, 0.3], "rate": np.nan})
    got = summarize(agg, ("method", "scenario"), TABLE1_METRICS, n_boot=200, seed=3)
    want = summarize(means, ("method", "scenario"), TABLE1_METRICS, n_boot=200, seed=3)
    cols = [f"{m}_{s}" for m in ("top1", "rouge1") for s in ("mean", "lo", "hi", "n")]
    assert got[cols].to_numpy() == pytest.approx(want[cols].to_numpy())
    assert got["n"].item() == 2 and got["top1_n"].item() == 2 and got["rate_n"].item() == 0
    assert got["top1_mean"].item() == pytest.approx(50.0) and got["rouge1_mean"].item() == pytest.approx(45.0)
    mean, lo, hi = bootstrap_ci([200 / 3, 100 / 3], n=200, seed=3)
    assert (got["top1_lo"].item(), got["top1_hi"].item()) == pytest.approx((lo, hi))
    # a slice without a finite value does not count; groups keep their keys apart
    frame.loc[1, "rouge1"] = np.nan
    other = frame.assign(method="UniBrain Und.", top1=0.0)
    agg = per_case_mean(pd.concat([frame, other], ignore_index=True), ("method", "scenario"))
    assert len(agg) == 4 and agg["rouge1"].iloc[0] == pytest.approx(0.6) and agg["top1"].iloc[2:].eq(0).all()
    # without the aggregation the table refuses several rows per case
    with pytest.raises(ValueError, match="more than one row"):
        tables.table1(frame, n_boot=10)


def test_per_case_mean_is_the_identity_with_one_row_per_case():
    """One row per case (``--eval-slices eval``): every column bit-identical, order kept, so the tables
    of the default mode do not change."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "method": ["UniBrain"] * 4 + ["UniBrain Und."] * 4, "chain": ["t1->t2", "t1->t2", "t1,t2->flair", "t1->t2"] * 2,
        "case_id": ["c1", "c2", "c1", "c3"] * 2, "slice_id": ["c1:1", "c2:1", "c1:1", "c3:1"] * 2,
        "psnr": rng.normal(25, 3, 8), "ssim": rng.random(8), "psnr_brain": [np.nan, 1 / 3, 0.1, 0.2] * 2,
        "usability": [1.0, 0.0, np.nan, 1.0] * 2, "seeds": [1] * 8, "text": ["x", None, "y", "z"] * 2,
    })
    out = per_case_mean(frame, ("method", "chain"))
    pd.testing.assert_frame_equal(out, frame, check_exact=True)
    a = tables.table2(out, n_boot=100, seed=1).summary
    b = tables.table2(frame, n_boot=100, seed=1).summary
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert per_case_mean(frame.iloc[:0], ("method", "chain")).empty


# --------------------------------------------------------------------------- cases


def test_load_cases_all_slices(slices):
    """all: every stored slice of the (sampled) cases, index order, one is_eval slice per case; the
    sampled cases are those of the default mode."""
    one, _ = R.load_cases(slices, "test")
    every, _ = R.load_cases(slices, "test", eval_slices="all")
    assert all(c.is_eval for c in one) and [c.slice_id for c in one] == ["te0:1", "te1:1", "te2:1"]
    assert [c.slice_id for c in every] == ["te0:0", "te0:1", "te1:0", "te1:1", "te2:0", "te2:1"]
    assert [c.slice_id for c in every if c.is_eval] == [c.slice_id for c in one]
    assert [c.slice_id for c in R.one_per_case(every)] == [c.slice_id for c in one]
    sub, _ = R.load_cases(slices, "test", max_cases=2, seed=1)
    sub_all, _ = R.load_cases(slices, "test", max_cases=2, seed=1, eval_slices="all")
    assert len(sub_all) == 4 and [c.case_id for c in sub_all[::2]] == [c.case_id for c in sub]
    with pytest.raises(UserError, match="--eval-slices.*paper convention"):
        R.load_cases(slices, "test", convention="paper", eval_slices="all")
    with pytest.raises(UserError, match="--eval-slices.*released protocol"):
        R.check_eval_slices("all", None, "released")
    with pytest.raises(UserError, match="--eval-slices.*unknown value 'some'.*eval, all"):
        R.check_eval_slices("some")


# --------------------------------------------------------------------------- end to end


def test_eval_mode_tables_are_unchanged(ckpt, slices, tmp_path, monkeypatch):
    """The default mode writes byte-identical tables with and without the per-case aggregation."""
    kw = dict(scenarios="t1,complete", chain=True, max_cases=2, **FAST)
    R.evaluate(ckpt, slices, tmp_path / "A", **kw)
    monkeypatch.setattr(tables, "per_case_mean", lambda frame, keys: frame)
    R.evaluate(ckpt, slices, tmp_path / "B", **kw)
    for name in ("table1.csv", "table1.md", "table2.csv", "table2.md", "table1_cases.csv"):
        a, b = (tmp_path / d / name for d in "AB")
        if name == "table1_cases.csv":  # the seconds column differs between runs
            pd.testing.assert_frame_equal(pd.read_csv(a).drop(columns="seconds"),
                                          pd.read_csv(b).drop(columns="seconds"))
        else:
            assert a.read_bytes() == b.read_bytes(), name
    summary = json.loads((tmp_path / "A" / "eval.json").read_text())
    assert summary["eval_slices"] == "eval" and summary["slices"] == summary["cases"] == 2
    assert "Slices:" not in (tmp_path / "A" / "tables.md").read_text()


def test_all_slices_end_to_end(ckpt, slices, tmp_path, monkeypatch):
    """all: one row per slice in the per-case CSVs, tables per case (n = cases, the value the mean of
    the case's slice means), eval.json and the notes record it; the probe and the qualitative figure
    keep one slice per case, the eval one."""
    evals = {c.case_id: c for c in R.load_cases(slices, "test", max_cases=2, seed=0)[0]}
    cases = list(evals)
    assert cases == ["te1", "te2"]  # te2 has no T1: one case for the probe
    grid = []
    real_grid = R.figures.qualitative_grid
    monkeypatch.setattr(R.figures, "qualitative_grid", lambda rows, *a, **k: grid.extend(rows) or real_grid(rows, *a, **k))
    res = R.evaluate(ckpt, slices, tmp_path / "E", scenarios="t1,complete", chain=True, max_cases=2,
                     eval_slices="all", **FAST)
    summary = json.loads((tmp_path / "E" / "eval.json").read_text())
    assert summary["eval_slices"] == "all" and summary["slices"] == 4
    assert summary["cases"] == 2 and summary["case_ids"] == cases and len(summary["seconds"]["per_case"]) == 2
    assert summary["convention"]["slice"].startswith("every stored slice")
    t1 = pd.read_csv(tmp_path / "E" / "table1_cases.csv")
    uni = t1[(t1["method"] == R.METHOD_UNIFIED) & (t1["scenario"] == "complete")]
    assert list(uni["slice_id"]) == [f"{c}:{k}" for c in cases for k in (0, 1)]
    assert list(uni["case_id"]) == [c for c in cases for _ in (0, 1)]
    s1 = res.tables["table1"].summary.set_index(["method", "scenario"])
    assert s1.loc[(R.METHOD_UNIFIED, "complete"), "n"] == 2
    assert summary["cohorts"]["table1"]["complete"] == 2
    want = 100 * uni.groupby("case_id")["top1_closed"].mean().mean()
    assert s1.loc[(R.METHOD_UNIFIED, "complete"), "top1_closed_mean"] == pytest.approx(want)
    t2 = pd.read_csv(tmp_path / "E" / "table2_cases.csv")
    rows = t2[(t2["method"] == R.METHOD_UNIFIED) & (t2["chain"] == "t1->t2")]
    s2 = res.tables["table2"].summary.set_index(["method", "chain"])
    assert len(rows) == 2 * s2.loc[(R.METHOD_UNIFIED, "t1->t2"), "n"]
    assert s2.loc[(R.METHOD_UNIFIED, "t1->t2"), "psnr_mean"] == pytest.approx(
        rows.groupby("case_id")["psnr"].mean().mean())
    line = "Slices: every stored slice of a case (4 slices of 2 cases); each case's score is the mean over its slices"
    for name in ("table1.md", "table2.md"):
        assert line in (tmp_path / "E" / name).read_text(), name
    assert summary["probe"] is None  # one case with T1 and T2 (te1): its two slices would have made a probe
    assert grid and "qualitative" in res.figures
    for row in grid:
        case = evals[row.label.split("\n", 1)[0]]
        assert np.array_equal(row.truth, case.image(row.target))  # the eval slice, no other slice
    assert len(grid) == len({r.label for r in grid})


# --------------------------------------------------------------------------- CLI


def test_cli_all_slices_runs(ckpt, slices, tmp_path):
    res = runner.invoke(app, ["evaluate", "--ckpt", str(ckpt), "--data", str(slices), "--scenario", "complete",
                              "--max-cases", "1", "--eval-slices", "ALL", "--thinking-tokens", "0",
                              "--answer-tokens", "2", "--baselines", "none", "--out", str(tmp_path / "E")])
    assert res.exit_code == 0, res.output
    assert "evaluated 1 case(s) (2 slices)" in res.output and "Slices: every stored slice" in res.output
    assert json.loads((tmp_path / "E" / "eval.json").read_text())["slices"] == 2


def test_cli_all_slices_with_paper_convention_is_one_line(ckpt, slices, tmp_path):
    out = tmp_path / "E"
    one_line_error(["--ckpt", ckpt, "--data", slices, "--convention", "paper", "--eval-slices", "all",
                    "--out", out], "--eval-slices", "paper")
    assert not out.exists() and not list(tmp_path.glob(".E*"))
    one_line_error(["--ckpt", ckpt, "--data", slices, "--eval-slices", "every", "--out", out],
                   "--eval-slices", "'every'")
    assert not out.exists()
