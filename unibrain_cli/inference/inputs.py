"""Inputs of ``impute`` / ``diagnose`` / ``report``: which files, how they become model slices,
and how generated slices go back into the input's own space.

Sources (exactly one): ``--have t1=a.nii.gz,t2=b.nii.gz``; ``--case FOLDER`` (NIfTI files whose
name ends in a modality alias: ``sub01_T1w.nii.gz``, ``BraTS-...-t2f.nii.gz``, ``flair.nii``);
``--prepared PREPARED --case-id ID`` (a case written by ``unibrain prepare``).

Preprocessing of user files (the ``prepare`` pipeline, without registration):

1. ``load_volume`` (validated), ``to_canonical`` (RAS+);
2. the grid is the FIRST given file resampled to 1 mm isotropic; the others are resampled onto
   it in physical space (their extents must overlap it);
3. brain mask = union over modalities of each modality's foreground: its nonzero voxels when at
   least half of its border voxels are 0 (skull-stripped or zero-padded data), else the voxels
   above its Otsu threshold (``skimage.filters.threshold_otsu``; largest connected component,
   holes filled) — a head mask for unstripped scans;
4. intensities: ``prepare.normalise_intensity`` (0.5-99.5 percentile inside the brain -> [0, 1]);
5. slices: ``axial_slice``, cropped to the brain box, square-padded and resized to S
   (``slicing.square_resize``), exactly as ``unibrain slice`` does.

Slice choice (``--slices``): ``lesion`` = the lesion's middle slice when a lesion mask is known
(prepared cases), else the slice with the largest brain area among the central fifth of the
brain's axial extent; ``all`` = every axial slice with brain; ``K`` = K slices chosen as
``slicing.choose_slices`` does (lesion-centred, else central brain slices). The first slice of
the list is the *representative* one (used for text outputs).

Back to the input's space: each generated slice is resized back to the crop square, uncropped
into the 1 mm grid (zeros elsewhere and on slices that were not generated), masked by the brain
and resampled (linear) onto the first input file's exact shape and affine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unibrain_cli.data.prepare import TARGET_SPACING, normalise_intensity
from unibrain_cli.data.slicing import axial_slice, axial_unslice, choose_slices, crop_box, square_resize
from unibrain_cli.errors import UserError
from unibrain_cli.io.volume import (
    Volume,
    extents_overlap,
    load_volume,
    resample_spacing,
    resample_to,
    to_canonical,
)
from unibrain_cli.modalities import MODALITIES, canonical_modality, parse_modality

_NII = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
Box = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------
# which files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """Resolved input source: user files (``files``, in the given order) or a prepared case."""

    files: dict[str, Path]
    prepared: Path | None = None
    case_id: str | None = None


def parse_modality_list(value: str | None, flag: str) -> list[str]:
    """``"t2,flair"`` -> canonical names in order; UserError on unknown names or repeats."""
    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    out: list[str] = []
    for n in names:
        m = parse_modality(n, flag)
        if m in out:
            raise UserError(f"modality '{m}' is listed twice", flag)
        out.append(m)
    return out


def parse_have(value: str) -> dict[str, Path]:
    """``"t1=a.nii.gz,t2=b.nii.gz"`` -> {canonical modality: path}, in the given order."""
    files: dict[str, Path] = {}
    for item in [v.strip() for v in value.split(",") if v.strip()]:
        if "=" not in item:
            raise UserError(f"'{item}' is not MODALITY=FILE (e.g. t1=scan.nii.gz)", "--have")
        name, path = (s.strip() for s in item.split("=", 1))
        mod = parse_modality(name, "--have")
        if mod in files:
            raise UserError(f"modality '{mod}' is given twice", "--have")
        if not path:
            raise UserError(f"no file given for '{name}'", "--have")
        files[mod] = Path(path)
    if not files:
        raise UserError("no input files; pass e.g. --have t1=scan.nii.gz", "--have")
    return files


def modality_of_filename(path: Path) -> str | None:
    """Canonical modality whose alias ends the file's stem (after ``_``, ``-`` or ``.``), else None."""
    stem = _NII.sub("", path.name)
    whole = canonical_modality(stem)
    if whole is not None:
        return whole
    tokens = re.split(r"[_\-.]", stem)
    for n in (2, 1):  # "t2-flair", then "flair"
        if len(tokens) >= n:
            found = canonical_modality("-".join(tokens[-n:]))
            if found is not None:
                return found
    return None


