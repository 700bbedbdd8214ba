"""``unibrain slice``: 2D axial training/evaluation slices from a PREPARED folder.

Slice orientation (one convention, used by training, inference and evaluation): for a RAS+
volume ``vol[i, j, k]``, :func:`axial_slice` returns ``np.flipud(vol[:, :, k].T)``: rows run
anterior (row 0) to posterior, columns run the subject's left (column 0) to right
(neurological display). :func:`axial_unslice` is its exact inverse.

Per case: lesion slices are chosen (the middle slice of the lesion's axial extent first,
flagged ``is_eval``, then the largest lesion areas); cases without lesion take central
brain slices. Every slice of a case is cropped to the case's brain bounding box (union over
all slices), zero-padded to a square and resized to ``size``. Output format: see
``SLICES/slices.json`` (``unibrain-slices/1``), ``index.parquet`` and ``shards/``.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from unibrain_cli.data.findings import rewrite_size_phrases
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir, write_text
from unibrain_cli.io.volume import load_volume
from unibrain_cli.modalities import MODALITIES

FORMAT = "unibrain-slices/1"
SHARD_ROWS = 128  # slices per shard file (128 x 6 x 128 x 128 float32 = 50 MB)
INDEX_COLUMNS = (
    "slice_id", "case_id", "subset", "split", "diseases", "slice_k", "is_eval", "shard", "row",
    "modalities", "lesion_area_px", "lesion_w_mm", "lesion_h_mm", "findings_2d", "findings_3d",
    "global_finding_2d", "global_finding", "impression",
)


def axial_slice(array3d: np.ndarray, k: int) -> np.ndarray:
    """RAS+ volume [X, Y, Z] -> display slice [Y, X]: row 0 anterior, column 0 subject's left."""
    return np.flipud(np.asarray(array3d)[:, :, k].T)


def axial_unslice(slice2d: np.ndarray) -> np.ndarray:
    """Inverse of :func:`axial_slice`: display slice [Y, X] -> ``vol[:, :, k]`` plane [X, Y]."""
    return np.flipud(np.asarray(slice2d)).T


@dataclass
class SliceResult:
    """Outcome of :func:`make_slices`."""

    out: Path
    num_slices: int
    num_cases: int
    num_shards: int
    index: pd.DataFrame = field(repr=False)


# --------------------------------------------------------------------------- geometry


