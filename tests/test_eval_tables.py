"""Bootstrap CIs, paper-shaped tables (CSV + markdown) and figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unibrain_cli.evaluation.figures import QualitativeRow, metric_bars, qualitative_grid
from unibrain_cli.evaluation.stats import bootstrap_ci, estimate
from unibrain_cli.evaluation.tables import (
    EMPTY,
    UNAVAILABLE,
    chain_label,
    closed_set_by_class,
    scenario_label,
    table1,
    table2,
    table3,
    write_tables,
)


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    x = np.random.default_rng(0).random(200)
    mean, lo, hi = bootstrap_ci(x, n=500, seed=3)
    assert mean == pytest.approx(x.mean()) and lo < mean < hi
    assert bootstrap_ci(x, n=500, seed=3) == (mean, lo, hi)
    assert bootstrap_ci(x, n=500, seed=4) != (mean, lo, hi)
    # width shrinks like 1/sqrt(n): compare with the normal approximation
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    # a constant cohort has a zero-width interval; blockwise draws match one block
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="empty cohort"):
        bootstrap_ci([])
    assert estimate([np.nan, 1.0, 3.0], n_boot=50).n == 2
    assert estimate([np.nan]) is None


def _table1_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, p in (("UniBrain", 0.8), ("copy-nearest + UniBrain", 0.6)):
        for scenario in ("t1", "t1_t2"):
            for c in range(30):
                rows.append({"method": method, "scenario": scenario, "case_id": f"c{c}",
                             "top1": float(rng.random() < p), "rouge1": rng.uniform(0.3, 0.45),
                             "rate": np.nan})
    return pd.DataFrame(rows)


def test_table1_rows_ci_and_unavailable(tmp_path: Path) -> None:
    frame = _table1_frame()
    t = table1(frame, scenarios=["t1", "t1_t2", "complete"], n_boot=200,
               notes=["RaTE unavailable: no RaTEScore models directory given"])
    assert len(t.summary) == 6
    uni = t.summary.query("method == 'UniBrain' and scenario == 't1'").iloc[0]
    expected = 100 * frame.query("method == 'UniBrain' and scenario == 't1'")["top1"].mean()
    assert uni["top1_mean"] == pytest.approx(expected) and uni["top1_lo"] <= expected <= uni["top1_hi"]
    assert uni["n"] == 30 and uni["rate_n"] == 0
    md = t.markdown()
    assert "| UniBrain | T1w only | 30 |" in md
    assert "| copy-nearest + UniBrain | T1w + T2w | 30 |" in md
    assert UNAVAILABLE in md and "RaTE unavailable" in md
    # the requested but missing scenario is an empty cohort, not 0 %
    empty = t.display.query("Scenario == 'Complete Data'")
    assert (empty["n"] == 0).all() and (empty["Top-1 (%)"] == EMPTY).all()
    assert "| 0.00 [" not in md
    csv, mdp = t.write(tmp_path)
    back = pd.read_csv(csv)
    assert list(back["status"].fillna("")) == ["", "", EMPTY, "", "", EMPTY]
    assert mdp.read_text(encoding="utf-8") == md
    with pytest.raises(ValueError, match="one row per case"):
        table1(pd.concat([frame, frame.iloc[:1]]))


def test_table1_partial_values_report_their_n() -> None:
    frame = _table1_frame().query("method == 'UniBrain' and scenario == 't1'").copy()
    frame.loc[frame.index[:10], "rate"] = 0.6
    cell = table1(frame, n_boot=50).display["RaTE"].iloc[0]
    assert cell.startswith("60.00 [60.00, 60.00]") and cell.endswith("(n=10)")


def _table2_frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for method in ("copy-nearest", "unet"):
        for chain in ("t1->t2", "t1,t2->flair", "t1,t2,flair->t1ce"):
            for c in range(12):
                rows.append({"method": method, "chain": chain, "case_id": f"c{c}", "psnr": rng.uniform(18, 24),
                             "ssim": rng.uniform(0.7, 0.9), "psnr_brain": rng.uniform(15, 20),
                             "ssim_brain": rng.uniform(0.5, 0.8)})
    return pd.DataFrame(rows)


def test_table2_and_labels(tmp_path: Path) -> None:
    t = table2(_table2_frame(), n_boot=100)
    assert chain_label("t1,t2,flair->t1ce") == "T1w, T2w, T2f → T1c" and scenario_label("t1_t2") == "T1w + T2w"
    md = t.markdown()
    assert "| unet | T1w → T2w | 12 |" in md and "| copy-nearest | T1w, T2w → T2f | 12 |" in md
    # usability was not measured: unavailable, never a number
    assert (t.display["Top-1 (%)"] == UNAVAILABLE).all()
    psnr_cell = t.display["PSNR (dB)"].iloc[0]
    assert psnr_cell.count(".") == 3 and "[" in psnr_cell
    assert t.display["SSIM"].iloc[0].split(" ")[0].count("0.") == 1
    assert len(t.display["SSIM"].iloc[0].split(" ")[0].split(".")[1]) == 4


def test_table3_ablation(tmp_path: Path) -> None:
    und = _table1_frame().query("method == 'UniBrain'").copy()
    und_a = und.assign(method="A")
    gen = _table2_frame().query("method == 'unet'").assign(method="UniBrain")
    gen["usability"] = 1.0
    components = {"A": (False, False, False), "UniBrain": (True, True, True)}
    t = table3(pd.concat([und_a, und]), gen, components, n_boot=100)
    row_a = t.display.iloc[0]
    assert row_a["Model"] == "A" and row_a["Unified"] == "" and row_a["PSNR (dB)"] == "-"
    row_u = t.display.iloc[1]
    assert row_u["DHS"] == "✓" and row_u["Top-1 (%)"].startswith("100.00") and row_u["n (gen.)"] == 12
    assert row_u["RaTEScore"] == UNAVAILABLE
    assert list(t.summary.columns[:4]) == ["method", "unified", "sa", "dhs"]
    paths = write_tables([t, table1(_table1_frame(), n_boot=20)], tmp_path)
    assert {p.name for p in paths} == {"table3.csv", "table3.md", "table1.csv", "table1.md", "tables.md"}
    assert "Table 3. Ablation" in (tmp_path / "tables.md").read_text(encoding="utf-8")


def test_closed_set_by_class_golden() -> None:
    """Per-class Top-1 and predicted shares per case: a case's slices weigh one case together, cases
    with no or two labels and rows without a prediction are left out, and order follows the arguments."""
    rows = [  # method, scenario, case, labels, predictions of its slices
        ("M", "t1", "a", "glioma", ["glioma"]),
        ("M", "t1", "b", "glioma", ["metastasis"]),
        ("M", "t1", "c", "metastasis", ["metastasis", "metastasis", "glioma", "metastasis"]),
        ("M", "t1", "d", "glioma|wmh", ["glioma"]),  # two labels: left out
        ("M", "t1", "e", "", ["wmh"]),  # no label: left out
        ("M", "complete", "a", "glioma", ["glioma"]),
        ("N", "t1", "a", "glioma", [""]),  # predicted nothing: left out
    ]
    frame = pd.DataFrame([
        {"method": m, "scenario": sc, "case_id": c, "slice_id": f"{c}{k}", "diseases": lab, "pred_closed": p,
         "top1_closed": float(p == lab) if lab and "|" not in lab else np.nan}
        for m, sc, c, lab, preds in rows for k, p in enumerate(preds)])
    classes = ("glioma", "metastasis", "wmh")
    t = closed_set_by_class(frame, classes, methods=["N", "M"], scenarios=["t1", "complete"])
    s = t.summary
    assert list(zip(s["method"], s["scenario"])) == [("M", "t1"), ("M", "complete")]
    r = s.iloc[0]
    assert r["n"] == 3 and r["n_glioma"] == 2 and r["n_metastasis"] == 1 and r["n_wmh"] == 0
    assert r["top1_glioma"] == pytest.approx(50.0) and r["top1_metastasis"] == pytest.approx(75.0)
    assert np.isnan(r["top1_wmh"])
    # a: glioma, b: metastasis, c: 3/4 metastasis + 1/4 glioma -> glioma 1.25 / 3, metastasis 1.75 / 3
    assert r["pred_glioma"] == pytest.approx(100 * 1.25 / 3) and r["pred_metastasis"] == pytest.approx(100 * 1.75 / 3)
    assert r["pred_wmh"] == 0.0
    assert r["most_predicted"] == "metastasis" and r["most_predicted_pct"] == pytest.approx(100 * 1.75 / 3)
    assert list(t.display.columns) == ["Method", "Scenario", "n", "glioma", "metastasis", "wmh", "Predicted (%)"]
    assert t.display.iloc[0].tolist()[3:] == ["50.0 (2)", "75.0 (1)", "-", "42 / 58 / 0"]
    assert t.display.iloc[1].tolist()[1:] == ["Complete Data", 1, "100.0 (1)", "-", "-", "100 / 0 / 0"]
    with pytest.raises(ValueError, match="pred_closed"):
        closed_set_by_class(frame.drop(columns="pred_closed"), classes)


def test_figures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((32, 32)) * 0.8
    brain = np.zeros((32, 32), bool)
    brain[4:28, 4:28] = True
    rows = [QualitativeRow(f"case{i}", {"t1": rng.random((32, 32)), "t2": rng.random((32, 32))},
                           np.clip(truth + 0.05 * i, 0, 1), truth, "flair", brain) for i in range(2)]
    out = qualitative_grid(rows, tmp_path / "fig" / "qualitative.png", title="T1, T2 -> FLAIR")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    summary = table1(_table1_frame(), scenarios=["t1", "t1_t2", "complete"], n_boot=20).summary
    bars = metric_bars(summary, "top1", tmp_path / "fig" / "top1.png", ylabel="Top-1 (%)")
    assert bars.stat().st_size > 1000
    with pytest.raises(ValueError, match="lacks column"):
        metric_bars(summary, "psnr", tmp_path / "x.png")