def find_case_files(folder: Path) -> dict[str, Path]:
    """NIfTI files of a case folder by modality alias (MODALITIES order); others are ignored."""
    if not folder.is_dir():
        raise UserError("case folder not found; pass a folder of NIfTI files", str(folder))
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not _NII.search(p.name):
            continue
        mod = modality_of_filename(p)
        if mod is None:
            continue
        if mod in files:
            raise UserError(f"two files look like '{mod}': {files[mod].name} and {p.name}; rename one", str(folder))
        files[mod] = p
    if not files:
        raise UserError("no NIfTI file named by a modality (e.g. sub01_T1w.nii.gz, t2f.nii.gz)", str(folder))
    return {m: files[m] for m in MODALITIES if m in files}


def resolve_inputs(
    have: str | None, case: Path | None, prepared: Path | None, case_id: str | None
) -> InputSpec:
    """Check the flag combination and find the input files (files are not read yet)."""
    given = [name for name, v in (("--have", have), ("--case", case), ("--prepared", prepared)) if v]
    if len(given) > 1:
        raise UserError(f"use only one of --have, --case, --prepared (got {' and '.join(given)})", given[1])
    if case_id and not prepared:
        raise UserError("--case-id needs --prepared", "--case-id")
    if have:
        return InputSpec(parse_have(have))
    if case:
        return InputSpec(find_case_files(Path(case)))
    if prepared:
        if not case_id:
            raise UserError("--prepared needs --case-id to choose the case", "--prepared")
        return prepared_spec(Path(prepared), case_id)
    raise UserError("no input: pass --have t1=scan.nii.gz, --case FOLDER or --prepared PREPARED --case-id ID")


def prepared_spec(prepared: Path, case_id: str) -> InputSpec:
    """Files of one prepared case (``cases/<id>/case.json``)."""
    case_dir = prepared / "cases" / case_id
    meta_path = case_dir / "case.json"
    if not meta_path.is_file():
        raise UserError(f"no prepared case '{case_id}' (missing cases/{case_id}/case.json)", str(prepared))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        names = list(meta["modalities"])
        rel = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"unreadable case.json ({exc}); re-run unibrain prepare", str(meta_path)) from exc
    files = {m: case_dir / rel[m] for m in MODALITIES if m in names and m in rel}
    if not files:
        raise UserError("the prepared case lists no modality", str(meta_path))
    return InputSpec(files, prepared, case_id)


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------


@dataclass
class CaseVolumes:
    """A case on its 1 mm RAS+ grid.

    Attributes:
        volumes: modality -> float32 [X, Y, Z] in [0, 1] (0 outside the brain), given order.
        brain: bool [X, Y, Z]; lesion: bool [X, Y, Z] or None (unknown).
        affine: the grid's affine (RAS+ mm); out_shape / out_affine: the first input file's own
            grid, where outputs are written.
        sources: modality -> file.
    """

    volumes: dict[str, np.ndarray]
    brain: np.ndarray
    lesion: np.ndarray | None
    affine: np.ndarray
    out_shape: tuple[int, int, int]
    out_affine: np.ndarray
    sources: dict[str, str]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.brain.shape)  # type: ignore[return-value]


def _border(arr: np.ndarray) -> np.ndarray:
    return np.concatenate([arr[[0, -1]].ravel(), arr[:, [0, -1]].ravel(), arr[:, :, [0, -1]].ravel()])


def foreground_rule(array: np.ndarray) -> float | None:
    """None when the image has a zero background (>= half of its border is 0), else its Otsu threshold."""
    if np.mean(_border(array) == 0) >= 0.5:
        return None
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(array))


def foreground_mask(array: np.ndarray, threshold: float | None) -> np.ndarray:
    """Foreground of ``array``: nonzero voxels (``threshold`` None), else the largest connected
    component above ``threshold`` with holes filled."""
    if threshold is None:
        return array != 0
    from scipy import ndimage

    mask = array > threshold
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)


def preprocess_files(files: Mapping[str, Path]) -> CaseVolumes:
    """Load, align and normalise user files (see the module docstring). UserError on bad input."""
    loaded = {m: load_volume(p) for m, p in files.items()}
    first = next(iter(files))
    canon = {m: to_canonical(v) for m, v in loaded.items()}
    for m, v in canon.items():
        if m != first and not extents_overlap(v, canon[first]):
            raise UserError(
                f"its physical extent does not overlap {files[first]} (the first input); "
                "check both headers or register the images", str(files[m]))
    ref = canon[first]
    grid = ref if np.allclose(ref.spacing, TARGET_SPACING, atol=1e-3) else resample_spacing(ref, TARGET_SPACING)
    shape, affine = grid.shape, grid.affine
    arrays: dict[str, np.ndarray] = {}
    brain = np.zeros(shape, dtype=bool)
    for m, vol in canon.items():
        thr = foreground_rule(vol.array)
        on_grid = grid if m == first else resample_to(vol, shape, affine)
        arr = on_grid.array.astype(np.float32, copy=False)
        arrays[m] = arr
        brain |= foreground_mask(arr, thr)
    if not brain.any():
        raise UserError("the image is empty (no foreground voxel)", str(files[first]))
    volumes = {}
    for m, arr in arrays.items():
        try:
            volumes[m] = normalise_intensity(arr, brain)[0]
        except ValueError as exc:
            raise UserError(f"{exc}; the image holds no usable signal", str(files[m])) from exc
    return CaseVolumes(volumes, brain, None, affine, loaded[first].shape, loaded[first].affine,
                       {m: str(p) for m, p in files.items()})


