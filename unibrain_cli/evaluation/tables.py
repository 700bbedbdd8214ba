"""The paper's Tables 1-3 from long per-case result frames, as CSV + markdown.

Input frames have **one row per case** of each group (an ensemble is averaged before):

- Table 1 (diagnosis and report generation): ``method``, ``scenario``, ``case_id``, ``top1``
  (0/1), ``rouge1`` ([0, 1]), ``rate`` ([0, 1]; NaN or absent when RaTEScore is unavailable).
- Table 2 (imputation): ``method``, ``chain`` (e.g. ``"t1->t2"``), ``case_id``, ``psnr`` (dB),
  ``ssim``, ``psnr_brain``, ``ssim_brain``, ``usability`` (0/1: Top-1 of the understanding
  path fed with the imputed image; NaN or absent when not measured).
- Table 3 (ablation): a Table-1 frame and a Table-2 frame whose ``method`` is the variant
  (A, B, C, UniBrain), and the variant -> (unified, SA, DHS) components.

A run that scores several slices of a case (``unibrain evaluate --eval-slices all``) reduces its
frames with :func:`per_case_mean` first: one row per case, its value the mean over its slices.

Every number is a mean with a 95% percentile-bootstrap interval over cases
(:func:`~unibrain_cli.evaluation.stats.bootstrap_ci`) and its cohort size. A requested group
with no cases is a row marked "empty cohort"; a metric with no finite value in a group reads
"unavailable" (RaTEScore without its models) -- never a made-up number. Top-1, ROUGE-1, RaTE and
usability are shown in percent like the paper, PSNR in dB, SSIM as a fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from unibrain_cli.evaluation.stats import estimate
from unibrain_cli.io.atomic import atomic_path, write_text

EMPTY = "empty cohort"
UNAVAILABLE = "unavailable"
NOT_RUN = "-"


@dataclass(frozen=True)
class Metric:
    """A metric column: frame column, table header, display scale and decimals."""

    column: str
    label: str
    scale: float = 1.0
    digits: int = 2


TABLE1_METRICS: tuple[Metric, ...] = (
    Metric("top1", "Top-1 (%)", 100.0), Metric("rouge1", "ROUGE-1", 100.0), Metric("rate", "RaTE", 100.0),
)
TABLE2_METRICS: tuple[Metric, ...] = (
    Metric("psnr", "PSNR (dB)"), Metric("ssim", "SSIM", digits=4),
    Metric("psnr_brain", "PSNR brain (dB)"), Metric("ssim_brain", "SSIM brain", digits=4),
    Metric("usability", "Top-1 (%)", 100.0),
)
#: Table 2 under ``--convention paper``: the authors score the whole slice only (no brain-masked columns).
TABLE2_PAPER_METRICS: tuple[Metric, ...] = (TABLE2_METRICS[0], TABLE2_METRICS[1], TABLE2_METRICS[4])

#: Scenario keys (EvalConfig.scenarios) -> the paper's column-group names.
SCENARIO_LABELS: dict[str, str] = {
    "t1": "T1w only", "t1_t2": "T1w + T2w", "t1_t2_flair": "T1w + T2w + T2f", "complete": "Complete Data",
}
#: Modality -> the paper's short names in chain labels.
PAPER_MODALITY: dict[str, str] = {"t1": "T1w", "t2": "T2w", "flair": "T2f", "t1ce": "T1c", "dwi": "DWI",
                                  "adc": "ADC"}
#: The ablation's understanding scenario and generation chain (Table 3).
ABLATION_SCENARIO = "t1"
ABLATION_CHAIN = "t1,t2,flair->t1ce"


def scenario_label(key: str) -> str:
    """``"t1_t2"`` -> ``"T1w + T2w"``; unknown keys pass through."""
    return SCENARIO_LABELS.get(key, key)


def chain_label(key: str) -> str:
    """``"t1,t2->flair"`` -> ``"T1w, T2w → T2f"``; keys without ``->`` pass through."""
    if "->" not in key:
        return key
    left, right = key.split("->", 1)
    names = [PAPER_MODALITY.get(m.strip(), m.strip()) for m in left.split(",") if m.strip()]
    return f"{', '.join(names)} → {PAPER_MODALITY.get(right.strip(), right.strip())}"


@dataclass
class Table:
    """A finished table: ``summary`` (numbers, for CSV) and ``display`` (strings, for markdown).

    ``footer``: result lines shown right under the rows (markdown and terminal), before the ``notes``.
    """

    name: str
    title: str
    summary: pd.DataFrame
    display: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """A GitHub-flavoured markdown table with title and notes."""
        cols = [str(c) for c in self.display.columns]
        lines = [f"### {self.title}", "", "| " + " | ".join(cols) + " |",
                 "|" + "|".join("---" for _ in cols) + "|"]
        for row in self.display.itertuples(index=False):
            lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
        if self.footer:
            lines.append("")
            lines.extend(self.footer)
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``<name>.csv`` (summary) and ``<name>.md`` (display) atomically; return the paths."""
        out = Path(out_dir)
        csv_path, md_path = out / f"{self.name}.csv", out / f"{self.name}.md"
        with atomic_path(csv_path) as tmp:
            self.summary.to_csv(tmp, index=False)
        write_text(md_path, self.markdown())
        return csv_path, md_path


