"""``evaluate(ckpt, data, out, ...)``: the library entry behind ``unibrain evaluate`` (paper Tables 1-3).

Cases
    The split's evaluation slices of a SLICES folder (``is_eval``: the middle lesion slice of each
    case; one per case). ``max_cases > 0`` keeps a seeded random subset (index order kept).
    ``eval_slices="all"`` (``--eval-slices all``, native protocol and ``ours`` convention only)
    evaluates every stored slice of those cases instead, each slice on its own; every table number
    stays a per-case statistic: a case's value is the mean over its slices
    (:func:`~unibrain_cli.evaluation.tables.per_case_mean`, applied in both modes: the identity
    with one slice per case), the bootstrap resamples cases and ``n`` counts cases. The
    conditioning probe and the qualitative figure keep each case's eval slice.

Table 1 (diagnosis and report generation with missing modalities), per scenario
(:mod:`~unibrain_cli.evaluation.scenarios`) on the cases that have the scenario's inputs:

- ``UniBrain``: the inputs enter as clean VAE + ViT views, the case's other modalities are imputed
  in canonical order (T2, FLAIR, T1ce, DWI, ADC among those the case has) with thinking
  (:func:`~unibrain_cli.inference.engine.impute_chain`), then the answer is generated
  (:func:`~unibrain_cli.inference.engine.generate_answer`).
- ``UniBrain Und.``: the same model, understanding only: the inputs as ViT views, no imputation.

  Top-1 is the class named in the generated "Final Diagnosis" (:func:`extract_diagnosis`); Top-1
  closed-set is the argmax of the five class answers' log-likelihoods
  (:func:`~unibrain_cli.inference.engine.diagnosis_scores`) on the same context; ROUGE-1 compares the
  generated impression with the reference impression; RaTE only with local RaTEScore models. Cases
  without a disease label do not count for Top-1.
- ``CNN reference`` (``--baselines cnn``): one supervised CNN per scenario
  (:mod:`~unibrain_cli.evaluation.classifier`, ``cnn_steps`` steps on the train split) fed the
  scenario's real input slices; on the UniBrain rows' cohort, Top-1 = Top-1 closed-set = its class
  (:func:`cnn_rows`); no text, so no ROUGE-1 / RaTE.

Table 2 (imputation, ``chain=True``): chains T1 -> T2; T1,T2 -> FLAIR; T1,T2,FLAIR -> T1ce from real
inputs, on the cases that have all chain modalities. PSNR/SSIM on [0, 1] slices, full field and in
the brain mask. Diagnostic usability = closed-set Top-1 when the imputed slice replaces the real one
in the complete-data context (all the case's modalities, clean VAE + ViT). ``ensemble > 1`` adds
``UniBrain* (N seeds)``: the mean of N seeds' slices. Baselines: ``copy`` (copy-nearest fitted on the
train split), ``unet`` (one U-Net per chain, ``unet_steps``) and ``two-stage`` (the U-Net slice fed to
the understanding-only path: its usability). The first imputed target of a Table-1 chain is the same
computation as the matching Table-2 chain (same context and seed), so it is computed once.

Masks (one rule for every method: UniBrain, the ensemble, copy-nearest, U-Net, two-stage, and the
Table-1 imputations):

- the prediction: every generated or baseline slice is zeroed outside the *input mask*
  (:meth:`EvalCase.input_brain`): the nonzero pixels of the chain's (scenario's) real INPUT slices,
  holes filled (:func:`~unibrain_cli.data.slicing.slice_brain_mask`, the ``prepare`` brain rule
  applied to the inputs only). Nothing derived from the target modality ever multiplies or shapes
  a prediction; a target whose brain extends beyond its inputs' is scored with those pixels at 0.
- the evaluation region of ``psnr_brain`` / ``ssim_brain``: the *reference brain*, the slice's
  stored ``brain`` mask (:attr:`EvalCase.brain`: the union of all the case's modalities, target
  included). It is a property of the ground truth, the same for every method, and only selects
  which pixels are scored; it never touches a prediction.

Scoring conventions (``convention``; eval.json ``convention`` records the rules and, for ``paper``,
which slice each case was scored on; the tables' notes and the terminal carry one line):

- ``ours`` (default): each case's eval slice; PSNR/SSIM on float [0, 1] slices over the whole stored
  (brain-cropped) slice and inside the reference brain; Table 1 imputations are not image-scored.
- ``paper``: the authors' ``evaluate_metrics.py`` (released-checkpoint-protocol.md section 4) within
  what a slices folder holds: the middle lesion slice (``ks[len(ks) // 2]`` over the case's stored
  lesion slices, :func:`paper_rows`), the whole stored slice with background, uint8 / 255 (reference
  rounded, prediction truncated), ``data_range`` 1, no brain-masked columns; only the last target of
  each chain (Table 2 chains have one; Table 1 gains PSNR/SSIM of the last target of each UniBrain
  chain); the ensemble row averages the N uint8 draws (their ``sample_time``). Generation is the
  same in both conventions.

Conditioning probe (with ``chain=True``): the T1 -> T2 probe of
:mod:`~unibrain_cli.evaluation.probe` on the evaluated cases that have T1 and T2 (the first
:data:`PROBE_MAX_SLICES`, at least 2): one-step PSNR with the case's own T1, another case's T1 or
no image, and ``conditioning_gap_db = psnr_own - psnr_other``; written to eval.json (``probe``) and
as one line under Table 2.

Table 3 (``ablation=True``): ``ckpt`` is a folder holding one training run (or model folder) per
variant::

    CKPT/A/      understanding only   (recipes/ablation-A.toml: vae + unified, understanding_only_prob 1)
    CKPT/B/      + unified data flow  (recipes/ablation-B.toml: vae + unified)
    CKPT/C/      + self-alignment     (recipes/ablation-C.toml: vae + sa + unified)
    CKPT/full/   + DHS = UniBrain     (recipes/small.toml: vae + sa + unified + dhs)

Each is evaluated on the T1-only scenario (A with the understanding-only protocol, the others with
the unified one) and on the T1,T2,FLAIR -> T1ce chain (not A); Tables 1 and 2 use ``full/``.

Protocol (``protocol``): ``native`` is everything above; ``released`` (the authors' released
checkpoint, ``--ckpt`` a released / BAGEL folder or a step folder with ``--base``) runs their tasks
instead (:mod:`unibrain_cli.released.evaluate`: Table 1 from their understanding-only question and,
with ``chain``, their unified chain; Table 2 from their generation task; paper convention by
default); ``auto`` picks ``released`` for a folder in their layout. ``ablation`` is native only.

Outputs (EVAL, written to a temporary folder renamed into place at the end)::

    table1_cases.csv, table2_cases.csv   one row per method x scenario/chain x evaluated slice
                                          (case_id, slice_id; one slice per case unless --eval-slices all)
    table1.{csv,md}, table2.{csv,md}, table3.{csv,md} (ablation), tables.md
    table1_classes.{csv,md}               closed-set Top-1 per true class and the share of each
                                          predicted class (:func:`tables.closed_set_by_class`)
    qualitative.png, bars_top1.png, bars_psnr.png (with --chain)
    eval.json                             settings, cohort sizes, timings, table summaries, probe
    recipe.resolved.toml                  the checkpoint's recipe
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch

from unibrain_cli.config.components import ThinkingPlan
from unibrain_cli.data import templates
from unibrain_cli.data.slices_data import SliceDataset, load_index, read_slices_meta
from unibrain_cli.data.slicing import slice_brain_mask
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation import figures, tables
from unibrain_cli.evaluation.baselines import (
    CopyNearestBaseline,
    UNetBaseline,
    chain_key,
    fit_copy_nearest,
    parse_chain,
    train_unet,
)
from unibrain_cli.evaluation.classifier import DEFAULT_BATCH_SIZE as CNN_BATCH_SIZE
from unibrain_cli.evaluation.classifier import DEFAULT_STEPS as DEFAULT_CNN_STEPS
from unibrain_cli.evaluation.classifier import ClassifierReference, train_classifier
from unibrain_cli.evaluation.diagnosis import extract_diagnosis
from unibrain_cli.evaluation.metrics import (
    CONVENTIONS,
    imputation_metrics,
    paper_image_scores,
    prediction_uint8,
    psnr,
    ratescore,
    ratescore_unavailable_reason,
    reference_uint8,
    rouge1_f,
    ssim,
    top1_hits,
)
from unibrain_cli.evaluation.probe import MAX_SLICES as PROBE_MAX_SLICES
from unibrain_cli.evaluation.probe import probe_slices
from unibrain_cli.evaluation.scenarios import (
    CHAIN_KEYS,
    canonical,
    chain_applies,
    paper_slice_position,
    parse_scenarios,
    scenario_inputs,
    scenario_targets,
    scored_targets,
)
from unibrain_cli.evaluation.tables import NOT_RUN, Metric, Table, format_cell, summarize
from unibrain_cli.inference.batched import (
    append_images,
    diagnosis_scores_batch,
    generate_answers,
    impute_chains,
)
from unibrain_cli.inference.checkpoint import (
    InferenceBundle,
    load_for_inference,
    resolve_checkpoint,
    run_folder_of,
)
from unibrain_cli.inference.diagnose import engine_for
from unibrain_cli.inference.engine import (
    INPUT_VIEWS,
    UNDERSTANDING_VIEWS,
    Answer,
    Context,
    GuidedContexts,
    diagnosis_scores,
    generate_answer,
    impute_chain,
)
from unibrain_cli.io.atomic import atomic_dir, write_text
from unibrain_cli.modalities import DISEASES, MODALITIES
from unibrain_cli.training.run import stage_train_seconds

EVAL_FORMAT = "unibrain-eval/1"

METHOD_UNIFIED = "UniBrain"
METHOD_UND = "UniBrain Und."
METHOD_COPY = "copy-nearest"
METHOD_UNET = "U-Net"
METHOD_TWO_STAGE = "two-stage (U-Net -> Und.)"
METHOD_CNN = "CNN reference"

#: ``--baselines`` names: copy, unet and two-stage add Table-2 rows, cnn Table-1 rows.
BASELINES: tuple[str, ...] = ("copy", "unet", "two-stage", "cnn")
#: Ablation variant folder -> (Table-3 row name, (unified, SA, DHS)).
ABLATION_VARIANTS: dict[str, tuple[str, tuple[bool, bool, bool]]] = {
    "A": ("A", (False, False, False)),
    "B": ("B", (True, False, False)),
    "C": ("C", (True, True, False)),
    "full": ("UniBrain", (True, True, True)),
}
DEFAULT_THINKING_TOKENS = 48
DEFAULT_ANSWER_TOKENS = 96
#: slices evaluated together (``--batch-size``)
DEFAULT_BATCH_SIZE = 16
DEFAULT_UNET_STEPS = 200
QUALITATIVE_CASES = 3

TOP1_CLOSED = Metric("top1_closed", "Top-1 closed-set (%)", 100.0)
TABLE1_COLUMNS: tuple[str, ...] = (
    "method", "scenario", "case_id", "slice_id", "diseases", "inputs", "imputed", "pred_text", "pred_closed",
    "top1", "top1_closed", "rouge1", "rate", "reference", "impression", "answer", "scored_target", "psnr", "ssim",
    "seconds",
)
TABLE2_COLUMNS: tuple[str, ...] = (
    "method", "chain", "case_id", "slice_id", "psnr", "ssim", "psnr_brain", "ssim_brain", "usability", "seeds",
)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalCase:
    """One evaluated slice of a case.

    ``images`` float32 [6, S, S] in [0, 1] (MODALITIES order, zeros where absent); ``brain`` bool
    [S, S], the stored reference brain (union over ALL the case's modalities: an evaluation region
    only, never applied to a prediction; see :meth:`input_brain`); ``present`` the case's modalities
    in canonical order; ``diseases`` its classes. ``is_eval``: the case's one representative slice
    (the one the conditioning probe and the qualitative figure use); False only for the other slices
    of a case under ``--eval-slices all`` (:func:`load_cases`).
    """

    slice_id: str
    case_id: str
    diseases: tuple[str, ...]
    present: tuple[str, ...]
    images: np.ndarray
    brain: np.ndarray
    impression: str
    is_eval: bool = True

    def image(self, modality: str) -> np.ndarray:
        """Slice [S, S] of ``modality``."""
        return self.images[MODALITIES.index(modality)]

    def input_brain(self, inputs: Sequence[str]) -> np.ndarray:
        """bool [S, S]: the brain as seen from the ``inputs`` slices only
        (:func:`~unibrain_cli.data.slicing.slice_brain_mask`); never uses a target modality."""
        return slice_brain_mask(self.images[[MODALITIES.index(m) for m in inputs]])


def parse_baselines(value: str | Sequence[str] | None, where: str = "--baselines") -> tuple[str, ...]:
    """``"copy,unet,two-stage,cnn"`` (or a sequence; ``""``/``"none"`` = none) -> names in canonical order."""
    if value is None:
        return ()
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    items = [v for v in items if v != "none"]
    bad = [v for v in items if v not in BASELINES]
    if bad:
        raise UserError(f"unknown baseline '{bad[0]}'; choose from {', '.join(BASELINES)} (comma-separated) "
                        "or none", where)
    return tuple(b for b in BASELINES if b in items)


def check_out_dir(out: str | Path | None, force: bool) -> Path:
    """``out`` must be absent or an empty folder (any folder with ``force``)."""
    if out is None:
        raise UserError("an output folder is required", "--out")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError("exists and is not a folder; choose another --out", str(path))
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UserError("the evaluation folder is not empty; choose another --out or pass --force", str(path))
    return path


def load_cases(data: str | Path, split: str, max_cases: int = 0, seed: int = 0, convention: str = "ours",
               eval_slices: str = "eval") -> tuple[list[EvalCase], int]:
    """The evaluated slices of ``split`` and the slice size S.

    The cases are those with an eval slice (``is_eval``), in index order; ``max_cases > 0`` keeps a
    seeded random subset of that many cases (the same cases for both conventions and both
    ``eval_slices``). ``eval_slices`` ``"eval"``: one slice per case, by ``convention``: ``"ours"``
    each case's eval slice, ``"paper"`` the slice :func:`paper_rows` picks among the case's stored
    slices of ``split``. ``"all"`` (``ours`` only, see :func:`check_eval_slices`): every stored slice
    of ``split`` of those cases, in index order, each its own :class:`EvalCase` sharing the case's
    ``case_id``; the case's first eval slice is its ``is_eval`` one. An empty split is a
    :class:`UserError` naming the splits that exist.
    """
    _check_convention(convention)
    check_eval_slices(eval_slices, convention)
    meta = read_slices_meta(data)
    ds = SliceDataset(data, split=split, is_eval=True)
    if len(ds) == 0:
        index = load_index(data)
        found = sorted(index.loc[index["is_eval"].astype(bool), "split"].astype(str).unique())
        have = ", ".join(found) if found else "none"
        raise UserError(f"split '{split}' has no evaluation slices in {data} (splits with some: {have})", "--split")
    first = ~ds.index["case_id"].astype(str).duplicated()
    rows = np.flatnonzero(first.to_numpy())
    if 0 < max_cases < rows.size:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_cases, replace=False))
    representative: set[str] | None = None  # slice ids that are their case's is_eval slice (all: the others not)
    if eval_slices == "all":
        source, picked, representative = all_rows(data, split, ds, rows.tolist())
    elif convention == "paper":
        source, picked = paper_rows(data, split, ds, rows.tolist())
    else:
        source, picked = ds, rows.tolist()
    cases = []
    for i in picked:
        item = source[i]
        cases.append(EvalCase(
            slice_id=item["slice_id"], case_id=item["case_id"],
            diseases=tuple(d for d in item["diseases"] if d in DISEASES),
            present=canonical([m for m, p in zip(MODALITIES, item["present"]) if p]),
            images=item["images"], brain=item["brain"].astype(bool), impression=item.get("impression", ""),
            is_eval=representative is None or str(item["slice_id"]) in representative,
        ))
    return cases, int(meta["size"])


#: ``--eval-slices`` values: ``eval`` one slice per case (the default), ``all`` every stored slice of a case.
EVAL_SLICES: tuple[str, ...] = ("eval", "all")


def check_eval_slices(eval_slices: str, convention: str | None = "ours", protocol: str = "native") -> None:
    """``--eval-slices`` must be one of :data:`EVAL_SLICES`; ``all`` only with the native protocol and
    the ``ours`` convention (the paper convention and the released protocol score one chosen slice
    per case)."""
    if eval_slices not in EVAL_SLICES:
        raise UserError(f"unknown value '{eval_slices}'; choose from {', '.join(EVAL_SLICES)}", "--eval-slices")
    if eval_slices != "all":
        return
    if protocol == "released":
        raise UserError("the released protocol scores one slice per case, as the authors' code does; drop "
                        "--eval-slices all or use --protocol native", "--eval-slices")
    if convention == "paper":
        raise UserError("the paper convention scores one slice per case (the middle lesion slice); drop "
                        "--eval-slices all or use --convention ours", "--eval-slices")


def eval_slices_line(slices: int, cases: int) -> str:
    """The line under the tables (and in the terminal) of an ``--eval-slices all`` run."""
    return (f"Slices: every stored slice of a case ({slices} slices of {cases} cases); each case's score is the "
            "mean over its slices, and the bootstrap resamples cases.")


def all_rows(data: str | Path, split: str, eval_ds: SliceDataset, rows: Sequence[int]
             ) -> tuple[SliceDataset, list[int], set[str]]:
    """Every stored slice of ``split`` of the cases of ``eval_ds`` rows ``rows``: (the dataset of every
    stored slice of ``split``, its rows of those cases in index order, the slice ids of each case's
    representative slice: the case's row ``rows`` points at, its first eval slice)."""
    full = SliceDataset(data, split=split)
    index = eval_ds.index.iloc[[int(i) for i in rows]]
    wanted = set(index["case_id"].astype(str))
    picked = np.flatnonzero(full.index["case_id"].astype(str).isin(wanted).to_numpy())
    return full, picked.tolist(), set(index["slice_id"].astype(str))


def one_per_case(cases: Sequence[EvalCase]) -> list[EvalCase]:
    """Each case's representative slice (:attr:`EvalCase.is_eval`), in order: ``cases`` itself with
    one slice per case."""
    return [c for c in cases if c.is_eval]


def check_common_flags(out: str | Path | None, force: bool, data: str | Path | None, ensemble: int,
                       max_cases: int, steps: int | None, ratescore_models: str | Path | None
                       ) -> tuple[Path, str | None]:
    """The checks both evaluation protocols share (before anything is loaded): the seed ensemble,
    --max-cases, --steps, the output folder and a SLICES folder. Returns (output folder, why
    RaTEScore is unavailable or None)."""
    if ensemble < 1:
        raise UserError(f"must be >= 1, got {ensemble}", "--ensemble")
    if max_cases < 0:
        raise UserError(f"must be >= 0 (0 = all cases), got {max_cases}", "--max-cases")
    if steps is not None and steps < 1:
        raise UserError(f"must be >= 1, got {steps}", "--steps")
    out_dir = check_out_dir(out, force)
    rate_reason = ratescore_unavailable_reason(ratescore_models)
    if data is None:
        raise UserError("a SLICES folder is required (from `unibrain slice`)", "--data")
    return out_dir, rate_reason


def score_ratescore(rows: Sequence[dict[str, Any]], rate_reason: str | None,
                    ratescore_models: str | Path | None) -> str:
    """RaTEScore of every generated impression of ``rows`` at once, stored as ``row["rate"]``
    (nothing when unavailable); returns the Table-1 note on RaTE."""
    scored = [r for r in rows if r.get("reference") and r.get("impression")]
    values = ratescore([r["reference"] for r in scored], [r["impression"] for r in scored], ratescore_models) \
        if scored and rate_reason is None else None
    for r, v in zip(scored, values or []):
        r["rate"] = v
    return f"unavailable ({rate_reason})" if rate_reason else "RaTEScore with the given local models"


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise UserError(f"unknown convention '{convention}'; choose from {', '.join(CONVENTIONS)}", "--convention")


def _lesion_pixels(ds: SliceDataset) -> np.ndarray:
    """float [len(ds)]: lesion pixels per slice (the index's ``lesion_area_px``, else the stored masks)."""
    if "lesion_area_px" in ds.index.columns:
        px = pd.to_numeric(ds.index["lesion_area_px"], errors="coerce")
        if px.notna().all():
            return px.to_numpy(dtype=np.float64)
    return np.array([float(ds.arrays(i)["mask"].sum()) for i in range(len(ds))], dtype=np.float64)


def paper_rows(data: str | Path, split: str, eval_ds: SliceDataset, rows: Sequence[int]) -> tuple[SliceDataset, list[int]]:
    """The authors' slice of each case of ``eval_ds`` rows ``rows``: (the dataset of every stored
    slice of ``split``, one row of it per case, in the same order).

    Among a case's stored slices, :func:`~unibrain_cli.evaluation.scenarios.paper_slice_position`:
    the middle of the stored lesion slices (the authors' ``ks[len(ks) // 2]``), the eval slice
    when no stored slice holds lesion.
    """
    full = SliceDataset(data, split=split)
    px = _lesion_pixels(full)
    ks = full.index["slice_k"].to_numpy()
    flags = full.index["is_eval"].astype(bool).to_numpy()
    groups = full.index.groupby(full.index["case_id"].astype(str), sort=False).indices
    out = []
    for i in rows:
        pos = groups[str(eval_ds.index.iloc[int(i)]["case_id"])]
        out.append(int(pos[paper_slice_position(ks[pos].tolist(), px[pos].tolist(), flags[pos].tolist())]))
    return full, out


#: eval.json ``convention`` descriptions (the slice and field parts are completed by :func:`convention_summary`).
CONVENTION_RULES: dict[str, dict[str, str]] = {
    "ours": {
        "slice": "each case's eval slice from `unibrain slice`: the lesion slice nearest the centre of the "
                 "lesion's axial extent (the central brain slice without lesion)",
        "field": "the stored SxS slice: the case's brain bounding box zero-padded to a square and resized to S",
        "values": "float slices in [0, 1] (predictions clipped to [0, 1])",
        "metrics": "PSNR/SSIM by scikit-image, data_range 1, over the whole stored slice (psnr, ssim) and inside "
                   "the reference brain mask (psnr_brain, ssim_brain)",
        "targets": "Table 2: each chain imputes one target from real inputs and it is scored; Table 1 "
                   "imputations are not image-scored",
        "ensemble": "UniBrain* (N seeds): the mean of the N seeds' float slices",
        "prediction": "every predicted slice zeroed outside its inputs' brain mask (module docstring)",
    },
    "paper": {
        "slice": "the authors' middle lesion slice: the middle element ks[len(ks) // 2] of the sorted axial "
                 "indices holding lesion (the eval slice for a case without lesion on any stored slice)",
        "field": "the whole stored SxS slice with its background; a slices folder keeps the case's brain bounding "
                 "box zero-padded to a square and resized to S, not the scanner's field of view (the authors "
                 "score the full 240x240 BraTS plane: more background, where both slices are usually 0, so "
                 "their numbers usually read higher)",
        "values": "uint8 / 255: the reference round(x * 255); the prediction truncated floor(x * 255) like the "
                  "authors' decoder",
        "metrics": "PSNR/SSIM by scikit-image on uint8 / 255, data_range 1, over the whole slice including "
                   "background (no brain-masked scores); a perfect match reads 100 dB (theirs: inf)",
        "targets": "only the last target of each chain: Table 2 chains impute one target from real inputs (it is "
                   "their last); Table 1 (UniBrain) scores the last target of each scenario's imputation chain "
                   "(columns PSNR/SSIM last target)",
        "ensemble": "UniBrain* (N seeds): the authors' sample_time: the N draws decoded to uint8, averaged, "
                    "truncated to uint8 (also the slice that usability sees)",
        "prediction": "generated exactly as in 'ours' (zeroed outside the inputs' brain mask); only scoring and "
                      "the slice differ",
    },
}


def convention_summary(convention: str, data: str | Path, split: str, cases: Sequence[EvalCase]) -> dict[str, Any]:
    """eval.json ``convention``: the rules of :data:`CONVENTION_RULES` and, for ``paper``, which slice
    each case was scored on compared with its eval slice (``slices``)."""
    _check_convention(convention)
    out: dict[str, Any] = {"name": convention, **CONVENTION_RULES[convention]}
    if convention != "paper":
        return out
    index = SliceDataset(data, split=split).index
    px = pd.to_numeric(index["lesion_area_px"], errors="coerce") if "lesion_area_px" in index.columns else None
    stored, lesion, other = [], [], []
    for c in cases:
        rows = index.loc[index["case_id"].astype(str) == c.case_id]
        chosen = rows.loc[rows["slice_id"].astype(str) == c.slice_id]
        ours = rows.loc[rows["is_eval"].astype(bool)]
        stored.append(len(rows))
        if px is not None:
            lesion.append(int((px.loc[rows.index] > 0).sum()))
        k, ours_k = int(chosen["slice_k"].iloc[0]), int(ours["slice_k"].iloc[0])
        if k != ours_k:
            other.append({"case_id": c.case_id, "slice_k": k, "ours_slice_k": ours_k})
    out["slices"] = {
        "cases": len(cases),
        "same_slice_as_ours": len(cases) - len(other),
        "other_slice": other,
        "stored_slices_per_case": {"min": min(stored), "max": max(stored)} if stored else None,
        "stored_lesion_slices_per_case": {"min": min(lesion), "max": max(lesion)} if lesion else None,
        "exact": "the middle is taken over the slices the folder stores: it is the authors' slice for a case whose "
                 "every lesion slice is stored (`unibrain slice --all-lesion-slices`); with fewer stored (default "
                 "--per-case 3) it is the middle of the stored lesion slices",
    }
    return out


def convention_line(conv: dict[str, Any]) -> str:
    """One line naming the scoring convention of a run (under the tables and in their notes)."""
    if conv.get("protocol") == "released":
        from unibrain_cli.released.evaluate import released_convention_line

        return released_convention_line(conv)
    if conv["name"] != "paper":
        return ("Convention: ours (eval slice; brain-cropped stored slice; float [0, 1]; PSNR/SSIM full slice and "
                "inside the reference brain; --convention paper for the authors' rules).")
    sl = conv.get("slices") or {}
    moved = f"{sl['cases'] - sl['same_slice_as_ours']} of {sl['cases']} cases on another slice than ours; " \
        if sl else ""
    return ("Convention: paper (the authors' evaluate_metrics.py): middle lesion slice over the stored lesion slices "
            f"({moved}exact only when every lesion slice is stored); whole stored slice with background (brain-"
            "cropped by the slicer, not the scanner field of view); uint8/255, data_range 1, no brain-masked "
            "scores; only the last target of each chain; ensemble = mean of uint8 draws.")


def write_figures(made: Mapping[str, Any], qualitative: Any, tmp: Path, out_dir: Path, qualitative_title: str,
                  label: str = "") -> dict[str, Path]:
    """The qualitative grid (when there are examples) and the Top-1 / PSNR bars, written into
    ``tmp``; returns name -> final path under ``out_dir``. ``label`` is appended to the bar titles."""
    figs: dict[str, Path] = {}
    if qualitative:
        figures.qualitative_grid(qualitative, tmp / "qualitative.png", title=qualitative_title)
        figs["qualitative"] = out_dir / "qualitative.png"
    figures.metric_bars(made["table1"].summary, "top1", tmp / "bars_top1.png", group="scenario",
                        ylabel="Top-1 (%)", title=f"Diagnosis Top-1 by scenario{label}")
    figs["bars_top1"] = out_dir / "bars_top1.png"
    if "table2" in made:
        figures.metric_bars(made["table2"].summary, "psnr", tmp / "bars_psnr.png", group="chain",
                            ylabel="PSNR (dB)", title=f"Imputation PSNR by chain{label}")
        figs["bars_psnr"] = out_dir / "bars_psnr.png"
    return figs


def choose_evaluation_protocol(protocol: str | None, ckpt: str | Path | None, base: str | Path | None,
                               ablation: bool) -> str:
    """``native`` or ``released`` for ``unibrain evaluate``: an ablation folder is always native
    (``--protocol released`` or ``--base`` with ``--ablation`` is a UserError); otherwise
    :func:`~unibrain_cli.released.folder.choose_protocol`."""
    from unibrain_cli.released.folder import choose_protocol

    if ablation:
        value = (protocol or "auto").strip().lower()
        if value == "released":
            raise UserError("--ablation evaluates our A/B/C/full training runs (native protocol); the released "
                            "protocol has no ablation variants: drop --ablation or use --protocol native",
                            "--protocol")
        if base is not None:
            raise UserError("--base only applies to --protocol released, not to --ablation", "--base")
        return choose_protocol(value, None, None)  # checks the value; auto -> native
    return choose_protocol(protocol or "auto", ckpt, base)


def check_sizes(bundle: InferenceBundle, size: int, ckpt: Path, data: str | Path) -> None:
    """The checkpoint's slice size must be the slices folder's."""
    if bundle.image_size != size:
        raise UserError(
            f"the checkpoint {ckpt} works on {bundle.image_size}x{bundle.image_size} slices but {data} holds "
            f"{size}x{size} slices; re-slice with `unibrain slice --size {bundle.image_size}` or use a matching "
            "checkpoint", "--data")


def ablation_folders(root: str | Path | None) -> dict[str, Path]:
    """Variant -> model folder of an ablation ``--ckpt`` (see the module docstring)."""
    if root is None:
        raise UserError("--ablation needs --ckpt pointing at a folder with A/, B/, C/ and full/ runs", "--ckpt")
    base = Path(root)
    if not base.is_dir():
        raise UserError("ablation folder not found; check the path", str(base))
    missing = [v for v in ABLATION_VARIANTS if not (base / v).is_dir()]
    if missing:
        raise UserError(f"the ablation folder lacks {', '.join(m + '/' for m in missing)}; train the variants "
                        "with `make experiments` (A/, B/, C/, full/ run folders)", str(base))
    return {v: resolve_checkpoint(base / v) for v in ABLATION_VARIANTS}


# ---------------------------------------------------------------------------------------------
# the model side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Bounds of generation: thinking/answer tokens per segment, Euler steps (None: recipe's), seed;
    and the scoring ``convention`` (``ours`` or ``paper``, :data:`CONVENTION_RULES`)."""

    thinking_tokens: int = DEFAULT_THINKING_TOKENS
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    steps: int | None = None
    seed: int = 0
    convention: str = "ours"
    #: slices run together (:meth:`ModelEvaluator.prefetch`, batched KV caches); 1 = one by one
    batch_size: int = 1


def _argmax_class(scores: Mapping[str, float]) -> str:
    """The closed-set prediction: the class of the highest score (ties: the first in order)."""
    return max(scores, key=lambda c: scores[c])


def _hit(pred: str | None, case: EvalCase) -> float:
    """1/0 Top-1 hit, NaN for a case without a disease label."""
    if not case.diseases:
        return math.nan
    return float(top1_hits([pred], [case.diseases])[0])


def image_scores(pred: np.ndarray, ref: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """PSNR/SSIM full field and in the evaluation region ``brain`` (NaN there when it is empty).

    ``brain`` is the reference brain (:attr:`EvalCase.brain`, a property of the ground truth); it
    selects the scored pixels only. ``pred`` must already be masked by the inputs' mask
    (:meth:`EvalCase.input_brain`), never by anything derived from ``ref``.
    """
    if brain.any():
        return imputation_metrics(pred, ref, brain)
    return {"psnr": psnr(pred, ref), "ssim": ssim(pred, ref), "psnr_brain": math.nan, "ssim_brain": math.nan}


def method_slice(draws: Sequence[np.ndarray], convention: str) -> np.ndarray:
    """float32 [S, S]: the slice a method contributes from its ``draws`` (one per seed): ``ours`` the
    mean of the float draws (the draw itself for one); ``paper`` the authors' uint8 slice
    (:func:`~unibrain_cli.evaluation.metrics.prediction_uint8`) / 255."""
    if convention == "paper":
        return (prediction_uint8(draws) / 255.0).astype(np.float32)
    return np.asarray(draws[0]) if len(draws) == 1 else np.mean(np.stack(draws), axis=0)


def convention_scores(draws: Sequence[np.ndarray], ref: np.ndarray, brain: np.ndarray, convention: str
                      ) -> dict[str, float]:
    """The Table-2 scores of a method's ``draws`` against ``ref``: ``ours`` :func:`image_scores` of
    :func:`method_slice`; ``paper`` :func:`~unibrain_cli.evaluation.metrics.paper_image_scores` of the
    uint8 slices, with ``psnr_brain``/``ssim_brain`` NaN (not part of that convention)."""
    if convention == "paper":
        return {**paper_image_scores(prediction_uint8(draws), reference_uint8(ref)),
                "psnr_brain": math.nan, "ssim_brain": math.nan}
    return image_scores(method_slice(draws, convention), ref, brain)


class ModelEvaluator:
    """Evaluates one checkpoint case by case, with per-case caches.

    Per case (until :meth:`reset`): the encoded views of its slices (one batched encode), the
    start contexts per input set (forked, never modified), and the imputed slices per
    (inputs, target, seed), so a slice is never generated twice.
    """

    def __init__(self, bundle: InferenceBundle, settings: Settings) -> None:
        self.engine = engine_for(bundle)
        self.known = tuple(bundle.recipe.data.modalities)
        self.settings = settings
        self._case: str | None = None
        self._encoded: dict[str, Any] = {}
        self._starts: dict[tuple[str, ...], GuidedContexts] = {}
        self.memo: dict[tuple[tuple[str, ...], str, int], np.ndarray] = {}
        # what :meth:`prefetch` computed for cases still to come (kept across :meth:`reset`):
        # (slice_id, scenario, method) -> (imputed images, row fields, seconds per row);
        # (slice_id, inputs, target, seed) -> imputed slice
        self._rows: dict[tuple[str, str, str], tuple[dict[str, np.ndarray], dict[str, Any], float]] = {}
        self._chains: dict[tuple[str, tuple[str, ...], str, int], np.ndarray] = {}

    # -- caches --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the per-case caches."""
        self._case, self._encoded, self._starts, self.memo = None, {}, {}, {}

    def _bind(self, case: EvalCase) -> None:
        if self._case != case.slice_id:
            self.reset()
            self._case = case.slice_id

    def encoded(self, case: EvalCase) -> dict[str, Any]:
        """Modality -> EncodedImage for the case's known modalities (one batched encode)."""
        self._bind(case)
        if not self._encoded:
            mods = [m for m in case.present if m in self.known]
            if mods:
                stack = torch.from_numpy(np.stack([case.image(m) for m in mods]))
                self._encoded = dict(zip(mods, self.engine.encode(stack, mods), strict=True))
        return self._encoded

    def start(self, case: EvalCase, inputs: tuple[str, ...]) -> GuidedContexts:
        """Contexts holding ``inputs`` (clean VAE + ViT); cached per case."""
        enc = self.encoded(case)
        if inputs not in self._starts:
            self._starts[inputs] = self.engine.start([enc[m] for m in inputs], INPUT_VIEWS)
        return self._starts[inputs]

    def context(self, case: EvalCase, mods: Sequence[str], views: Sequence[str],
                replace: dict[str, np.ndarray] | None = None) -> Context:
        """A fresh context with ``mods`` (canonical order) as ``views``; ``replace`` swaps in other slices."""
        enc = dict(self.encoded(case))
        for m, img in (replace or {}).items():
            enc[m] = self.engine.encode(torch.from_numpy(np.asarray(img, np.float32))[None], [m])[0]
        ctx = self.engine.new_context()
        self.engine.add_images(ctx, [enc[m] for m in canonical(mods)], views)  # type: ignore[arg-type]
        return ctx

    # -- protocol pieces -------------------------------------------------------------------------

    def closed_set(self, ctx: Context) -> str:
        """Argmax class of :func:`diagnosis_scores` (``ctx`` unchanged)."""
        return _argmax_class(diagnosis_scores(self.engine, ctx, DISEASES))

    def _tensors(self, case: EvalCase, mods: Sequence[str]) -> dict[str, torch.Tensor]:
        return {m: torch.from_numpy(case.image(m)) for m in mods}

    @staticmethod
    def _understanding_fields(case: EvalCase, scores: Mapping[str, float], ans: Answer | None) -> dict[str, Any]:
        """Row fields of the closed-set ``scores`` (argmax class) and the generated answer (None: not asked)."""
        closed = _argmax_class(scores)
        row: dict[str, Any] = {"pred_closed": closed, "top1_closed": _hit(closed, case)}
        if ans is not None:
            pred = extract_diagnosis(ans.diagnosis) or extract_diagnosis(ans.text)
            row.update(pred_text=pred or "", top1=_hit(pred, case), impression=ans.impression, answer=ans.text,
                       rouge1=rouge1_f(case.impression, ans.impression) if case.impression else math.nan)
        else:
            row.update(pred_text="", top1=math.nan, impression="", answer="", rouge1=math.nan)
        return row

    def _understand(self, case: EvalCase, ctx: Context) -> dict[str, Any]:
        """Closed-set prediction, then the generated answer (``ctx`` is consumed)."""
        scores = diagnosis_scores(self.engine, ctx, DISEASES)
        n = self.settings.answer_tokens
        ans = generate_answer(self.engine, ctx, templates.both_question(), n) if n > 0 else None
        return self._understanding_fields(case, scores, ans)

    def _understand_batch(self, cache: Any, cases: Sequence[EvalCase]) -> list[dict[str, Any]]:
        """:meth:`_understand` of rows 0..len(cases)-1 of a batched cache (consumed)."""
        rows = list(range(len(cases)))
        scores = diagnosis_scores_batch(self.engine, cache, rows, DISEASES)
        n = self.settings.answer_tokens
        answers = generate_answers(self.engine, cache, rows, templates.both_question(), n) if n > 0 else [None] * len(rows)
        return [self._understanding_fields(c, sc, a) for c, sc, a in zip(cases, scores, answers, strict=True)]

    # -- batches of cases ----------------------------------------------------------------------------

    def prefetch(self, cases: Sequence[EvalCase], scenarios: Sequence[str], chains: Sequence[str] = (),
                 seeds: Sequence[int] = (), unified: bool = True, understanding: bool = True) -> None:
        """Compute, ``settings.batch_size`` slices at a time over batched KV caches, what
        :meth:`unified_row`, :meth:`understanding_row` and :meth:`chain_images` then return for
        ``cases``: the same protocol and noise seeds, equal to the one-by-one results up to float
        rounding (tests/test_evaluate.py). No-op for ``batch_size`` 1. Rows are grouped by
        input set and targets; ``seconds`` of a row is its share of its batch."""
        size = self.settings.batch_size
        if size <= 1:
            return
        s, eng = self.settings, self.engine
        und: dict[tuple[str, ...], list[tuple[EvalCase, str]]] = {}
        uni: dict[tuple[tuple[str, ...], tuple[str, ...]], list[tuple[EvalCase, str]]] = {}
        for case in cases:
            for sc in scenarios:
                inputs = scenario_inputs(sc, case.present, self.known)
                if inputs is None:
                    continue
                if understanding:
                    und.setdefault(inputs, []).append((case, sc))
                if unified:
                    uni.setdefault((inputs, scenario_targets(inputs, case.present, self.known)), []).append((case, sc))
        covered = {(c.slice_id, k[0], k[1][0], s.seed) for k, members in uni.items() if k[1] for c, _ in members}
        more: dict[tuple[tuple[str, ...], str], list[tuple[EvalCase, int]]] = {}
        for key in chains if unified else ():
            inputs, target = parse_chain(key)
            for case in cases:
                if chain_applies(inputs, target, case.present, self.known):
                    more.setdefault((inputs, target), []).extend(
                        (case, int(seed)) for seed in seeds if (case.slice_id, inputs, target, int(seed)) not in covered)

        def chunks(items: list[Any]) -> Iterator[list[Any]]:
            for i in range(0, len(items), size):
                yield items[i:i + size]

        for inputs, members in und.items():
            for part in chunks(members):
                t0 = time.perf_counter()
                batch = [c for c, _ in part]
                enc = eng.encode(torch.from_numpy(np.stack([c.image(m) for c in batch for m in inputs])),
                                 list(inputs) * len(batch))
                cache = eng.model.new_batch_cache(len(batch))
                append_images(eng, cache, list(range(len(batch))),
                              [enc[i * len(inputs):(i + 1) * len(inputs)] for i in range(len(batch))], UNDERSTANDING_VIEWS)
                fields = self._understand_batch(cache, batch)
                dt = (time.perf_counter() - t0) / len(batch)
                for (c, sc), row in zip(part, fields, strict=True):
                    self._rows[(c.slice_id, sc, METHOD_UND)] = ({}, row, dt)
        for (inputs, targets), members in uni.items():
            for part in chunks(members):
                t0 = time.perf_counter()
                batch = [c for c, _ in part]
                res = self._impute([(c, s.seed) for c in batch], inputs, list(targets))
                fields = self._understand_batch(res.contexts.cond, batch)
                dt = (time.perf_counter() - t0) / len(batch)
                for i, ((c, sc), row) in enumerate(zip(part, fields, strict=True)):
                    self._rows[(c.slice_id, sc, METHOD_UNIFIED)] = ({t: res.images[t][i].numpy() for t in targets}, row, dt)
        for (inputs, target), members in more.items():
            for part in chunks(members):
                res = self._impute(part, inputs, [target])
                for i, (c, seed) in enumerate(part):
                    self._chains[(c.slice_id, inputs, target, seed)] = res.images[target][i].numpy()

    def _impute(self, rows: Sequence[tuple[EvalCase, int]], inputs: tuple[str, ...], targets: list[str]):
        """:func:`impute_chains` of (case, seed) rows from the cases' real ``inputs``."""
        s = self.settings
        return impute_chains(
            self.engine, {m: torch.from_numpy(np.stack([c.image(m) for c, _ in rows])) for m in inputs}, targets,
            [seed for _, seed in rows], thinking_tokens=s.thinking_tokens,
            brain=torch.from_numpy(np.stack([c.input_brain(inputs) for c, _ in rows]).astype(np.float32)), steps=s.steps)

    def unified_row(self, case: EvalCase, scenario: str) -> dict[str, Any] | None:
        """Table 1, UniBrain: inputs, imputed chain with thinking, answer. None outside the cohort."""
        inputs = scenario_inputs(scenario, case.present, self.known)
        if inputs is None:
            return None
        targets = scenario_targets(inputs, case.present, self.known)
        s = self.settings
        pre = self._rows.pop((case.slice_id, scenario, METHOD_UNIFIED), None)
        if pre is None:
            t0 = time.perf_counter()
            res = impute_chain(self.engine, self._tensors(case, inputs), list(targets), s.seed,
                               thinking_tokens=s.thinking_tokens, answer_tokens=0,
                               brain=torch.from_numpy(case.input_brain(inputs).astype(np.float32)),
                               start=self.start(case, inputs), steps=s.steps)
            images = {t: res.images[t].numpy() for t in targets}
            row = self._understand(case, res.contexts.cond)
            seconds = time.perf_counter() - t0
        else:
            images, row, seconds = pre
            self._bind(case)
        if targets:
            self.memo.setdefault((inputs, targets[0], s.seed), images[targets[0]])
        row.update(method=METHOD_UNIFIED, inputs="|".join(inputs), imputed="|".join(targets), seconds=seconds)
        if s.convention == "paper":  # the authors score the last target of the chain
            for t in scored_targets(targets, "paper"):
                scores = paper_image_scores(prediction_uint8([images[t]]), reference_uint8(case.image(t)))
                row.update(scored_target=t, **scores)
        return row

    def understanding_row(self, case: EvalCase, scenario: str) -> dict[str, Any] | None:
        """Table 1, Und.: the inputs as ViT views only, no imputation. None outside the cohort."""
        inputs = scenario_inputs(scenario, case.present, self.known)
        if inputs is None:
            return None
        pre = self._rows.pop((case.slice_id, scenario, METHOD_UND), None)
        if pre is None:
            t0 = time.perf_counter()
            row = self._understand(case, self.context(case, inputs, UNDERSTANDING_VIEWS))
            seconds = time.perf_counter() - t0
        else:
            _, row, seconds = pre
        row.update(method=METHOD_UND, inputs="|".join(inputs), imputed="", seconds=seconds)
        return row

    def chain_images(self, case: EvalCase, inputs: tuple[str, ...], target: str, seeds: Sequence[int]) -> list[np.ndarray]:
        """Imputed ``target`` [S, S] from real ``inputs``, one per seed (memoised per case)."""
        self._bind(case)  # a new case drops the memo before it is read
        s = self.settings
        out = []
        for seed in seeds:
            key = (inputs, target, int(seed))
            pre = self._chains.pop((case.slice_id, inputs, target, int(seed)), None)
            if pre is not None:
                self.memo.setdefault(key, pre)
            if key not in self.memo:
                res = impute_chain(self.engine, self._tensors(case, inputs), [target], int(seed),
                                   thinking_tokens=s.thinking_tokens, answer_tokens=0,
                                   brain=torch.from_numpy(case.input_brain(inputs).astype(np.float32)),
                                   start=self.start(case, inputs), steps=s.steps)
                self.memo[key] = res.images[target].numpy()
            out.append(self.memo[key])
        return out

    def usability(self, case: EvalCase, target: str, image: np.ndarray, views: Sequence[str] = INPUT_VIEWS) -> float:
        """Closed-set Top-1 hit of the complete-data context with ``image`` in place of the real ``target``."""
        mods = [m for m in case.present if m in self.known]
        return _hit(self.closed_set(self.context(case, mods, views, {target: image})), case)


# ---------------------------------------------------------------------------------------------
# one evaluation pass
# ---------------------------------------------------------------------------------------------


@dataclass
class Baselines:
    """Fitted baselines: copy-nearest, per-chain U-Nets and per-scenario diagnosis CNNs (None/empty
    when not asked)."""

    copy: CopyNearestBaseline | None = None
    unets: dict[str, UNetBaseline] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    #: wall time of each chain U-Net's training (seconds), by chain key
    unet_seconds: dict[str, float] = field(default_factory=dict)
    cnns: dict[str, ClassifierReference] = field(default_factory=dict)


@dataclass
class PassResult:
    """Per-case rows of one model pass, its timing and qualitative picks."""

    table1: list[dict[str, Any]] = field(default_factory=list)
    table2: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    qualitative: list[figures.QualitativeRow] = field(default_factory=list)


def _base(case: EvalCase) -> dict[str, Any]:
    return {"case_id": case.case_id, "slice_id": case.slice_id, "diseases": "|".join(case.diseases),
            "reference": case.impression}


def ensemble_name(n: int) -> str:
    """Table-2 row of the seed ensemble."""
    return f"{METHOD_UNIFIED}* ({n} seeds)"


def evaluate_pass(
    ev: ModelEvaluator,
    cases: Sequence[EvalCase],
    scenarios: Sequence[str],
    chains: Sequence[str] = (),
    unified: bool = True,
    understanding: bool = True,
    ensemble: int = 1,
    baselines: Baselines | None = None,
    qualitative: int = 0,
    progress: Any = None,
) -> PassResult:
    """Run one model over ``cases``: Table-1 rows for ``scenarios`` (UniBrain and/or Und.), Table-2 rows
    for ``chains`` (UniBrain, the ensemble and the baselines), one row per slice. ``qualitative``
    picks come from the cases' representative slices only (:attr:`EvalCase.is_eval`). ``progress``
    is a (Progress, task) pair."""
    res = PassResult()
    conv = ev.settings.convention
    seeds = [ev.settings.seed + j for j in range(ensemble)]
    parsed = [(key, *parse_chain(key)) for key in chains]
    step = max(1, ev.settings.batch_size)
    shared = 0.0  # per case, its share of the batch computed ahead
    for i, case in enumerate(cases):
        if i % step == 0:  # the next batch of cases, computed together (no-op one by one)
            t0 = time.perf_counter()
            ev.prefetch(cases[i:i + step], scenarios, chains, seeds, unified, understanding)
            shared = (time.perf_counter() - t0) / len(cases[i:i + step])
        t0 = time.perf_counter() - shared
        ev.reset()
        for sc in scenarios:
            for want, fn in ((understanding, ev.understanding_row), (unified, ev.unified_row)):
                row = fn(case, sc) if want else None
                if row is not None:
                    res.table1.append({**_base(case), "scenario": sc, **row})
        picked: list[tuple[str, tuple[str, ...], str, np.ndarray]] = []
        for key, inputs, target in parsed:
            if not chain_applies(inputs, target, case.present, ev.known):
                continue
            truth = case.image(target)
            rows: list[tuple[str, list[np.ndarray], float]] = []  # (method, draws, usability)
            if unified:
                images = ev.chain_images(case, inputs, target, seeds)
                rows.append((METHOD_UNIFIED, images[:1], ev.usability(case, target, method_slice(images[:1], conv))))
                picked.append((key, inputs, target, images[0]))
                if ensemble > 1:
                    rows.append((ensemble_name(ensemble), images,
                                 ev.usability(case, target, method_slice(images, conv))))
            if baselines is not None:
                args = (case.images, None, case.input_brain(inputs), inputs, target)
                if baselines.copy is not None:
                    rows.append((METHOD_COPY, [baselines.copy.impute(*args)], math.nan))
                if key in baselines.unets:
                    img = baselines.unets[key].impute(*args)
                    if "unet" in baselines.names:
                        rows.append((METHOD_UNET, [img], math.nan))
                    if "two-stage" in baselines.names:
                        rows.append((METHOD_TWO_STAGE, [img], ev.usability(case, target, method_slice([img], conv),
                                                                            UNDERSTANDING_VIEWS)))
            for method, draws, usable in rows:
                res.table2.append({"method": method, "chain": key, "case_id": case.case_id, "slice_id": case.slice_id,
                                   **convention_scores(draws, truth, case.brain, conv), "usability": usable,
                                   "seeds": ensemble if method == ensemble_name(ensemble) else 1})
        if case.is_eval and _case_count(res.qualitative) < qualitative:  # one slice per case in the figure
            if not picked:  # no Table-2 chain: the first targets of the Table-1 chains are chain images too
                picked = [(chain_key(i, t), i, t, img) for (i, t, s), img in ev.memo.items()
                          if s == ev.settings.seed and chain_key(i, t) in CHAIN_KEYS]
            for key, inputs, target, img in picked:
                res.qualitative.append(figures.QualitativeRow(
                    label=f"{case.case_id}\n{tables.chain_label(key)}", inputs={m: case.image(m) for m in inputs},
                    imputed=img, truth=case.image(target), target=target,
                    brain=case.brain if case.brain.any() else None))
        res.seconds.append(time.perf_counter() - t0)
        ev.reset()
        if progress is not None:
            progress[0].advance(progress[1])
    return res


def cnn_rows(models: Mapping[str, ClassifierReference], cases: Sequence[EvalCase], known: Sequence[str]
             ) -> list[dict[str, Any]]:
    """Table 1, CNN reference: per scenario -> classifier of ``models``, the class it predicts for every
    case of the scenario's cohort (the UniBrain rows' cohort: :func:`scenario_inputs` with the model's
    ``known`` modalities), all of a scenario's cases in one call. ``top1`` = ``top1_closed`` = the hit
    (:func:`_hit`: NaN without a disease label); ``inputs`` what the CNN sees (the case's scenario
    inputs); no text, so ``rouge1`` / ``rate`` stay NaN. ``seconds``: the row's share of the call."""
    rows: list[dict[str, Any]] = []
    for sc, model in models.items():
        cohort = [c for c in cases if scenario_inputs(sc, c.present, known) is not None]
        if not cohort:
            continue
        t0 = time.perf_counter()
        present = np.array([[m in c.present for m in MODALITIES] for c in cohort])
        preds = model.predict(np.stack([c.images for c in cohort]), present)
        seconds = (time.perf_counter() - t0) / len(cohort)
        for case, pred in zip(cohort, preds, strict=True):
            hit = _hit(pred, case)
            rows.append({**_base(case), "scenario": sc, "method": METHOD_CNN,
                         "inputs": "|".join(scenario_inputs(sc, case.present) or ()), "imputed": "",
                         "pred_text": pred, "pred_closed": pred, "top1": hit, "top1_closed": hit,
                         "rouge1": math.nan, "rate": math.nan, "impression": "", "answer": "", "seconds": seconds})
    return rows


#: The probe's (input, target): the paper's first chain, T1 -> T2.
PROBE_CHAIN: tuple[str, str] = ("t1", "t2")


def run_probe(ev: ModelEvaluator, cases: Sequence[EvalCase]) -> dict[str, Any] | None:
    """The T1 -> T2 conditioning probe (:func:`~unibrain_cli.evaluation.probe.probe_slices`) on the
    first :data:`PROBE_MAX_SLICES` of ``cases`` holding T1 and T2, with the evaluator's engine and
    seed. Adds ``chain``, ``case_ids`` and ``seconds``; None with fewer than 2 such cases (or a model
    that does not know both modalities)."""
    src, tgt = PROBE_CHAIN
    if src not in ev.known or tgt not in ev.known:
        return None
    picked = [c for c in cases if src in c.present and tgt in c.present][:PROBE_MAX_SLICES]
    if len(picked) < 2:
        return None
    t0 = time.perf_counter()
    res = probe_slices(ev.engine, [(c.image(src), c.image(tgt)) for c in picked], src, tgt, seed=ev.settings.seed)
    return {"chain": chain_key((src,), tgt), **res, "case_ids": [c.case_id for c in picked],
            "seconds": time.perf_counter() - t0}


def probe_line(probe: dict[str, Any]) -> str:
    """The one-line summary of :func:`run_probe`'s result shown under Table 2."""
    src, tgt = (tables.PAPER_MODALITY[m] for m in PROBE_CHAIN)
    return (f"Conditioning probe ({src} → {tgt}, n={probe['n']}): one-step PSNR with the case's own {src} "
            f"{probe['psnr_own']:.2f} dB, another case's {src} {probe['psnr_other']:.2f} dB, no image "
            f"{probe['psnr_none']:.2f} dB; conditioning gap (own - other) {probe['conditioning_gap_db']:+.2f} dB. "
            f"One sampled image each (no thinking, same noise): {probe['psnr_sampled_own']:.2f} / "
            f"{probe['psnr_sampled_other']:.2f} / {probe['psnr_sampled_none']:.2f} dB, gap "
            f"{probe['sampled_gap_db']:+.2f} dB.")


def unet_time_line(unet_seconds: dict[str, float], steps: int, unified_seconds: float | None) -> str:
    """The footer under Table 2 that sets the U-Nets' training time beside the unified stage's (issue 13:
    the supervised reference gets no more wall time than the model it is compared with)."""
    total = sum(unet_seconds.values())
    per = ", ".join(f"{tables.chain_label(k)} {s:.0f} s" for k, s in unet_seconds.items())
    unified = (f"{unified_seconds:.0f} s (the run's metrics.jsonl)" if unified_seconds is not None
               else "unknown (a model folder, not a training run)")
    return (f"Training time: U-Nets {total:.0f} s in all, {steps} steps each ({per}); the checkpoint's unified "
            f"stage {unified}.")


def thinking_plan_line(plan: str, thinking_tokens: int) -> str | None:
    """The tables' note on how each thinking text starts (None without thinking)."""
    if thinking_tokens <= 0:
        return None
    if plan == "forced":
        return ("Thinking: the planning sentence is given (the data flow's template for the known inputs and the "
                f"target; flow.thinking_plan = forced), the model writes up to {thinking_tokens} tokens after it.")
    return f"Thinking: generated by the model (up to {thinking_tokens} tokens; flow.thinking_plan = generated)."


def _case_seconds(cases: Sequence[EvalCase], seconds: Sequence[float]) -> list[float]:
    """Seconds per case (the sum over its evaluated slices), in order of first appearance."""
    out: dict[str, float] = {}
    for case, t in zip(cases, seconds, strict=True):
        out[case.case_id] = out.get(case.case_id, 0.0) + t
    return list(out.values())


def _case_count(rows: Sequence[figures.QualitativeRow]) -> int:
    return len({r.label.split("\n", 1)[0] for r in rows})


def fit_baselines(data: str | Path, names: Sequence[str], chains: Sequence[str], steps: int, seed: int,
                  device: str, progress: bool, scenarios: Sequence[str] = (),
                  cnn_steps: int = DEFAULT_CNN_STEPS) -> Baselines:
    """Fit the asked baselines on the train split: copy-nearest and the U-Nets (``steps`` steps) for
    ``chains`` (none without), one diagnosis CNN (``cnn_steps`` steps) per scenario of ``scenarios``."""
    out = Baselines(names=tuple(names))
    unet = ("unet" in names or "two-stage" in names) and bool(chains)
    if unet and steps < 1:
        raise UserError(f"must be >= 1, got {steps}", "--unet-steps")
    if "cnn" in names and cnn_steps < 1:
        raise UserError(f"must be >= 1, got {cnn_steps}", "--cnn-steps")
    try:
        if "copy" in names and chains:
            out.copy = fit_copy_nearest(data, "train")
        if unet:
            for key in chains:
                inputs, target = parse_chain(key)
                t0 = time.perf_counter()
                out.unets[key] = train_unet(data, inputs, target, steps, seed, device, progress=progress)
                out.unet_seconds[key] = time.perf_counter() - t0
        if "cnn" in names:
            for sc in scenarios:
                out.cnns[sc] = train_classifier(data, sc, steps=cnn_steps, seed=seed, device=device)
    except UserError as exc:
        raise UserError(f"{exc.message} (baselines; pass --baselines none to skip them)", exc.where) from exc
    return out


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _frame(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(list(rows), columns=list(columns))
    for c in ("top1", "top1_closed", "rouge1", "rate", "psnr", "ssim", "psnr_brain", "ssim_brain", "usability",
              "seconds"):
        if c in frame.columns:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(np.float64)
    return frame


def _add_column(table: Table, frame: pd.DataFrame, keys: Sequence[str], groups: Sequence[tuple[str, ...]],
                metric: Metric, after: str, n_boot: int, seed: int) -> Table:
    """Add ``metric`` (mean/CI/n) to a table's summary and a display column after ``after``."""
    extra = summarize(frame, keys, [metric], groups, n_boot, seed)
    for suffix in ("mean", "lo", "hi", "n"):
        table.summary[f"{metric.column}_{suffix}"] = extra[f"{metric.column}_{suffix}"].to_numpy()
    cells = [format_cell(r, metric) for r in extra.to_dict("records")]
    table.display.insert(list(table.display.columns).index(after) + 1, metric.label, cells)
    return table


TABLE1_LAST_PSNR = Metric("psnr", "PSNR last target (dB)")
TABLE1_LAST_SSIM = Metric("ssim", "SSIM last target", digits=4)


def build_table1(frame: pd.DataFrame, scenarios: Sequence[str], n_boot: int, seed: int, rate_note: str,
                 convention: str = "ours", cnn_steps: int | None = None) -> Table:
    """Table 1 with the closed-set Top-1 column next to the generated-text Top-1; under the ``paper``
    convention also PSNR/SSIM of the last imputed target of each UniBrain chain ("-" where nothing
    was imputed). ``cnn_steps`` (None: no CNN) adds the CNN reference rows after UniBrain's, with
    "-" for their ROUGE-1 and RaTE (no text)."""
    methods = [METHOD_UND, METHOD_UNIFIED] + ([METHOD_CNN] if cnn_steps is not None else [])
    notes = [
        "Top-1: the class named in the generated 'Final Diagnosis' (synonym table of evaluation/diagnosis.py); "
        "Top-1 closed-set: argmax of the five class answers' log-likelihoods on the same context.",
        f"{METHOD_UND}: the same model, inputs as ViT tokens only, no imputation. {METHOD_UNIFIED}: inputs as "
        "VAE + ViT, the case's missing modalities imputed in canonical order with thinking, then the answer.",
        f"RaTE: {rate_note}.",
    ]
    if cnn_steps is not None:
        notes.append(f"{METHOD_CNN}: a supervised 97k-parameter CNN per scenario ({cnn_steps} steps of "
                     f"{CNN_BATCH_SIZE} train-split slices, evaluation/classifier.py), the scenario's real input "
                     "slices only; the ceiling of a dedicated image classifier, not a generative model. "
                     "ROUGE / RaTE: no text ('-').")
    if convention == "paper":
        notes.append("PSNR/SSIM last target (paper convention): the last imputed modality of each UniBrain chain "
                     "(column scored_target of table1_cases.csv; it differs between cases with other modality sets), "
                     "one draw, uint8/255 over the whole slice. '-' = nothing imputed.")
    t = tables.table1(frame, methods=methods, scenarios=scenarios, n_boot=n_boot, seed=seed, notes=notes)
    groups = [(m, s) for m in methods for s in scenarios]
    t = _add_column(t, frame, ("method", "scenario"), groups, TOP1_CLOSED, tables.TABLE1_METRICS[0].label,
                    n_boot, seed)
    if convention == "paper":
        after = tables.TABLE1_METRICS[-1].label
        for metric in (TABLE1_LAST_SSIM, TABLE1_LAST_PSNR):  # inserted after RaTE: PSNR, then SSIM
            t = _add_column(t, frame, ("method", "scenario"), groups, metric, after, n_boot, seed)
            t.display[metric.label] = [NOT_RUN if v == tables.UNAVAILABLE else v for v in t.display[metric.label]]
    for metric in tables.TABLE1_METRICS[1:]:  # the CNN writes no text: ROUGE-1 / RaTE not measured
        t.display[metric.label] = [NOT_RUN if m == METHOD_CNN and v != tables.EMPTY else v
                                   for m, v in zip(t.summary["method"], t.display[metric.label])]
    return t


def build_table2(frame: pd.DataFrame, methods: Sequence[str], chains: Sequence[str], n_boot: int, seed: int,
                 convention: str = "ours") -> Table:
    """Table 2; usability shows "-" for the image-only baselines (not measured). The ``paper``
    convention has no brain-masked columns."""
    notes = [
        "Usability (Top-1): closed-set Top-1 of UniBrain when the imputed slice replaces the real one in the "
        "complete-data context (VAE + ViT); two-stage: the U-Net slice in the understanding-only (ViT) context.",
        "Chains start from real inputs. copy-nearest: most similar input, histogram-matched to the training "
        "mean; U-Net: one supervised U-Net per chain trained on the train split. '-' = not measured.",
    ]
    metrics = tables.TABLE2_PAPER_METRICS if convention == "paper" else tables.TABLE2_METRICS
    t = tables.table2(frame, methods=methods, chains=chains, n_boot=n_boot, seed=seed, notes=notes, metrics=metrics)
    label = tables.TABLE2_METRICS[4].label
    measured = {METHOD_UNIFIED, METHOD_TWO_STAGE} | {m for m in methods if m.startswith(METHOD_UNIFIED + "*")}
    t.display[label] = [v if m in measured or v == tables.EMPTY else NOT_RUN
                        for m, v in zip(t.summary["method"], t.display[label])]
    return t


def to_rich(table: Table):  # -> rich.table.Table
    """A rich table of a :class:`Table`'s display frame (footer and first note as caption)."""
    from rich.table import Table as RichTable

    rt = RichTable(title=table.title, caption="\n".join([*table.footer, *table.notes[:1]]), show_lines=False)
    for c in table.display.columns:
        rt.add_column(str(c), overflow="fold")
    for row in table.display.itertuples(index=False):
        rt.add_row(*[str(v) for v in row])
    return rt


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote: the folder, the tables, the figure paths and the eval.json summary."""

    out: Path
    tables: dict[str, Table]
    figures: dict[str, Path]
    summary: dict[str, Any]
    files: list[Path]


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from unibrain_cli.io.console import progress_bar

    with progress_bar(transient=True) as bar:
        yield bar


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _load(folder: Path, device: str, size: int, data: str | Path, cfg_img_scale: float | None = None,
          thinking_plan: str | None = None) -> InferenceBundle:
    bundle = load_for_inference(folder, device)
    check_sizes(bundle, size, folder, data)
    flow = bundle.recipe.flow
    if cfg_img_scale is not None:  # image guidance of the sampler instead of the recipe's
        flow = dataclasses.replace(flow, cfg_img_scale=float(cfg_img_scale))
    if thinking_plan is not None:  # the thinking's planning sentence instead of the recipe's
        flow = dataclasses.replace(flow, thinking_plan=thinking_plan)
    return bundle._replace(recipe=dataclasses.replace(bundle.recipe, flow=flow))


#: ``--thinking-plan`` values (``flow.thinking_plan``).
THINKING_PLANS: tuple[str, ...] = get_args(ThinkingPlan)


def evaluate(
    ckpt: str | Path | None,
    data: str | Path | None,
    out: str | Path | None,
    split: str = "test",
    scenarios: str | Sequence[str] = ("t1", "t1_t2", "t1_t2_flair", "complete"),
    chain: bool = True,
    ensemble: int = 1,
    ablation: bool = False,
    ratescore_models: str | Path | None = None,
    baselines: str | Sequence[str] = ("copy",),
    unet_steps: int = DEFAULT_UNET_STEPS,
    cnn_steps: int = DEFAULT_CNN_STEPS,
    max_cases: int = 0,
    seed: int = 0,
    steps: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    force: bool = False,
    thinking_tokens: int | None = None,
    answer_tokens: int | None = None,
    cfg_img_scale: float | None = None,
    convention: str | None = None,
    protocol: str = "native",
    base: str | Path | None = None,
    batch_size: int | None = None,
    eval_slices: str = "eval",
    thinking_plan: str | None = None,
) -> EvalResult:
    """Evaluate a checkpoint on a SLICES folder like the paper's Tables 1-3 (module docstring);
    ``convention`` ``"ours"`` or ``"paper"`` (the authors' metric rules, :data:`CONVENTION_RULES`;
    None: ``ours``, ``paper`` with the released protocol).

    ``protocol`` ``native`` | ``released`` | ``auto`` (:func:`~unibrain_cli.released.folder.choose_protocol`;
    ``base`` = ``--base``): ``released`` runs :func:`~unibrain_cli.released.evaluate.evaluate_released`
    (token bounds None = the authors' 800 / 512). ``ablation`` is native only. Token bounds None =
    :data:`DEFAULT_THINKING_TOKENS` / :data:`DEFAULT_ANSWER_TOKENS` for ``native``. ``batch_size``
    (native only; None = :data:`DEFAULT_BATCH_SIZE`): slices generated together
    (:meth:`ModelEvaluator.prefetch`). ``eval_slices`` ``"eval"`` (one slice per case) or ``"all"``
    (every stored slice of each case, scored per case; native protocol, ``ours`` convention only;
    :func:`load_cases`, :func:`check_eval_slices`). ``baselines`` ``cnn`` (native only) trains one
    diagnosis CNN per scenario for ``cnn_steps`` steps (:func:`fit_baselines`, :func:`cnn_rows`).
    ``thinking_plan`` (native only; None = the recipe's ``flow.thinking_plan``): ``generated`` or
    ``forced`` planning sentence of each thinking text (:func:`~unibrain_cli.inference.engine.thinking_prompt`).
    """
    chosen = choose_evaluation_protocol(protocol, ckpt, base, ablation)
    check_eval_slices(eval_slices, convention, chosen)
    if chosen == "released":
        if batch_size is not None:
            raise UserError("the released protocol runs one slice at a time, as the authors' code does; drop "
                            "--batch-size or use --protocol native", "--batch-size")
        if thinking_plan is not None:
            raise UserError("the released protocol's thinking is the authors' (generated after their system "
                            "prompt); drop --thinking-plan or use --protocol native", "--thinking-plan")
        if cfg_img_scale is not None:
            raise UserError("the released protocol's guidance is fixed (text 3, image 1.2); drop --cfg-img-scale "
                            "or use --protocol native", "--cfg-img-scale")
        from unibrain_cli.released.evaluate import evaluate_released
        from unibrain_cli.released.protocol import DIAGNOSIS_MAX_LENGTH, THINK_MAX_LENGTH

        return evaluate_released(
            ckpt, base, data, out, split=split, scenarios=scenarios, chain=chain, ensemble=ensemble,
            ratescore_models=ratescore_models, baselines=baselines, unet_steps=unet_steps, max_cases=max_cases,
            seed=seed, steps=steps, device=device, progress=progress, force=force,
            think_max_length=THINK_MAX_LENGTH if thinking_tokens is None else thinking_tokens,
            answer_max_length=DIAGNOSIS_MAX_LENGTH if answer_tokens is None else answer_tokens,
            convention="paper" if convention is None else convention)
    thinking_tokens = DEFAULT_THINKING_TOKENS if thinking_tokens is None else thinking_tokens
    answer_tokens = DEFAULT_ANSWER_TOKENS if answer_tokens is None else answer_tokens
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size < 1:
        raise UserError(f"must be at least 1, got {batch_size}", "--batch-size")
    convention = "ours" if convention is None else convention
    t_start = time.perf_counter()
    scen = parse_scenarios(scenarios)
    names = parse_baselines(baselines)
    _check_convention(convention)
    if thinking_tokens < 0 or answer_tokens < 0:
        raise UserError("token bounds must be >= 0", "--thinking-tokens/--answer-tokens")
    if cfg_img_scale is not None and not (math.isfinite(cfg_img_scale) and cfg_img_scale >= 0):
        raise UserError(f"must be a finite number >= 0, got {cfg_img_scale}", "--cfg-img-scale")
    if thinking_plan is not None and thinking_plan not in THINKING_PLANS:
        raise UserError(f"must be one of {', '.join(THINKING_PLANS)}, got '{thinking_plan}'", "--thinking-plan")
    out_dir, rate_reason = check_common_flags(out, force, data, ensemble, max_cases, steps, ratescore_models)
    variants = ablation_folders(ckpt) if ablation else {"full": resolve_checkpoint(ckpt)}
    cases, size = load_cases(data, split, max_cases, seed, convention, eval_slices)
    reps = one_per_case(cases)  # each case's eval slice: the probe and the qualitative figure
    conv = convention_summary(convention, data, split, reps)
    conv_line = convention_line(conv)
    slices_line = None
    if eval_slices == "all":
        conv["slice"] = ("every stored slice of each case (--eval-slices all), each scored on its own; a case's "
                         "score is the mean over its slices")
        slices_line = eval_slices_line(len(cases), len(reps))
    chains = CHAIN_KEYS if chain else ()
    base = fit_baselines(data, names, chains, unet_steps, seed, device, progress, scen, cnn_steps) \
        if names and (chains or "cnn" in names) else Baselines()
    t_fit = time.perf_counter() - t_start

    bundle = _load(variants["full"], device, size, data, cfg_img_scale, thinking_plan)
    recipe = bundle.recipe
    run_dir = run_folder_of(variants["full"])
    unified_seconds = stage_train_seconds(run_dir, "unified") if run_dir is not None else None
    settings = Settings(thinking_tokens, answer_tokens, steps, seed, convention, batch_size)
    main_ev = ModelEvaluator(bundle, settings)
    with _progress(progress) as bar:
        task = bar.add_task("evaluate", total=len(cases)) if bar is not None else None
        main = evaluate_pass(main_ev, cases, scen, chains, ensemble=ensemble,
                             baselines=base, qualitative=QUALITATIVE_CASES,
                             progress=(bar, task) if bar is not None else None)
    probe = run_probe(main_ev, reps) if chains else None
    main.table1 += cnn_rows(base.cnns, cases, main_ev.known)
    del main_ev, bundle
    abl1: list[dict[str, Any]] = []
    abl2: list[dict[str, Any]] = []
    abl_seconds: dict[str, float] = {}
    if ablation:
        chain3 = tables.ABLATION_CHAIN
        for variant, (row_name, (unified, _sa, _dhs)) in ABLATION_VARIANTS.items():
            if variant == "full" and "t1" in scen and chain3 in chains:
                part = PassResult([r for r in main.table1 if r["method"] == METHOD_UNIFIED and r["scenario"] == "t1"],
                                  [r for r in main.table2 if r["method"] == METHOD_UNIFIED and r["chain"] == chain3],
                                  main.seconds)
            else:
                ev = ModelEvaluator(_load(variants[variant], device, size, data, cfg_img_scale, thinking_plan), settings)
                with _progress(progress) as bar:
                    task = bar.add_task(f"ablation {variant}", total=len(cases)) if bar is not None else None
                    part = evaluate_pass(ev, cases, ("t1",), (chain3,) if unified else (), unified=unified,
                                         understanding=not unified,
                                         progress=(bar, task) if bar is not None else None)
                del ev
            abl1 += [{**r, "method": row_name} for r in part.table1
                     if r["method"] == (METHOD_UNIFIED if unified else METHOD_UND)]
            abl2 += [{**r, "method": row_name} for r in part.table2 if r["method"] == METHOD_UNIFIED]
            abl_seconds[row_name] = float(np.mean(_case_seconds(cases, part.seconds))) if part.seconds else math.nan

    # RaTEScore over every generated impression at once (None: unavailable)
    rate_note = score_ratescore(main.table1, rate_reason, ratescore_models)
    score_ratescore(abl1, rate_reason, ratescore_models)

    n_boot = recipe.eval.bootstrap
    frame1 = _frame(main.table1, TABLE1_COLUMNS)  # one row per slice: the *_cases.csv files
    frame2 = _frame(main.table2, TABLE2_COLUMNS)
    case1 = tables.per_case_mean(frame1, ("method", "scenario"))  # one row per case: the tables
    case2 = tables.per_case_mean(frame2, ("method", "chain"))
    made: dict[str, Table] = {"table1": build_table1(case1, scen, n_boot, seed, rate_note, convention,
                                                     cnn_steps if base.cnns else None)}
    made["table1_classes"] = tables.closed_set_by_class(
        frame1, DISEASES, [METHOD_UND, METHOD_UNIFIED] + ([METHOD_CNN] if base.cnns else []), scen)
    if chains:
        methods2 = [METHOD_UNIFIED] + ([ensemble_name(ensemble)] if ensemble > 1 else [])
        methods2 += [m for b, m in (("copy", METHOD_COPY), ("unet", METHOD_UNET), ("two-stage", METHOD_TWO_STAGE))
                     if b in names]
        made["table2"] = build_table2(case2, methods2, chains, n_boot, seed, convention)
        if probe is not None:
            made["table2"].footer.append(probe_line(probe))
        if base.unet_seconds:
            made["table2"].footer.append(unet_time_line(base.unet_seconds, unet_steps, unified_seconds))
    if ablation:
        comps = {name: flags for name, flags in ABLATION_VARIANTS.values()}
        made["table3"] = tables.table3(tables.per_case_mean(_frame(abl1, TABLE1_COLUMNS), ("method", "scenario")),
                                       tables.per_case_mean(_frame(abl2, TABLE2_COLUMNS), ("method", "chain")), comps,
                                       n_boot=n_boot, seed=seed,
                                       notes=["A: understanding-only protocol; B, C, UniBrain: unified protocol "
                                              "(inputs, imputation with thinking, answer)."])
    plan_line = thinking_plan_line(recipe.flow.thinking_plan, thinking_tokens)
    for t in made.values():
        t.notes.append(conv_line)
        if slices_line is not None:
            t.notes.append(slices_line)
        if plan_line is not None:
            t.notes.append(plan_line)

    case_seconds = _case_seconds(cases, main.seconds)
    per_case = float(np.mean(case_seconds)) if case_seconds else math.nan
    summary: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "protocol": "native",
        "checkpoint": str(variants["full"]),
        "ablation_checkpoints": {k: str(v) for k, v in variants.items()} if ablation else None,
        "data": str(data), "split": split, "image_size": size,
        "cases": len(reps), "case_ids": [c.case_id for c in reps], "eval_slices": eval_slices, "slices": len(cases),
        "scenarios": list(scen), "chains": list(chains), "ensemble": ensemble, "baselines": list(names),
        "seed": seed, "device": device, "thinking_tokens": thinking_tokens, "answer_tokens": answer_tokens,
        "batch_size": batch_size, "sample_steps": steps or recipe.flow.sample_steps, "cfg_img_scale": recipe.flow.cfg_img_scale,
        "thinking_plan": recipe.flow.thinking_plan,
        "cfg_text_scale": recipe.flow.cfg_text_scale, "unet_steps": unet_steps if base.unets else None,
        "cnn_steps": cnn_steps if base.cnns else None,
        "bootstrap": n_boot, "ratescore": rate_note, "convention": conv,
        "cohorts": {
            "table1": {s: int(((case1["scenario"] == s) & (case1["method"] == METHOD_UNIFIED)).sum()) for s in scen},
            "table2": {c: int(((case2["chain"] == c) & (case2["method"] == METHOD_UNIFIED)).sum()) for c in chains},
        },
        "seconds": {"total": None, "baselines_fit": t_fit, "per_case_mean": per_case,
                    "per_case": [round(s, 3) for s in case_seconds], "ablation_per_case_mean": abl_seconds or None,
                    "probe": probe["seconds"] if probe is not None else None,
                    "unet_fit": dict(base.unet_seconds) or None, "unified_stage": unified_seconds},
        "probe": {k: v for k, v in probe.items() if k != "seconds"} if probe is not None else None,
        "tables": {k: t.summary.to_dict("records") for k, t in made.items()},
    }

    files: list[Path] = []
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for name, frame in (("table1_cases.csv", frame1), ("table2_cases.csv", frame2)):
            if name == "table2_cases.csv" and not chains:
                continue
            frame.to_csv(tmp / name, index=False)
            files.append(out_dir / name)
        files += [out_dir / p.name for p in tables.write_tables(list(made.values()), tmp)]
        figs = write_figures(made, main.qualitative, tmp, out_dir,
                             f"UniBrain imputation (seed {seed}): inputs | imputed | truth | error")
        from unibrain_cli.config.loader import save_resolved

        save_resolved(recipe, tmp)
        files += [*figs.values(), out_dir / "recipe.resolved.toml", out_dir / "eval.json"]
        summary["figures"] = {k: str(v) for k, v in figs.items()}
        summary["files"] = [str(p) for p in files]
        summary["seconds"]["total"] = time.perf_counter() - t_start
        write_text(tmp / "eval.json", json.dumps(_json_safe(summary), indent=1))
    return EvalResult(out_dir, made, figs, summary, files)