def load_prepared(spec: InputSpec) -> CaseVolumes:
    """A prepared case: already on its 1 mm grid and normalised; brain and lesion masks read."""
    assert spec.prepared is not None and spec.case_id is not None
    case_dir = spec.prepared / "cases" / spec.case_id
    vols = {m: load_volume(p) for m, p in spec.files.items()}
    first = next(iter(vols.values()))
    brain_p, mask_p = case_dir / "brain.nii.gz", case_dir / "mask.nii.gz"
    brain = load_volume(brain_p, kind="label").array > 0 if brain_p.is_file() else np.zeros(first.shape, bool)
    for v in vols.values():
        brain |= v.array != 0
    lesion = load_volume(mask_p, kind="label").array > 0 if mask_p.is_file() else None
    return CaseVolumes({m: np.clip(v.array, 0.0, 1.0) for m, v in vols.items()}, brain, lesion, first.affine,
                       first.shape, first.affine, {m: str(p) for m, p in spec.files.items()})


def load_case(spec: InputSpec) -> CaseVolumes:
    """:func:`load_prepared` or :func:`preprocess_files`, as the spec says."""
    return load_prepared(spec) if spec.prepared is not None else preprocess_files(spec.files)


# ---------------------------------------------------------------------------------------------
# slices
# ---------------------------------------------------------------------------------------------


def parse_slices(value: str) -> str | int:
    """``lesion`` | ``all`` | a positive integer K."""
    v = value.strip().lower()
    if v in ("lesion", "all"):
        return v
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise UserError(f"'{value}' is not lesion, all or a positive number of slices", "--slices")


def central_slice(brain: np.ndarray) -> int:
    """The slice with the largest brain area among the central fifth of the brain's axial extent
    (ties: nearest the centre)."""
    areas = brain.reshape(-1, brain.shape[2]).sum(axis=0)
    ks = np.flatnonzero(areas)
    lo, hi = int(ks.min()), int(ks.max())
    centre = (lo + hi) / 2
    half = max(1.0, (hi - lo) / 10)
    cand = [k for k in range(lo, hi + 1) if abs(k - centre) <= half] or [int(round(centre))]
    return max(cand, key=lambda k: (int(areas[k]), -abs(k - centre)))


def select_slices(brain: np.ndarray, lesion: np.ndarray | None, mode: str | int) -> list[int]:
    """Axial indices to process, the representative slice first (see the module docstring)."""
    has_lesion = lesion is not None and bool(lesion.any())
    if mode == "all":
        ks = [int(k) for k in np.flatnonzero(brain.reshape(-1, brain.shape[2]).any(axis=0))]
        first = choose_slices(lesion, brain, 1)[0][0] if has_lesion else central_slice(brain)  # type: ignore[arg-type]
        return [first, *(k for k in ks if k != first)]
    if mode == "lesion":
        return [choose_slices(lesion, brain, 1)[0][0] if has_lesion else central_slice(brain)]  # type: ignore[arg-type]
    mask = lesion if has_lesion else np.zeros_like(brain)
    return [k for k, _ in choose_slices(mask, brain, int(mode))]


@dataclass(frozen=True)
class SliceGeometry:
    """How slices were cut: the crop box (axial_slice coordinates) and the model's slice size."""

    box: Box
    size: int
    plane_shape: tuple[int, int]  # axial_slice plane [Y, X]


def slice_geometry(brain: np.ndarray, size: int) -> SliceGeometry:
    return SliceGeometry(crop_box(brain), size, (brain.shape[1], brain.shape[0]))