def choose_slices(mask: np.ndarray, brain: np.ndarray, per_case: int, all_lesion_slices: bool = False
                  ) -> list[tuple[int, bool]]:
    """Axial indices to keep, as (k, is_eval), the eval slice first.

    With lesion: the middle of the lesion's axial extent (the nearest lesion-bearing slice
    if the lesion is split) is the eval slice; the others follow by decreasing lesion area
    (ties: lower k), ``per_case`` in total, or every lesion slice. Without lesion:
    ``per_case`` central brain slices, spread over the middle of the brain's axial extent,
    the central one flagged eval.
    """
    areas = mask.reshape(-1, mask.shape[2]).sum(axis=0)
    ks = np.flatnonzero(areas)
    if ks.size:
        centre = (int(ks.min()) + int(ks.max())) // 2
        mid = int(ks[np.argmin(np.abs(ks - centre))])
        rest = sorted((int(k) for k in ks if k != mid), key=lambda k: (-int(areas[k]), k))
        if not all_lesion_slices:
            rest = rest[: max(0, per_case - 1)]
        return [(mid, True), *((k, False) for k in rest)]
    bks = np.flatnonzero(brain.reshape(-1, brain.shape[2]).any(axis=0))
    lo, hi = (int(bks.min()), int(bks.max())) if bks.size else (0, mask.shape[2] - 1)
    centre = (lo + hi) // 2
    step = max(1, (hi - lo) // (4 * per_case + 2))
    chosen: list[int] = []
    for n in range(4 * per_case + 4):
        k = centre + step * ((n + 1) // 2) * (1 if n % 2 else -1)
        if lo <= k <= hi and k not in chosen:
            chosen.append(k)
        if len(chosen) == per_case:
            break
    return [(k, i == 0) for i, k in enumerate(chosen)]


def slice_brain_mask(images: np.ndarray) -> np.ndarray:
    """Brain mask of normalised slices from their own pixels: images [K, S, S] (K >= 1 modalities of
    one slice, [0, 1], 0 outside the brain) -> bool [S, S].

    The ``prepare`` rule (:func:`~unibrain_cli.data.prepare.nonzero_union`: nonzero in any of the
    given modalities) with holes filled: the [0, 1] normalisation maps each modality's darkest 0.5 %
    of brain voxels to exactly 0, so the nonzero pixels of one or a few normalised modalities have
    pinholes inside the brain (dark CSF on T1) that the prepare-time mask did not have. Given only a
    case's available inputs, this is the mask ``unibrain impute`` would know (its brain mask is the
    inputs' union too); the slices' stored ``brain`` is the union over ALL the case's modalities.
    """
    from scipy import ndimage

    from unibrain_cli.data.prepare import nonzero_union

    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be [K >= 1, S, S], got {images.shape}")
    return ndimage.binary_fill_holes(nonzero_union(images))


def crop_box(brain: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), end-exclusive, of the brain's union over all axial slices,
    in :func:`axial_slice` coordinates. An empty brain gives the full plane."""
    proj = axial_slice(brain.any(axis=2)[:, :, None], 0)
    rows, cols = np.flatnonzero(proj.any(axis=1)), np.flatnonzero(proj.any(axis=0))
    if not rows.size:
        return 0, proj.shape[0], 0, proj.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def square_resize(plane: np.ndarray, box: tuple[int, int, int, int], size: int, order: int) -> np.ndarray:
    """Crop ``plane`` [H, W] or [H, W, C] to ``box``, zero-pad to a centred square, resize to ``size``.

    ``order`` 1 (bilinear, anti-aliased when shrinking) for images, 0 (nearest) for masks.
    """
    from skimage.transform import resize

    r0, r1, c0, c1 = box
    crop = plane[r0:r1, c0:c1]
    h, w = crop.shape[:2]
    side = max(h, w)
    pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)]
    pad += [(0, 0)] * (crop.ndim - 2)
    square = np.pad(crop, pad)
    if side == size:
        return square
    return resize(
        square.astype(np.float32) if order else square,
        (size, size) + square.shape[2:],
        order=order,
        preserve_range=True,
        anti_aliasing=bool(order) and side > size,
        mode="constant",
    )


def lesion_extent_mm(mask2d: np.ndarray, spacing_xy: tuple[float, float]) -> tuple[float, float]:
    """(W, H) in mm of the lesion's bounding box on a display slice [rows=A-P, cols=L-R].

    ``spacing_xy`` = voxel size along i (left-right) and j (anterior-posterior). 0 if no lesion.
    """
    rows, cols = np.flatnonzero(mask2d.any(axis=1)), np.flatnonzero(mask2d.any(axis=0))
    if not rows.size:
        return 0.0, 0.0
    w = (cols[-1] - cols[0] + 1) * float(spacing_xy[0])
    h = (rows[-1] - rows[0] + 1) * float(spacing_xy[1])
    return round(w, 3), round(h, 3)


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    """Buffers slices and writes ``shards/shard-NNNNN.safetensors`` every ``rows`` slices."""

    def __init__(self, folder: Path, size: int, rows: int | None = None) -> None:
        self.folder, self.size, self.rows = folder, size, rows or SHARD_ROWS
        self.count = 0
        self.buf: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "present", "mask", "labels", "brain")}
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def name(self) -> str:
        return f"shard-{self.count:05d}.safetensors"

    def add(self, **arrays: np.ndarray) -> tuple[str, int]:
        """Add one slice; returns (shard file name, row inside the shard)."""
        where = (self.name, len(self.buf["images"]))
        for key, arr in arrays.items():
            self.buf[key].append(arr)
        if len(self.buf["images"]) >= self.rows:
            self.flush()
        return where

    def flush(self) -> None:
        from safetensors.numpy import save_file

        if not self.buf["images"]:
            return
        dtypes = {"images": np.float32, "present": np.uint8, "mask": np.uint8, "labels": np.uint8, "brain": np.uint8}
        # safetensors writes raw memory: np.stack of transposed views is not C-ordered
        tensors = {k: np.ascontiguousarray(np.stack(self.buf[k]), dtype=dt) for k, dt in dtypes.items()}
        save_file(tensors, str(self.folder / self.name))
        self.count += 1
        self.buf = {k: [] for k in self.buf}


def _slice_case(row: pd.Series, prepared: Path, size: int, per_case: int, all_lesion: bool
                ) -> list[dict[str, Any]]:
    """All chosen slices of one manifest row, as dicts of arrays + index fields."""
    files = json.loads(row["files"])
    mods = [m for m in row["modalities"].split("|") if m]
    vols = {m: load_volume(prepared / files[m]).array for m in mods}
    mask = load_volume(prepared / files["mask"], kind="label").array > 0
    labels = load_volume(prepared / files["labels"], kind="label").array
    brain = load_volume(prepared / files["brain"], kind="label").array > 0
    spacing = json.loads(row["spacing"])
    box = crop_box(brain)
    findings_3d = json.loads(row["findings"])
    present = np.array([m in vols for m in MODALITIES], dtype=np.uint8)
    out = []
    for k, is_eval in choose_slices(mask, brain, per_case, all_lesion):
        stack = np.zeros(mask.shape[:2][::-1] + (len(MODALITIES),), dtype=np.float32)
        for c, m in enumerate(MODALITIES):
            if m in vols:
                stack[..., c] = axial_slice(vols[m], k)
        m2d = axial_slice(mask, k)
        w_mm, h_mm = lesion_extent_mm(m2d, (spacing[0], spacing[1]))
        images = np.clip(square_resize(stack, box, size, order=1), 0.0, 1.0).transpose(2, 0, 1)
        images[present == 0] = 0.0
        small_mask = square_resize(m2d.astype(np.uint8), box, size, order=0).astype(np.uint8)
        out.append({
            "arrays": {
                "images": images,
                "present": present,
                "mask": small_mask,
                "labels": square_resize(np.clip(axial_slice(labels, k), 0, 255).astype(np.uint8), box, size, 0),
                "brain": square_resize(axial_slice(brain, k).astype(np.uint8), box, size, order=0),
            },
            "fields": {
                "slice_id": f"{row['case_id']}:{k}",
                "case_id": row["case_id"],
                "subset": row["subset"],
                "split": row["split"],
                "diseases": row["diseases"],
                "slice_k": int(k),
                "is_eval": bool(is_eval),
                "modalities": "|".join(m for m in MODALITIES if m in vols),
                "lesion_area_px": int(small_mask.sum()),
                "lesion_w_mm": float(w_mm),
                "lesion_h_mm": float(h_mm),
                "findings_2d": json.dumps({m: rewrite_size_phrases(t, w_mm, h_mm) for m, t in findings_3d.items()}),
                "findings_3d": json.dumps(findings_3d),
                "global_finding_2d": rewrite_size_phrases(row["global_finding"], w_mm, h_mm),
                "global_finding": row["global_finding"],
                "impression": row["impression"],
            },
        })
    return out


def _slice_job(job: tuple[pd.Series, Path, int, int, bool]) -> tuple[list[dict[str, Any]] | None, str | None]:
    """:func:`_slice_case` for a worker process: (items, None), or (None, message) for a damaged case."""
    try:
        return _slice_case(*job), None
    except UserError as exc:
        return None, str(exc)


def make_slices(
    prepared: Path,
    out: Path,
    size: int = 128,
    axis: str = "axial",
    per_case: int = 3,
    all_lesion_slices: bool = False,
    force: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> SliceResult:
    """Write the SLICES folder for every case in ``PREPARED/manifest.parquet``.

    The whole folder is built in a temporary directory and renamed at the end; an existing
    non-empty ``out`` is replaced only with ``force``. ``workers`` > 1 reads and cuts cases in
    that many processes; the output is the same (cases are written in manifest order).
    """
    from unibrain_cli.data.prepare import progress_bar

    prepared, out = Path(prepared), Path(out)
    if axis != "axial":
        raise UserError(f"only 'axial' is supported, got '{axis}'", "--axis")
    if size < 8:
        raise UserError(f"must be at least 8 pixels, got {size}", "--size")
    if per_case < 1:
        raise UserError(f"must be at least 1, got {per_case}", "--per-case")
    if workers < 1:
        raise UserError(f"must be at least 1, got {workers}", "--workers")
    manifest_path = prepared / "manifest.parquet"
    if not manifest_path.is_file():
        raise UserError("no manifest.parquet here; run `unibrain prepare` first", str(prepared))
    manifest = pd.read_parquet(manifest_path)
    if manifest.empty:
        raise UserError("the manifest lists no cases; rerun `unibrain prepare`", str(manifest_path))
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError("exists and is not empty; pass --force to replace it", str(out))

    rows: list[dict[str, Any]] = []
    with atomic_dir(out, overwrite=True) as tmp, progress_bar(progress) as bar:
        task = bar.add_task("slice", total=len(manifest)) if bar is not None else None
        writer = _ShardWriter(tmp / "shards", size)
        jobs = [(case, prepared, size, per_case, all_lesion_slices) for _, case in manifest.iterrows()]
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(jobs) > 1 else None
        results = pool.map(_slice_job, jobs) if pool is not None else map(_slice_job, jobs)
        try:
            for (case, *_), (items, error) in zip(jobs, results):
                if items is None:
                    raise UserError(f"prepared case {case['case_id']} is damaged ({error}); rerun prepare --force",
                                    str(prepared))
                for item in items:
                    shard, r = writer.add(**item["arrays"])
                    rows.append({**item["fields"], "shard": shard, "row": r})
                if bar is not None:
                    bar.advance(task)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        writer.flush()
        index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
        index.to_parquet(tmp / "index.parquet", index=False)
        write_text(tmp / "slices.json", json.dumps({
            "format": FORMAT,
            "size": size,
            "axis": axis,
            "modalities": list(MODALITIES),
            "num_slices": len(index),
            "source": str(prepared.resolve()),
        }, indent=1))
    return SliceResult(out=out, num_slices=len(index), num_cases=int(index["case_id"].nunique()),
                       num_shards=writer.count, index=index)
