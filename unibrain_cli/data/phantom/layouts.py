"""Source-style naming, grids and file layout of the phantom (the `synth` <-> `prepare` contract).

Default layout (``all_modalities=False``)::

    OUT/radgenome/train_val_test_split.json, OUT/radgenome/<subset>/{modal_wise_finding,impression,global_finding}.json
    OUT/images/BraTS2023-{GLI,MEN,MET}/<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz
    OUT/images/ISLES-2022/<sub>/ses-0001/{dwi,anat}/..., OUT/images/ISLES-2022/derivatives/<sub>/ses-0001/<sub>_ses-0001_msk.nii.gz
    OUT/images/WMH2017/training/<Site>/<n>/{pre/T1,pre/FLAIR,wmh}.nii.gz

Flat layout (``all_modalities=True``): ``OUT/all_data_Reg/<id>/<id>-{t1,t2,flair,t1ce,dwi,adc,seg}.nii.gz``
with ``OUT/combined_*.json`` and ``OUT/train_val_test_split.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unibrain_cli.data.phantom.anatomy import Grid, centred_grid
from unibrain_cli.modalities import DISEASES, MODALITIES

SUBSETS: tuple[str, ...] = ("BraTS_GLI", "BraTS_MEN", "BraTS_MET", "ISLES22", "WMH")
SUBSET_DISEASE: dict[str, str] = dict(zip(SUBSETS, DISEASES))

#: canonical modality -> the source's own sequence name (used in file names and report keys).
SOURCE_SEQUENCES: dict[str, dict[str, str]] = {
    "BraTS_GLI": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
    "BraTS_MEN": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
    "BraTS_MET": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
    "ISLES22": {"dwi": "dwi", "adc": "adc", "flair": "flair"},
    "WMH": {"t1": "T1", "flair": "FLAIR"},
}

#: WMH 2017 sites: (name, first case number, shape at 1 mm mode, voxel size mm).
WMH_SITES: tuple[tuple[str, int, tuple[int, int, int], tuple[float, float, float]], ...] = (
    ("Utrecht", 0, (240, 240, 48), (0.96, 0.96, 3.0)),
    ("Singapore", 50, (252, 232, 48), (0.96, 0.95, 3.0)),
    ("GE3T", 100, (224, 256, 54), (0.98, 0.98, 3.0)),
)


@dataclass(frozen=True)
class Acquisition:
    """Images of one case that share a grid: canonical ``modalities`` -> relative ``paths``;
    ``mask_path`` is set on the acquisition whose grid carries the lesion mask."""

    grid: Grid
    modalities: tuple[str, ...]
    paths: dict[str, str]
    mask_path: str | None = None


@dataclass(frozen=True)
class CaseSpec:
    """One phantom case: global ``index`` (seeds it), subset, disease, source-style id,
    report-key sequence names and its acquisitions (the first defines the subject's world centre)."""

    index: int
    subset: str
    disease: str
    case_id: str
    seq_names: dict[str, str]
    acquisitions: tuple[Acquisition, ...]

    @property
    def modalities(self) -> tuple[str, ...]:
        """Canonical modalities of the case, in canonical order."""
        have = {m for a in self.acquisitions for m in a.modalities}
        return tuple(m for m in MODALITIES if m in have)

    @property
    def mask_acquisition(self) -> Acquisition:
        return next(a for a in self.acquisitions if a.mask_path is not None)

    def image_id(self, modality: str) -> str:
        """Report key / split id of one image: ``<case>-<seq>``."""
        return f"{self.case_id}-{self.seq_names[modality]}"


def brats_grid(resolution: int) -> Grid:
    """BraTS 2023 grid: 240x240x155 at 1 mm (120x120x78 at 2 mm), LPS-like affine as shipped."""
    r = float(resolution)
    shape = (240 // resolution, 240 // resolution, -(-155 // resolution))
    affine = np.array([[-r, 0, 0, 0], [0, -r, 0, 240.0 - r], [0, 0, r, 0], [0, 0, 0, 1]])
    return Grid(shape, affine)


def isles_grids(resolution: int) -> tuple[Grid, Grid]:
    """ISLES'22-like grids: DWI/ADC 2 mm 112x112x73; FLAIR its own finer grid, shifted."""
    dwi = centred_grid((112, 112, 73), (2.0, 2.0, 2.0))
    if resolution == 1:
        flair = centred_grid((192, 224, 132), (1.0, 1.0, 1.2), centre=(1.5, -2.0, 3.0))
    else:
        flair = centred_grid((96, 112, 66), (2.0, 2.0, 2.4), centre=(1.5, -2.0, 3.0))
    return dwi, flair


def wmh_grid(site: int, resolution: int) -> Grid:
    """Per-site anisotropic WMH 2017 grid (in-plane doubled at 2 mm mode, slices kept)."""
    _, _, shape, spacing = WMH_SITES[site]
    if resolution == 2:
        shape = (shape[0] // 2, shape[1] // 2, shape[2])
        spacing = (spacing[0] * 2, spacing[1] * 2, spacing[2])
    return centred_grid(shape, spacing)


def case_id(subset: str, k: int) -> str:
    """Source-style id of the ``k``-th case (0-based) of ``subset``."""
    if subset.startswith("BraTS_"):
        return f"BraTS-{subset[6:]}-{k:05d}-000"
    if subset == "ISLES22":
        return f"sub-strokecase{k + 1:04d}"
    site, first, _, _ = WMH_SITES[k % len(WMH_SITES)]
    return f"{site}_{first + k // len(WMH_SITES)}"


def _default_case(index: int, subset: str, k: int, resolution: int) -> CaseSpec:
    cid = case_id(subset, k)
    seqs = SOURCE_SEQUENCES[subset]
    if subset.startswith("BraTS_"):
        folder = f"images/BraTS2023-{subset[6:]}/{cid}"
        paths = {m: f"{folder}/{cid}-{s}.nii.gz" for m, s in seqs.items()}
        acqs = (Acquisition(brats_grid(resolution), ("t1", "t1ce", "t2", "flair"), paths, f"{folder}/{cid}-seg.nii.gz"),)
    elif subset == "ISLES22":
        dwi, flair = isles_grids(resolution)
        root = f"images/ISLES-2022/{cid}/ses-0001"
        acqs = (
            Acquisition(dwi, ("dwi", "adc"), {"dwi": f"{root}/dwi/{cid}_ses-0001_dwi.nii.gz",
                                               "adc": f"{root}/dwi/{cid}_ses-0001_adc.nii.gz"},
                        f"images/ISLES-2022/derivatives/{cid}/ses-0001/{cid}_ses-0001_msk.nii.gz"),
            Acquisition(flair, ("flair",), {"flair": f"{root}/anat/{cid}_ses-0001_FLAIR.nii.gz"}),
        )
    else:
        site = k % len(WMH_SITES)
        name, number = cid.rsplit("_", 1)
        folder = f"images/WMH2017/training/{name}/{number}"
        acqs = (Acquisition(wmh_grid(site, resolution), ("t1", "flair"),
                            {"t1": f"{folder}/pre/T1.nii.gz", "flair": f"{folder}/pre/FLAIR.nii.gz"},
                            f"{folder}/wmh.nii.gz"),)
    return CaseSpec(index, subset, SUBSET_DISEASE[subset], cid, dict(seqs), acqs)


def _flat_case(index: int, subset: str, k: int, resolution: int) -> CaseSpec:
    cid = case_id(subset, k)
    folder = f"all_data_Reg/{cid}"
    paths = {m: f"{folder}/{cid}-{m}.nii.gz" for m in MODALITIES}
    acq = Acquisition(brats_grid(resolution), MODALITIES, paths, f"{folder}/{cid}-seg.nii.gz")
    return CaseSpec(index, subset, SUBSET_DISEASE[subset], cid, {m: m for m in MODALITIES}, (acq,))


def case_specs(cases: int, resolution: int, all_modalities: bool) -> list[CaseSpec]:
    """``cases`` case specs, round-robin over the five subsets (GLI, MEN, MET, ISLES22, WMH)."""
    make = _flat_case if all_modalities else _default_case
    return [make(i, SUBSETS[i % len(SUBSETS)], i // len(SUBSETS), resolution) for i in range(cases)]


def split_cases(case_ids: list[str], rng: np.random.Generator) -> dict[str, list[str]]:
    """Deterministic ~70/10/20 split of one subset's cases (test >= 1 from 2 cases, val >= 1 from 4)."""
    n = len(case_ids)
    n_test = max(round(0.2 * n), 1 if n >= 2 else 0)
    n_val = max(round(0.1 * n), 1 if n >= 4 else 0)
    order = rng.permutation(n)
    test = sorted(order[:n_test].tolist())
    val = sorted(order[n_test:n_test + n_val].tolist())
    train = sorted(order[n_test + n_val:].tolist())
    return {"train": [case_ids[i] for i in train], "val": [case_ids[i] for i in val],
            "test": [case_ids[i] for i in test]}