def cut_slices(case: CaseVolumes, ks: Sequence[int], geo: SliceGeometry) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(modality -> float32 [K, S, S] in [0, 1], brain uint8 [K, S, S]) for axial indices ``ks``."""
    images = {
        m: np.stack([np.clip(square_resize(axial_slice(v, k), geo.box, geo.size, order=1), 0, 1) for k in ks])
        .astype(np.float32)
        for m, v in case.volumes.items()
    }
    brain = np.stack([square_resize(axial_slice(case.brain.astype(np.uint8), k), geo.box, geo.size, order=0)
                      for k in ks]).astype(np.uint8)
    return images, brain


def uncut_slice(image: np.ndarray, geo: SliceGeometry) -> np.ndarray:
    """Inverse of the crop/pad/resize: [S, S] -> plane [Y, X] (axial_slice coordinates), zeros outside the box."""
    from skimage.transform import resize

    r0, r1, c0, c1 = geo.box
    h, w = r1 - r0, c1 - c0
    side = max(h, w)
    square = image if side == geo.size else resize(image.astype(np.float32), (side, side), order=1,
                                                    preserve_range=True, anti_aliasing=False, mode="edge")
    top, left = (side - h) // 2, (side - w) // 2
    plane = np.zeros(geo.plane_shape, dtype=np.float32)
    plane[r0:r1, c0:c1] = square[top:top + h, left:left + w]
    return plane


def paste_slices(slices: Mapping[int, np.ndarray], case: CaseVolumes, geo: SliceGeometry) -> np.ndarray:
    """Generated slices {k: [S, S]} -> float32 volume on the case grid (zeros elsewhere, brain-masked)."""
    vol = np.zeros(case.shape, dtype=np.float32)
    for k, img in slices.items():
        vol[:, :, k] = axial_unslice(uncut_slice(img, geo))
    vol[~case.brain] = 0.0
    return vol


def output_voxel_extent(case: CaseVolumes) -> np.ndarray:
    """Per axis of the 1 mm grid, the extent (in grid voxels) of one output voxel along it: the
    projection of the output voxel's edges onto the axis (8.3 for 8.3 mm slices, ~1 otherwise)."""
    grid_axes = case.affine[:3, :3] / np.linalg.norm(case.affine[:3, :3], axis=0)
    grid_spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    edges = np.asarray(case.out_affine, dtype=np.float64)[:3, :3]
    return np.abs(grid_axes.T @ edges).sum(axis=1) / grid_spacing


def to_output_space(array: np.ndarray, case: CaseVolumes) -> Volume:
    """A grid volume resampled onto the first input's own shape and affine.

    Where an output voxel spans several 1 mm grid voxels (thick slices, coarse in-plane
    sampling), the grid is first box-averaged over that extent (``scipy.ndimage.uniform_filter``),
    so that the output voxel holds the mean over its own volume — what a thick-slab acquisition
    measures — instead of one point sample of it.
    """
    vol = Volume(array.astype(np.float32), case.affine, "intensity")
    if case.shape == tuple(case.out_shape) and np.allclose(case.affine, case.out_affine, atol=1e-5):
        return Volume(vol.array, np.array(case.out_affine), "intensity")
    size = np.maximum(1, np.rint(output_voxel_extent(case))).astype(int)
    if (size > 1).any():
        from scipy.ndimage import uniform_filter

        vol = vol.with_array(uniform_filter(vol.array, size=tuple(int(n) for n in size), mode="constant"))
    out = resample_to(vol, case.out_shape, case.out_affine)
    return Volume(out.array.astype(np.float32), np.array(case.out_affine), "intensity")


def coverage(case: CaseVolumes, ks: Sequence[int]) -> tuple[int, int]:
    """(output voxels inside the input's brain, how many of them receive generated slices) when
    the axial grid slices ``ks`` are generated (the rest stays 0)."""
    brain = case.brain.astype(np.float32)
    done = np.zeros_like(brain)
    done[:, :, list(ks)] = brain[:, :, list(ks)]
    inside = to_output_space(brain, case).array > 0.5
    filled = to_output_space(done, case).array > 0
    return int(inside.sum()), int((inside & filled).sum())


def representative_rule(case: CaseVolumes) -> str:
    """Which slice :func:`representative_slice` takes, in words (printed by diagnose / report)."""
    if case.lesion is not None and case.lesion.any():
        return "the lesion's middle axial slice"
    return "the largest brain slice of the central fifth (no lesion mask)"


def representative_slice(case: CaseVolumes, size: int) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """(modality -> [S, S] in MODALITIES order, brain [S, S], axial index) of the ``lesion`` slice."""
    k = select_slices(case.brain, case.lesion, "lesion")[0]
    images, brain = cut_slices(case, [k], slice_geometry(case.brain, size))
    return {m: images[m][0] for m in MODALITIES if m in images}, brain[0], k