def _check_frame(frame: pd.DataFrame, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise ValueError(f"result frame lacks columns {missing}")
    if "case_id" in frame.columns and frame.duplicated([*keys, "case_id"]).any():
        dup = frame.loc[frame.duplicated([*keys, "case_id"]), [*keys, "case_id"]].iloc[0].tolist()
        raise ValueError(f"more than one row for {dup}; give one row per case (average ensembles first)")


def per_case_mean(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per group of ``keys`` and ``case_id``: every float column is the mean over the group's
    rows (a case's slices; NaN skipped, NaN when none is finite), the other columns keep the group's
    first row. Groups and columns keep their order of appearance.

    Makes a frame of several rows (slices) per case fit :func:`summarize`, so each case weighs the
    same and the bootstrap resamples cases, not slices. The identity on a frame that already has one
    row per case (bit for bit: the mean of one float is itself)."""
    by = [*keys, "case_id"]
    missing = [k for k in by if k not in frame.columns]
    if missing:
        raise ValueError(f"result frame lacks columns {missing}")
    first = frame.loc[~frame.duplicated(by).to_numpy()].reset_index(drop=True)
    floats = [c for c in frame.columns if c not in by and pd.api.types.is_float_dtype(frame[c])]
    if floats:
        means = frame.groupby(by, sort=False, dropna=False)[floats].mean()
        first[floats] = means.to_numpy()
    return first


def summarize(
    frame: pd.DataFrame,
    keys: Sequence[str],
    metrics: Sequence[Metric],
    groups: Sequence[tuple[str, ...]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """One row per group of ``keys``: the keys, ``n`` (cases), ``status`` ("" or "empty cohort") and
    per metric ``<col>_mean``, ``<col>_lo``, ``<col>_hi`` (display units) and ``<col>_n`` (cases with a
    finite value). ``groups`` fixes the rows and their order (missing ones become empty cohorts);
    by default the groups found, in order of appearance."""
    _check_frame(frame, keys)
    if groups is None:
        groups = list(dict.fromkeys(tuple(str(v) for v in r) for r in frame[list(keys)].itertuples(index=False)))
    key_str = frame[list(keys)].astype(str)
    records = []
    for g in groups:
        g = tuple(str(v) for v in g)
        sel = frame.loc[(key_str == list(g)).all(axis=1).to_numpy()]
        rec: dict[str, object] = dict(zip(keys, g))
        rec["n"] = len(sel)
        rec["status"] = EMPTY if sel.empty else ""
        for m in metrics:
            vals = sel[m.column].to_numpy(dtype=np.float64) if m.column in sel.columns else np.array([])
            est = estimate(vals * m.scale, n_boot=n_boot, seed=seed, alpha=alpha)
            rec[f"{m.column}_mean"] = est.mean if est else np.nan
            rec[f"{m.column}_lo"] = est.lo if est else np.nan
            rec[f"{m.column}_hi"] = est.hi if est else np.nan
            rec[f"{m.column}_n"] = est.n if est else 0
        records.append(rec)
    columns = [*keys, "n", "status"] + [f"{m.column}_{s}" for m in metrics for s in ("mean", "lo", "hi", "n")]
    return pd.DataFrame.from_records(records, columns=columns)


def format_cell(row: Mapping[str, object], metric: Metric) -> str:
    """``"74.47 [70.21, 78.72]"`` (plus ``" (n=k)"`` when fewer cases than the row have a value),
    "empty cohort" or "unavailable"."""
    if row["status"] == EMPTY:
        return EMPTY
    k = int(row[f"{metric.column}_n"])  # type: ignore[call-overload]
    if k == 0:
        return UNAVAILABLE
    d = metric.digits
    mean, lo, hi = (float(row[f"{metric.column}_{s}"]) for s in ("mean", "lo", "hi"))  # type: ignore[arg-type]
    cell = f"{mean:.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"
    return cell if k == int(row["n"]) else f"{cell} (n={k})"  # type: ignore[call-overload]


def _ci_note(n_boot: int, seed: int, alpha: float) -> str:
    return (f"Values: mean [{100 * (1 - alpha):g}% percentile-bootstrap CI over cases, {n_boot} resamples, "
            f"seed {seed}]; n = cases. Top-1, ROUGE-1, RaTE in %; PSNR in dB.")


def _groups(methods: Sequence[str] | None, others: Sequence[str] | None, frame: pd.DataFrame,
            keys: tuple[str, str]) -> list[tuple[str, str]] | None:
    if methods is None and others is None:
        return None
    ms = list(methods) if methods is not None else list(dict.fromkeys(frame[keys[0]].astype(str)))
    os_ = list(others) if others is not None else list(dict.fromkeys(frame[keys[1]].astype(str)))
    return [(m, o) for m in ms for o in os_]


def table1(
    frame: pd.DataFrame,
    methods: Sequence[str] | None = None,
    scenarios: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    notes: Sequence[str] = (),
) -> Table:
    """Table 1: rows method x scenario; Top-1, ROUGE-1, RaTE with 95% CI and n."""
    return _method_table("table1", "Table 1. Diagnosis and report generation with missing MRIs", frame,
                         ("method", "scenario"), "Scenario", scenario_label, TABLE1_METRICS,
                         methods, scenarios, n_boot, seed, alpha, notes)


def table2(
    frame: pd.DataFrame,
    methods: Sequence[str] | None = None,
    chains: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    notes: Sequence[str] = (),
    metrics: Sequence[Metric] = TABLE2_METRICS,
) -> Table:
    """Table 2: rows method x chain; PSNR/SSIM full and in the brain, diagnostic usability (Top-1).

    ``metrics`` picks the columns (:data:`TABLE2_PAPER_METRICS` under the authors' convention)."""
    return _method_table("table2", "Table 2. Missing-modality imputation fidelity and diagnostic usability",
                         frame, ("method", "chain"), "Chain", chain_label, metrics,
                         methods, chains, n_boot, seed, alpha, notes)


def _method_table(
    name: str,
    title: str,
    frame: pd.DataFrame,
    keys: tuple[str, str],
    column: str,
    label: Callable[[str], str],
    metrics: Sequence[Metric],
    methods: Sequence[str] | None,
    others: Sequence[str] | None,
    n_boot: int,
    seed: int,
    alpha: float,
    notes: Sequence[str],
) -> Table:
    """Rows method x (scenario | chain), one column per metric with its CI, plus n."""
    summary = summarize(frame, keys, metrics, _groups(methods, others, frame, keys), n_boot, seed, alpha)
    display = pd.DataFrame({
        "Method": summary["method"],
        column: summary[keys[1]].map(label),
        "n": summary["n"],
        **{m.label: [format_cell(r, m) for r in summary.to_dict("records")] for m in metrics},
    })
    return Table(name, title, summary, display, [_ci_note(n_boot, seed, alpha), *notes])


def table3(
    understanding: pd.DataFrame,
    generation: pd.DataFrame,
    components: Mapping[str, tuple[bool, bool, bool]],
    scenario: str = ABLATION_SCENARIO,
    chain: str = ABLATION_CHAIN,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    notes: Sequence[str] = (),
) -> Table:
    """Table 3 (ablation): one row per variant of ``components`` (variant -> (unified, SA, DHS)).

    Understanding columns come from ``understanding`` rows of ``scenario`` (T1w only), generation
    columns from ``generation`` rows of ``chain`` (T1w -> ... -> T1c). A variant without rows in a
    part (A generates nothing) shows "-" there.
    """
    und = summarize(understanding.loc[understanding["scenario"].astype(str) == scenario], ("method",),
                    TABLE1_METRICS, [(v,) for v in components], n_boot, seed, alpha)
    gen = summarize(generation.loc[generation["chain"].astype(str) == chain], ("method",),
                    (TABLE2_METRICS[0], TABLE2_METRICS[1], TABLE2_METRICS[4]),
                    [(v,) for v in components], n_boot, seed, alpha)
    summary = und.add_prefix("und_").rename(columns={"und_method": "method"}).merge(
        gen.add_prefix("gen_").rename(columns={"gen_method": "method"}), on="method")
    flags = pd.DataFrame([components[v] for v in components], columns=["unified", "sa", "dhs"])
    summary = pd.concat([summary[["method"]], flags, summary.drop(columns="method")], axis=1)

    def cells(part: pd.DataFrame, metric: Metric) -> list[str]:
        return [NOT_RUN if r["status"] == EMPTY else format_cell(r, metric) for r in part.to_dict("records")]

    tick = {True: "✓", False: ""}
    display = pd.DataFrame({
        "Model": list(components),
        "Unified": [tick[bool(c[0])] for c in components.values()],
        "SA": [tick[bool(c[1])] for c in components.values()],
        "DHS": [tick[bool(c[2])] for c in components.values()],
        "n (und.)": und["n"],
        "Acc-1 (%)": cells(und, TABLE1_METRICS[0]),
        "ROUGE-1": cells(und, TABLE1_METRICS[1]),
        "RaTEScore": cells(und, TABLE1_METRICS[2]),
        "n (gen.)": gen["n"],
        "PSNR (dB)": cells(gen, TABLE2_METRICS[0]),
        "SSIM": cells(gen, TABLE2_METRICS[1]),
        "Top-1 (%)": cells(gen, TABLE2_METRICS[4]),
    })
    head = (f"Understanding: {scenario_label(scenario)}; generation: {chain_label(chain)}. "
            "'-' = variant not run on that part.")
    return Table("table3", "Table 3. Ablation studies", summary, display,
                 [head, _ci_note(n_boot, seed, alpha), *notes])


def closed_set_by_class(
    frame: pd.DataFrame,
    classes: Sequence[str],
    methods: Sequence[str] | None = None,
    scenarios: Sequence[str] | None = None,
) -> Table:
    """Closed-set Top-1 per true class, and how often each class is predicted, per method x scenario.

    ``frame``: one row per scored slice with ``method``, ``scenario``, ``case_id``, ``diseases``
    ("|"-joined labels), ``top1_closed`` (0/1) and ``pred_closed`` (class name). Only cases with exactly
    one label among ``classes`` count; the slices of a case share one unit of weight (what
    :func:`per_case_mean` does for Table 1), so every number is per case. Rows whose method predicted
    nothing (empty ``pred_closed``) are left out.

    Summary columns: ``method``, ``scenario``, ``n`` (cases), per class ``top1_<class>`` (% of that
    class's cases answered right; NaN without cases), ``n_<class>`` and ``pred_<class>`` (% of the
    group's cases predicted as that class), then ``most_predicted`` and ``most_predicted_pct``. A
    Top-1 that is mostly one class's column and a ``pred_`` share far above that class's share of the
    cases is a model that answers one default class (what Table 1's single number hides).
    """
    missing = [k for k in ("method", "scenario", "case_id", "diseases", "top1_closed", "pred_closed")
               if k not in frame.columns]
    if missing:
        raise ValueError(f"result frame lacks columns {missing}")
    labels = frame["diseases"].fillna("").astype(str)
    pred = frame["pred_closed"].fillna("").astype(str)
    keep = (labels.isin(list(classes)) & (pred != "")).to_numpy() & np.isfinite(
        frame["top1_closed"].to_numpy(dtype=np.float64))
    f = frame.loc[keep, ["method", "scenario", "case_id", "top1_closed"]].assign(
        truth=labels[keep].to_numpy(), pred=pred[keep].to_numpy())
    f["method"], f["scenario"] = f["method"].astype(str), f["scenario"].astype(str)
    f["w"] = 1.0 / f.groupby(["method", "scenario", "case_id"])["case_id"].transform("size").to_numpy(np.float64)
    if methods is None:
        methods = list(dict.fromkeys(f["method"]))
    if scenarios is None:
        scenarios = list(dict.fromkeys(f["scenario"]))
    records: list[dict[str, object]] = []
    for m in methods:
        for sc in scenarios:
            sel = f.loc[(f["method"] == m) & (f["scenario"] == sc)]
            if sel.empty:
                continue
            n = int(sel["case_id"].nunique())
            rec: dict[str, object] = {"method": m, "scenario": sc, "n": n}
            for c in classes:
                part = sel.loc[sel["truth"] == c]
                rec[f"n_{c}"] = int(part["case_id"].nunique())
                rec[f"top1_{c}"] = (100.0 * float((part["top1_closed"] * part["w"]).sum() / part["w"].sum())
                                    if len(part) else np.nan)
            shares = {c: 100.0 * float(sel.loc[sel["pred"] == c, "w"].sum()) / n for c in classes}
            for c in classes:
                rec[f"pred_{c}"] = shares[c]
            top = max(classes, key=lambda c: shares[c])
            rec["most_predicted"], rec["most_predicted_pct"] = top, shares[top]
            records.append(rec)
    columns = (["method", "scenario", "n"] + [f"{k}_{c}" for c in classes for k in ("top1", "n")]
               + [f"pred_{c}" for c in classes] + ["most_predicted", "most_predicted_pct"])
    summary = pd.DataFrame.from_records(records, columns=columns)
    display = pd.DataFrame({
        "Method": summary["method"],
        "Scenario": summary["scenario"].map(scenario_label),
        "n": summary["n"],
        **{c: [NOT_RUN if r[f"n_{c}"] == 0 else f"{r[f'top1_{c}']:.1f} ({r[f'n_{c}']})"
               for r in summary.to_dict("records")] for c in classes},
        "Predicted (%)": [" / ".join(f"{r[f'pred_{c}']:.0f}" for c in classes) for r in summary.to_dict("records")],
    })
    notes = [f"Closed-set Top-1 (%) of the cases of each true class (their number in brackets; '{NOT_RUN}': none in "
             f"the cohort). Predicted: the share of the cohort's cases answered as {' / '.join(classes)}. "
             "Cases with one label only; a case's slices weigh one case together."]
    return Table("table1_classes", "Table 1 by class. Closed-set answers per true class", summary, display, notes)


def write_tables(tables: Sequence[Table], out_dir: str | Path) -> list[Path]:
    """Write every table's CSV and markdown, plus ``tables.md`` with all of them; return the paths."""
    paths: list[Path] = []
    for t in tables:
        paths.extend(t.write(out_dir))
    combined = Path(out_dir) / "tables.md"
    write_text(combined, "\n".join(t.markdown() for t in tables))
    return [*paths, combined]
