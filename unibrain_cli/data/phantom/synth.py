"""`unibrain synth`: write a physics-based phantom dataset in the real release layouts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from unibrain_cli.data.phantom.anatomy import load_template
from unibrain_cli.data.phantom.layouts import SUBSETS, CaseSpec, case_specs, split_cases
from unibrain_cli.data.phantom.lesions import candidates
from unibrain_cli.data.phantom.preview import display_slice, write_preview
from unibrain_cli.data.phantom.reports import (
    global_finding,
    impression,
    measure,
    measured_region,
    modality_finding,
)
from unibrain_cli.data.phantom.simulate import CaseImages, case_rngs, simulate_case
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir
from unibrain_cli.modalities import DISEASES

SPLIT_SEED_SALT = 7919


@dataclass
class SynthResult:
    """What :func:`synthesize` wrote: the output folder, case ids per subset, file count, preview."""

    out: Path
    case_ids: dict[str, list[str]]
    n_files: int
    preview: Path
    all_modalities: bool = False
    reports: dict[str, dict[str, object]] = field(default_factory=dict)


def _check_args(out: Path, cases: int, resolution: int, force: bool) -> None:
    if cases < 1:
        raise UserError(f"need at least one case, got {cases}", "--cases")
    if resolution not in (1, 2):
        raise UserError(f"resolution must be 1 or 2 (mm), got {resolution}", "--resolution")
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder; choose another output path", str(out))
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError("output folder exists and is not empty; pass --force to replace it", str(out))


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` (int16 image or uint8 label) as gzipped NIfTI-1 (nibabel: gzip mtime 0)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_case(case: CaseImages, root: Path) -> None:
    for acq, img in zip(case.spec.acquisitions, case.grids):
        for mod in acq.modalities:
            _save_nifti(img.images[mod], acq.grid.affine, root / acq.paths[mod])
        if acq.mask_path is not None:
            labels = img.labels if case.spec.subset != "ISLES22" else (img.labels > 0).astype(np.uint8)
            _save_nifti(labels, acq.grid.affine, root / acq.mask_path)


def _preview_row(case: CaseImages) -> dict[str, np.ndarray]:
    """Axial slices through the middle (world z) of the reported lesion for each modality of the case."""
    mask_img = case.mask_image
    ks = np.argwhere(measured_region(mask_img.labels, case.spec.disease))[:, 2]
    k = (int(ks.min()) + int(ks.max())) / 2.0 if len(ks) else mask_img.grid.shape[2] / 2.0
    world_z = float(mask_img.grid.index_to_world(np.array([[0.0, 0.0, k]]))[0, 2])
    row = {}
    for acq, img in zip(case.spec.acquisitions, case.grids):
        for mod in acq.modalities:
            row[mod] = display_slice(img.images[mod], acq.grid, world_z)
    return row


def _texts(case: CaseImages, rng: np.random.Generator) -> tuple[dict[str, str], str, dict[str, object]]:
    """Per-image findings (keyed by image id), global finding and impression of a case."""
    img = case.mask_image
    crop_labels = img.labels[img.crop]
    facts = measure(case.plan, crop_labels, img.mni, img.grid.spacing)
    spec = case.spec
    findings = {spec.image_id(m): modality_finding(facts, m, rng) for m in spec.modalities}
    return findings, global_finding(facts, spec.modalities, rng), impression(facts, rng)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from unibrain_cli.io.console import progress_bar

    with progress_bar(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("cases", total=total)
        yield lambda: bar.advance(task)


def _synth_case(job: tuple[CaseSpec, int, int, Path, bool]
                ) -> tuple[tuple[dict[str, str], str, dict[str, object]], dict[str, np.ndarray] | None]:
    """Simulate and write one case; returns its texts and (when asked) its preview row."""
    spec, seed, resolution, root, want_preview = job
    case = simulate_case(spec, seed, resolution)
    _write_case(case, root)
    texts = _texts(case, case_rngs(seed, spec.index)["text"])
    return texts, (_preview_row(case) if want_preview else None)


def synthesize(out: Path, cases: int, seed: int = 0, resolution: int = 1, all_modalities: bool = False,
               force: bool = False, progress: bool = False, workers: int = 1) -> SynthResult:
    """Write ``cases`` phantom cases (round-robin over GLI, MEN, MET, ISLES22, WMH) under ``out``.

    Default: the RadGenome release JSON tree (``out/radgenome``) + source-style image trees
    (``out/images``); ``all_modalities``: the flat ``all_data_Reg`` layout with all six contrasts
    per case. Always writes ``out/preview.png``. Deterministic for ``seed`` (each case has its
    own random streams, so ``workers`` > 1, which simulates cases in that many processes, writes
    the same files); written to a temporary folder renamed onto ``out`` at the end.
    ``resolution``: 1 or 2 mm.
    """
    out = Path(out)
    _check_args(out, cases, resolution, force)
    if workers < 1:
        raise UserError(f"must be at least 1, got {workers}", "--workers")
    specs = case_specs(cases, resolution, all_modalities)
    load_template(resolution)
    candidates()
    findings: dict[str, dict[str, str]] = {s: {} for s in SUBSETS}
    globals_: dict[str, dict[str, str]] = {s: {} for s in SUBSETS}
    impressions: dict[str, dict[str, object]] = {s: {} for s in SUBSETS}
    ids: dict[str, list[str]] = {s: [] for s in SUBSETS}
    by_id: dict[str, CaseSpec] = {}
    rows: dict[str, dict[str, np.ndarray]] = {}
    first_of: dict[str, int] = {}
    for spec in specs:
        first_of.setdefault(spec.disease, spec.index)
    with atomic_dir(out, overwrite=out.exists()) as tmp, _progress(progress, len(specs)) as advance:
        jobs = [(spec, seed, resolution, tmp, first_of[spec.disease] == spec.index) for spec in specs]
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
        try:
            results = pool.map(_synth_case, jobs) if pool is not None else map(_synth_case, jobs)
            for spec, ((f, g, imp), row) in zip(specs, results):
                findings[spec.subset].update(f)
                globals_[spec.subset][spec.case_id] = g
                impressions[spec.subset][spec.case_id] = imp
                ids[spec.subset].append(spec.case_id)
                by_id[spec.case_id] = spec
                if row is not None:
                    rows[spec.disease] = row
                advance()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        split_rng = np.random.default_rng([int(seed), SPLIT_SEED_SALT])
        split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for subset in SUBSETS:
            for part, members in split_cases(ids[subset], split_rng).items():
                split[part] += [by_id[c].image_id(m) for c in members for m in by_id[c].modalities]
        if all_modalities:
            _write_json(tmp / "combined_modal_wise_finding.json", {k: v for s in SUBSETS for k, v in findings[s].items()})
            _write_json(tmp / "combined_impression.json", {k: v for s in SUBSETS for k, v in impressions[s].items()})
            _write_json(tmp / "combined_global_finding.json", {k: v for s in SUBSETS for k, v in globals_[s].items()})
            _write_json(tmp / "train_val_test_split.json", split)
        else:
            root = tmp / "radgenome"
            _write_json(root / "train_val_test_split.json", split)
            for subset in SUBSETS:
                _write_json(root / subset / "modal_wise_finding.json", findings[subset])
                _write_json(root / subset / "impression.json", impressions[subset])
                _write_json(root / subset / "global_finding.json", globals_[subset])
        ordered = {d: rows[d] for d in DISEASES if d in rows}
        write_preview(ordered, tmp / "preview.png")
        n_files = sum(1 for p in tmp.rglob("*") if p.is_file())
    reports = {cid: {"impression": impressions[s][cid], "global": globals_[s][cid]} for s in SUBSETS for cid in ids[s]}
    return SynthResult(out, {s: v for s, v in ids.items() if v}, n_files, out / "preview.png", all_modalities, reports)
