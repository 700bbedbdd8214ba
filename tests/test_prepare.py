"""`prepare`: sources, preprocessing, bad inputs, resumability (tiny hand-made NIfTI fixtures).

The fixture builders (``make_release``, ``make_flat``) write volumes in the real-world
layouts of BraTS 2023, ISLES'22 BIDS, WMH 2017 and the flat ``all_data_Reg`` tree. Each
volume samples one world-space "head" (ellipsoid brain + spherical lesion) on its own grid,
so correct physical-space alignment can be checked after resampling.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from unibrain_cli.data import prepare as prep_mod
from unibrain_cli.data.prepare import PROBLEM_COLUMNS, normalise_intensity, prepare, summary_table
from unibrain_cli.data.sources import classify_image, infer_subset, normalise_diseases, read_split
from unibrain_cli.errors import UserError

BRAIN_RADII = np.array([9.0, 10.0, 5.0])  # mm, world ellipsoid centred at the origin
LESION = {"brats": ((3.0, 2.0, 0.0), 3.0), "isles": ((2.0, -3.0, 1.0), 4.0), "wmh": ((-3.0, 3.0, 0.0), 3.5)}
SEQS = {"brats": ("t1n", "t1c", "t2w", "t2f"), "isles": ("dwi", "adc", "flair"), "wmh": ("T1", "FLAIR")}
DISEASE = {"BraTS-GLI": "glioma", "BraTS-MEN": "meningioma", "BraTS-MET": "metastasis",
           "sub-strokecase": "stroke", "Singapore": "wmh", "Utrecht": "wmh"}
SUBSET_DIR = {"BraTS-GLI": "BraTS_GLI", "BraTS-MEN": "BraTS_MEN", "BraTS-MET": "BraTS_MET",
              "sub-strokecase": "ISLES22", "Singapore": "WMH", "Utrecht": "WMH"}


# --------------------------------------------------------------------------- fixture builders


def world_coords(shape, affine) -> np.ndarray:
    """RAS world coordinates [X, Y, Z, 3] of every voxel centre."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def head(shape, affine, kind: str, channel: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(intensity float32, lesion bool) of the world phantom sampled on a grid."""
    xyz = world_coords(shape, affine)
    brain = (((xyz / BRAIN_RADII) ** 2).sum(-1)) <= 1.0
    centre, radius = LESION[kind]
    lesion = (((xyz - np.array(centre)) ** 2).sum(-1) <= radius**2) & brain
    rng = np.random.default_rng(seed + channel)
    img = brain * (40.0 + 10 * channel + 0.8 * xyz[..., 0] + rng.normal(0, 1.0, shape)) + lesion * 60.0
    return np.where(brain, img, 0).astype(np.float32), lesion


def write_nii(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def brats_affine() -> np.ndarray:
    # as BraTS ships: LPS-like voxel order (i -> left, j -> posterior), 1 mm
    return np.array([[-1.0, 0, 0, 11.5], [0, -1.0, 0, 11.5], [0, 0, 1.0, -5.5], [0, 0, 0, 1]])


def write_brats(images: Path, case: str, seqs=SEQS["brats"]) -> dict[str, Path]:
    folder = images / f"BraTS2023-{case.split('-')[1]}" / case
    shape, aff = (24, 24, 12), brats_affine()
    out = {}
    for c, seq in enumerate(seqs):
        img, lesion = head(shape, aff, "brats", c)
        out[seq] = write_nii(folder / f"{case}-{seq}.nii.gz", img, aff)
    # BraTS labels: 1 necrosis (core), 2 oedema (shell), 3 enhancing
    xyz = world_coords(shape, aff)
    dist = np.sqrt(((xyz - np.array(LESION["brats"][0])) ** 2).sum(-1))
    seg = np.where(lesion, np.where(dist < 1.2, 1, np.where(dist < 2.2, 3, 2)), 0).astype(np.int16)
    out["seg"] = write_nii(folder / f"{case}-seg.nii.gz", seg, aff)
    return out


def write_isles(images: Path, case: str) -> dict[str, Path]:
    root = images / "ISLES-2022"
    ses = f"{case}_ses-0001"
    # DWI/ADC: 2 mm, LAS voxel order, FOV shifted; FLAIR: 1 mm RAS on its own grid
    dwi_shape, dwi_aff = (12, 12, 8), np.array([[-2.0, 0, 0, 11.0], [0, 2.0, 0, -12.0], [0, 0, 2.0, -7.0], [0, 0, 0, 1]])
    fl_shape, fl_aff = (24, 24, 16), np.array([[1.0, 0, 0, -11.5], [0, 1.0, 0, -11.5], [0, 0, 1.0, -7.5], [0, 0, 0, 1]])
    out = {}
    dwi, lesion = head(dwi_shape, dwi_aff, "isles", 0)
    out["dwi"] = write_nii(root / case / "ses-0001" / "dwi" / f"{ses}_dwi.nii.gz", dwi, dwi_aff)
    adc, _ = head(dwi_shape, dwi_aff, "isles", 1)
    out["adc"] = write_nii(root / case / "ses-0001" / "dwi" / f"{ses}_adc.nii.gz", adc, dwi_aff)
    fl, _ = head(fl_shape, fl_aff, "isles", 2)
    out["flair"] = write_nii(root / case / "ses-0001" / "anat" / f"{ses}_FLAIR.nii.gz", fl, fl_aff)
    out["seg"] = write_nii(root / "derivatives" / case / "ses-0001" / f"{ses}_msk.nii.gz",
                           lesion.astype(np.uint8), dwi_aff)
    return out


def write_wmh(images: Path, case: str) -> dict[str, Path]:
    site, n = case.rsplit("_", 1)
    folder = images / "WMH2017" / "training" / site / n
    shape = (24, 24, 6)
    aff = np.array([[0.96, 0, 0, -11.0], [0, 0.95, 0, -11.0], [0, 0, 3.0, -7.5], [0, 0, 0, 1]])
    out = {}
    for c, seq in enumerate(SEQS["wmh"]):
        img, lesion = head(shape, aff, "wmh", c)
        out[seq] = write_nii(folder / "pre" / f"{seq}.nii.gz", img, aff)
    xyz = world_coords(shape, aff)
    other = (((xyz - np.array([4.0, -4.0, 0.0])) ** 2).sum(-1) <= 4.0)
    label = np.where(lesion, 1, np.where(other, 2, 0)).astype(np.int16)
    out["seg"] = write_nii(folder / "wmh.nii.gz", label, aff)
    # WMH's unprocessed copies live in orig/ and must be ignored
    write_nii(folder / "orig" / "3DT1.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    return out


def _prefix(case: str) -> str:
    return next(p for p in DISEASE if case.startswith(p))


def kind_of(case: str) -> str:
    return "brats" if case.startswith("BraTS") else "isles" if case.startswith("sub-") else "wmh"


def finding_text(case: str, seq: str) -> str:
    return f"{seq} of {case}: an abnormal signal area of about 76*72*69mm in the right frontal lobe."


def make_release(tmp: Path, cases: dict[str, str | None], write_images: bool = True) -> dict[str, dict[str, Path]]:
    """Release tree under tmp/radgenome and source images under tmp/images.

    ``cases`` maps case id -> split (None: left out of the split file). Returns the image
    files per case (seq -> path, plus "seg").
    """
    rg, images = tmp / "radgenome", tmp / "images"
    files: dict[str, dict[str, Path]] = {}
    per_subset: dict[str, dict[str, dict]] = {}
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for case, sp in cases.items():
        kind = kind_of(case)
        if write_images:
            files[case] = {"brats": write_brats, "isles": write_isles, "wmh": write_wmh}[kind](images, case)
        sub = per_subset.setdefault(SUBSET_DIR[_prefix(case)], {"mwf": {}, "imp": {}, "glob": {}})
        for seq in SEQS[kind]:
            sub["mwf"][f"{case}-{seq}"] = finding_text(case, seq)
            if sp is not None:
                split[sp].append(f"{case}-{seq}")
        sub["imp"][case] = {"impression": f"Impression for {case}.", "disease": [DISEASE[_prefix(case)]]}
        sub["glob"][case] = f"Global finding of {case}: lesion 7.6 x 7.2 x 6.9 cm."
    rg.mkdir(parents=True, exist_ok=True)
    for subset, d in per_subset.items():
        (rg / subset).mkdir(exist_ok=True)
        (rg / subset / "modal_wise_finding.json").write_text(json.dumps(d["mwf"]))
        (rg / subset / "impression.json").write_text(json.dumps(d["imp"]))
        (rg / subset / "global_finding.json").write_text(json.dumps(d["glob"]))
    (rg / "train_val_test_split.json").write_text(json.dumps(split))
    return files


def make_flat(tmp: Path, cases: dict[str, tuple[str, str]]) -> Path:
    """Flat UniBrain layout: tmp/flat/all_data_Reg/<s>/<s>-<mod>.nii.gz + combined_*.json.

    ``cases``: subject -> (disease, split). All six modalities on one 1 mm grid.
    """
    root = tmp / "flat"
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = (-11.5, -11.5, -5.5)
    mwf, imp, glob, split = {}, {}, {}, {"train": [], "validation": [], "test": []}
    for subject, (disease, sp) in cases.items():
        folder = root / "all_data_Reg" / subject
        for c, mod in enumerate(("t1", "t2", "flair", "t1ce", "dwi", "adc")):
            img, lesion = head((24, 24, 12), aff, "brats", c)
            write_nii(folder / f"{subject}-{mod}.nii.gz", img, aff)
            mwf[f"{subject}-{mod}"] = finding_text(subject, mod)
        label = lesion.astype(np.int16) * (1 if disease in ("stroke", "wmh") else 2)
        write_nii(folder / f"{subject}-seg.nii.gz", label, aff)
        imp[subject] = {"impression": f"Impression {subject}", "disease": [disease]}
        glob[subject] = f"Global {subject}"
        split[sp].append(subject)  # case ids, not image ids
    (root / "combined_modal_wise_finding.json").write_text(json.dumps(mwf))
    (root / "combined_impression.json").write_text(json.dumps(imp))
    (root / "combined_global_finding.json").write_text(json.dumps(glob))
    (root / "train_val_test_split.json").write_text(json.dumps(split))
    return root


GOOD = {"BraTS-GLI-00000-000": "train", "sub-strokecase0001": "val", "Singapore_69": "test"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """One prepared release tree (BraTS + ISLES + WMH), shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("release")
    files = make_release(tmp, GOOD)
    res = prepare(tmp / "radgenome", tmp / "prepared", images=[tmp / "images"])
    return tmp, files, res


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


# --------------------------------------------------------------------------- sources


def test_classify_image_layouts(tmp_path):
    assert classify_image(Path("/x/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz")) == (
        "BraTS-GLI-00001-000", "t2f", "brats")
    assert classify_image(Path("/x/all_data_Reg/Singapore_69/Singapore_69-flair.nii.gz")) == (
        "Singapore_69", "flair", "flat")
    assert classify_image(Path("/x/sub-strokecase0007/ses-0001/anat/sub-strokecase0007_ses-0001_FLAIR.nii.gz")) == (
        "sub-strokecase0007", "FLAIR", "isles")
    assert classify_image(Path("/d/derivatives/sub-strokecase0007/ses-0001/sub-strokecase0007_ses-0001_msk.nii.gz"))[:2] == (
        "sub-strokecase0007", "msk")
    assert classify_image(Path("/w/training/Utrecht/11/pre/T1.nii.gz")) == ("Utrecht_11", "T1", "wmh")
    assert classify_image(Path("/w/training/Utrecht/11/wmh.nii.gz")) == ("Utrecht_11", "wmh", "wmh")
    assert classify_image(Path("/w/random/thing.nii.gz")) is None


def test_subset_and_disease_names():
    assert infer_subset("BraTS-MET-00002-000") == "BraTS_MET"
    assert infer_subset("sub-strokecase0100") == "ISLES22"
    assert infer_subset("GE3T_100") == "WMH"
    assert infer_subset("patient7") == "flat"
    assert normalise_diseases(["Glioma", "brain metastasis", "acute ischemic stroke", "tumour"]) == (
        ["glioma", "metastasis", "stroke"], ["tumour"])


def test_read_split_tolerant(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({
        "Train": ["A-t1n", "A-t2f", "B"],
        "Validation": ["C-dwi"],
        "TEST": ["D-T1", "Z-t1n", "A-t1c"],
        "notes": "x",
    }))
    splits, problems = read_split(path, {"A", "B", "C", "D", "E"})
    # A is listed in train and test: the held-out split wins and the conflict is reported
    assert splits == {"A": "test", "B": "train", "C": "val", "D": "test"}
    kinds = {(p.kind, p.case_id) for p in problems}
    assert ("split_unknown_id", "Z-t1n") in kinds and ("split_conflict", "A") in kinds
    assert any(p.kind == "split_unknown_key" and "notes" in p.reason for p in problems)
    assert all(p.file == str(path) for p in problems)


def test_read_split_nested_per_subset(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"BraTS_GLI": {"train": ["A-t1n"]}, "WMH": {"test": ["B"]}}))
    splits, problems = read_split(path, {"A", "B"})
    assert splits == {"A": "train", "B": "test"} and problems == []


def test_normalise_intensity_percentiles():
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1000, (20, 20, 20)).astype(np.float32)
    brain = np.zeros(arr.shape, bool)
    brain[2:18, 2:18, 2:18] = True
    out, lo, hi = normalise_intensity(arr, brain)
    assert lo == pytest.approx(np.percentile(arr[brain], 0.5)) and hi == pytest.approx(np.percentile(arr[brain], 99.5))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[~brain] == 0)
    inside = arr[brain]
    mid = (inside > lo) & (inside < hi)
    np.testing.assert_allclose(out[brain][mid], (inside[mid] - lo) / (hi - lo), rtol=1e-5)
    # bit for bit the float32 clip / shift / scale of the brain voxels alone, also where the
    # background is nonzero or the window starts below 0 (then 0 does not map to 0), +0.0 outside
    shifted = np.asfortranarray(arr - 300.0)
    out, lo, hi = normalise_intensity(shifted, brain)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    want = np.zeros_like(shifted)
    want[brain] = (np.clip(shifted[brain], lo32, hi32) - lo32) / (hi32 - lo32)
    assert lo < 0 and out.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="constant"):
        normalise_intensity(np.ones_like(arr), brain)


# --------------------------------------------------------------------------- prepare: good input


def test_release_tree_prepared(release):
    tmp, files, res = release
    out = tmp / "prepared"
    assert res.n_prepared == 3 and res.n_skipped_existing == 0
    man = pd.read_parquet(out / "manifest.parquet")
    assert list(man.columns) == list(prep_mod.MANIFEST_COLUMNS)
    by = man.set_index("case_id")
    assert by.loc["BraTS-GLI-00000-000", ["subset", "split", "diseases", "modalities"]].tolist() == [
        "BraTS_GLI", "train", "glioma", "t1|t2|flair|t1ce"]
    assert by.loc["sub-strokecase0001", ["subset", "split", "diseases", "modalities"]].tolist() == [
        "ISLES22", "val", "stroke", "flair|dwi|adc"]
    assert by.loc["Singapore_69", ["subset", "split", "diseases", "modalities"]].tolist() == [
        "WMH", "test", "wmh", "t1|flair"]
    for case, row in by.iterrows():
        paths = json.loads(row["files"])
        assert set(paths) == {*row["modalities"].split("|"), "mask", "labels", "brain"}
        imgs = {k: _load(out / p) for k, p in paths.items()}
        shapes = {img.shape for img in imgs.values()}
        assert len(shapes) == 1 and list(shapes.pop()) == json.loads(row["shape"])
        for img in imgs.values():
            np.testing.assert_allclose(img.affine, imgs["brain"].affine, atol=1e-5)
            # RAS+ canonical, 1 mm isotropic
            np.testing.assert_allclose(np.diag(img.affine)[:3], 1.0, atol=1e-5)
        brain = np.asarray(imgs["brain"].dataobj) > 0
        for mod in row["modalities"].split("|"):
            arr = np.asarray(imgs[mod].dataobj)
            assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.max() == pytest.approx(1.0)
            assert np.all(arr[~brain] == 0)
        # checksums and original geometry of every input (to map results back)
        sha = json.loads(row["source_sha256"])
        geo = json.loads(row["source_geometry"])
        for key, path in json.loads(row["source_files"]).items():
            assert sha[key] == _sha(Path(path))
            src = _load(Path(path))
            assert geo[key]["shape"] == list(src.shape)
            np.testing.assert_allclose(geo[key]["affine"], src.affine, atol=1e-5)
        findings = json.loads(row["findings"])
        assert set(findings) == set(row["modalities"].split("|"))
        assert "76*72*69mm" in next(iter(findings.values()))
        case_json = json.loads((out / row["case_dir"] / "case.json").read_text())
        assert case_json["case_id"] == case and case_json["split"] == row["split"]
    problems = pd.read_csv(out / "problems.csv")
    assert list(problems.columns) == list(PROBLEM_COLUMNS) and problems.empty
    # the documented keys: '<case>-<seq>', ISLES by BIDS subject, WMH by '<site>_<id>'
    assert res.matching == [
        "BraTS_GLI: 1 report matched by case_id with '-' before the sequence; 0 unmatched",
        "ISLES22: 1 report matched by subject with '-' before the sequence; 0 unmatched",
        "WMH: 1 report matched by site_id with '-' before the sequence; 0 unmatched",
    ]


def test_isles_grids_end_aligned(release):
    """DWI/ADC (2 mm, LAS, shifted FOV) and FLAIR (1 mm) sample one lesion: after prepare
    the lesion blob sits at the same voxels in every modality and in the mask."""
    tmp, files, _ = release
    case_dir = tmp / "prepared" / "cases" / "sub-strokecase0001"
    info = json.loads((case_dir / "case.json").read_text())
    assert info["reference_modality"] == "flair"
    assert info["shape"] == [24, 24, 16]  # the FLAIR grid (finest), already 1 mm
    mask = np.asarray(_load(case_dir / "mask.nii.gz").dataobj) > 0
    aff = _load(case_dir / "mask.nii.gz").affine
    lesion_world = np.array(LESION["isles"][0])
    np.testing.assert_allclose(_centroid(mask, aff), lesion_world, atol=1.0)
    for mod in ("dwi", "adc", "flair"):
        arr = np.asarray(_load(case_dir / f"{mod}.nii.gz").dataobj)
        bright = arr > 0.6
        np.testing.assert_allclose(_centroid(bright, aff), lesion_world, atol=1.0)
        assert (bright & mask).sum() / bright.sum() > 0.6


def test_label_conventions(release):
    tmp, _, _ = release
    cases = tmp / "prepared" / "cases"
    # BraTS: every label > 0 is lesion; the source labels 1/2/3 are kept
    labels = np.asarray(_load(cases / "BraTS-GLI-00000-000" / "labels.nii.gz").dataobj)
    mask = np.asarray(_load(cases / "BraTS-GLI-00000-000" / "mask.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(mask, (labels > 0).astype(mask.dtype))
    # WMH: 1 = WMH (lesion), 2 = other pathology (kept in labels, not in the mask)
    labels = np.asarray(_load(cases / "Singapore_69" / "labels.nii.gz").dataobj)
    mask = np.asarray(_load(cases / "Singapore_69" / "mask.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(mask, (labels == 1).astype(mask.dtype))
    info = json.loads((cases / "Singapore_69" / "case.json").read_text())
    assert info["spacing"] == [1.0, 1.0, 1.0] and info["shape"] == [23, 23, 18]


def test_brats_orientation_is_ras(release):
    """BraTS arrays are stored LPS-like; after prepare, array index order is RAS+ and the
    lesion (world x = +3 mm, right) sits at a higher i than the brain centre."""
    tmp, files, _ = release
    case_dir = tmp / "prepared" / "cases" / "BraTS-GLI-00000-000"
    img = _load(case_dir / "t1.nii.gz")
    src = _load(files["BraTS-GLI-00000-000"]["t1n"])
    # the same world point holds the same value (pure reorientation, no interpolation)
    prepared = np.asarray(img.dataobj)
    raw = np.asarray(src.dataobj)
    brain = np.asarray(_load(case_dir / "brain.nii.gz").dataobj) > 0
    lo, hi = np.percentile(raw[raw != 0], [0.5, 99.5])
    expect = np.clip((raw[::-1, ::-1, :] - lo) / (hi - lo), 0, 1) * brain
    np.testing.assert_allclose(prepared, expect, atol=1e-5)
    np.testing.assert_allclose(img.affine[:3, 3], src.affine[:3, :3] @ [23, 23, 0] + src.affine[:3, 3])


def test_flat_layout_and_case_id_split(tmp_path):
    root = make_flat(tmp_path, {
        "BraTS-GLI-00003-000": ("stroke", "train"),
        "Singapore_69": ("wmh", "validation"),
        "sub-strokecase0002": ("glioma", "test"),
    })
    res = prepare(root, tmp_path / "prep")
    man = res.manifest.set_index("case_id")
    assert man["modalities"].unique().tolist() == ["t1|t2|flair|t1ce|dwi|adc"]
    assert man.loc["BraTS-GLI-00003-000", ["subset", "split", "diseases"]].tolist() == ["BraTS_GLI", "train", "stroke"]
    assert man.loc["Singapore_69", ["subset", "split", "diseases"]].tolist() == ["WMH", "val", "wmh"]
    assert man.loc["sub-strokecase0002", ["split", "diseases"]].tolist() == ["test", "glioma"]
    for case in man.index:
        mask = np.asarray(_load(tmp_path / "prep" / "cases" / case / "mask.nii.gz").dataobj)
        assert mask.sum() > 0  # label 2 (glioma convention) and label 1 (wmh convention) both count
    assert res.summary["cases"].loc["total", "total"] == 3
    assert res.matching == [
        "BraTS_GLI: 1 report matched by case_id with '-' before the sequence; 0 unmatched",
        "ISLES22: 1 report matched by subject with '-' before the sequence; 0 unmatched",
        "WMH: 1 report matched by case_id with '-' before the sequence; 0 unmatched",
    ]


def test_unsplit_cases_are_reported_not_trained(tmp_path):
    make_release(tmp_path, {"BraTS-GLI-00000-000": "train", "BraTS-MEN-00001-000": None})
    res = prepare(tmp_path / "radgenome", tmp_path / "prep", images=[tmp_path / "images"])
    man = res.manifest.set_index("case_id")
    assert man.loc["BraTS-MEN-00001-000", "split"] == "unsplit"
    assert res.summary["cases"].loc["BraTS_MEN", "unsplit"] == 1
    assert res.summary["cases"].loc["BraTS_MEN", "train"] == 0
    assert [(p.case_id, p.kind) for p in res.problems] == [("BraTS-MEN-00001-000", "unsplit")]


def test_summary_table_renders(release):
    from rich.console import Console

    _, _, res = release
    console = Console(record=True, width=160)
    console.print(summary_table(res))
    text = console.export_text()
    for word in ("BraTS_GLI", "ISLES22", "WMH", "unsplit", "total", "flair", "problems by kind"):
        assert word in text


# --------------------------------------------------------------------------- prepare: bad input


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_inputs_each_reported_and_skipped(tmp_path):
    cases = {f"BraTS-GLI-0000{i}-000": "train" for i in range(8)}
    cases["sub-strokecase0001"] = "test"
    files = make_release(tmp_path, cases)
    img = tmp_path / "images"
    aff = brats_affine()
    # 0: good. 1: missing volume
    files["BraTS-GLI-00001-000"]["t2w"].unlink()
    # 2: truncated .nii.gz
    _truncate(files["BraTS-GLI-00002-000"]["t1c"])
    # 3: 4D file with 2 volumes; 4: 2D file
    write_nii(files["BraTS-GLI-00003-000"]["t1n"], np.ones((24, 24, 12, 2), np.float32), aff)
    write_nii(files["BraTS-GLI-00004-000"]["t2f"], np.ones((24, 24), np.float32), aff)
    # 5: NaN / Inf voxels
    arr = np.asarray(_load(files["BraTS-GLI-00005-000"]["t1n"]).dataobj).copy()
    arr[3, 3, 3], arr[4, 4, 4] = np.nan, np.inf
    write_nii(files["BraTS-GLI-00005-000"]["t1n"], arr, aff)
    # 6: a modality whose physical extent does not overlap the others
    far = aff.copy()
    far[:3, 3] += 500.0
    write_nii(files["BraTS-GLI-00006-000"]["t2w"], np.ones((24, 24, 12), np.float32), far)
    # 7: unknown modality suffix
    unknown = write_nii(files["BraTS-GLI-00007-000"]["t1n"].parent / "BraTS-GLI-00007-000-t3x.nii.gz",
                        np.ones((24, 24, 12), np.float32), aff)
    # ISLES: its global_finding.json is empty -> reported, case kept with an empty global finding
    (tmp_path / "radgenome" / "ISLES22" / "global_finding.json").write_text("")
    # a report for a case with no images
    rg = tmp_path / "radgenome"
    mwf = json.loads((rg / "BraTS_GLI" / "modal_wise_finding.json").read_text())
    mwf["BraTS-GLI-00099-000-t1n"] = "orphan report"
    (rg / "BraTS_GLI" / "modal_wise_finding.json").write_text(json.dumps(mwf))
    # the split lists unknown ids
    split = json.loads((rg / "train_val_test_split.json").read_text())
    split["train"] += ["BraTS-GLI-77777-000-t1n", "nobody"]
    (rg / "train_val_test_split.json").write_text(json.dumps(split))
    before = {p: _sha(p) for p in img.rglob("*.nii.gz")}

    res = prepare(rg, tmp_path / "prep", images=[img])

    assert sorted(res.manifest["case_id"]) == ["BraTS-GLI-00000-000", "sub-strokecase0001"]
    problems = pd.read_csv(tmp_path / "prep" / "problems.csv", keep_default_na=False)
    rows = {(r.case_id, r.kind): r for r in problems.itertuples()}
    expect = {
        ("BraTS-GLI-00001-000", "missing_volume"): str(files["BraTS-GLI-00001-000"]["t2w"].resolve()),
        ("BraTS-GLI-00002-000", "unreadable"): str(files["BraTS-GLI-00002-000"]["t1c"].resolve()),
        ("BraTS-GLI-00003-000", "not_3d"): str(files["BraTS-GLI-00003-000"]["t1n"].resolve()),
        ("BraTS-GLI-00004-000", "not_3d"): str(files["BraTS-GLI-00004-000"]["t2f"].resolve()),
        ("BraTS-GLI-00005-000", "nonfinite"): str(files["BraTS-GLI-00005-000"]["t1n"].resolve()),
        ("BraTS-GLI-00006-000", "no_overlap"): str(files["BraTS-GLI-00006-000"]["t2w"].resolve()),
        ("BraTS-GLI-00007-000", "unknown_modality"): str(unknown.resolve()),
        ("BraTS-GLI-00099-000", "no_images"): str(rg / "BraTS_GLI" / "modal_wise_finding.json"),
        ("", "bad_json"): str(rg / "ISLES22" / "global_finding.json"),
        ("BraTS-GLI-77777-000-t1n", "split_unknown_id"): str(rg / "train_val_test_split.json"),
        ("nobody", "split_unknown_id"): str(rg / "train_val_test_split.json"),
    }
    for key, file in expect.items():
        assert key in rows, f"missing problem row {key}: {rows.keys()}"
        assert rows[key].file == file, key
        assert rows[key].reason
    assert "2D" in rows[("BraTS-GLI-00004-000", "not_3d")].reason
    assert "4D" in rows[("BraTS-GLI-00003-000", "not_3d")].reason
    assert ("sub-strokecase0001", "missing_global_finding") in rows
    assert res.manifest.set_index("case_id").loc["sub-strokecase0001", "global_finding"] == ""
    # inputs are never modified, and no half-written case is left
    assert {p: _sha(p) for p in img.rglob("*.nii.gz")} == before
    assert sorted(p.name for p in (tmp_path / "prep" / "cases").iterdir()) == [
        "BraTS-GLI-00000-000", "sub-strokecase0001"]


def test_zero_cases_raises_user_error(tmp_path):
    make_release(tmp_path, {"BraTS-GLI-00000-000": "train"}, write_images=False)
    with pytest.raises(UserError, match="no case could be prepared") as err:
        prepare(tmp_path / "radgenome", tmp_path / "prep")
    assert "no_images" in str(err.value)
    problems = pd.read_csv(tmp_path / "prep" / "problems.csv")
    assert problems["kind"].tolist() == ["no_images"]
    assert not (tmp_path / "prep" / "manifest.parquet").exists()


def test_no_reports_at_all(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no_reports"):
        prepare(tmp_path / "empty", tmp_path / "prep")


def test_bad_flags(tmp_path):
    with pytest.raises(UserError) as err:
        prepare(tmp_path / "nope", tmp_path / "prep")
    assert err.value.where == str(tmp_path / "nope")
    (tmp_path / "rg").mkdir()
    with pytest.raises(UserError) as err:
        prepare(tmp_path / "rg", tmp_path / "prep", workers=0)
    assert err.value.where == "--workers"


# --------------------------------------------------------------------------- resumability


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_rerun_skips_redoes_changed_and_force(tmp_path):
    files = make_release(tmp_path, {"BraTS-GLI-00000-000": "train", "BraTS-MEN-00001-000": "test"})
    rg, img, out = tmp_path / "radgenome", tmp_path / "images", tmp_path / "prep"
    first = prepare(rg, out, images=[img])
    cases = out / "cases"
    stamps = _mtimes(cases)
    # leftovers of an interrupted run are cleaned
    (cases / ".BraTS-MEN-00001-000.abc.tmp").mkdir()

    second = prepare(rg, out, images=[img])
    assert (second.n_prepared, second.n_skipped_existing) == (0, 2)
    assert _mtimes(cases) == stamps
    pd.testing.assert_frame_equal(first.manifest, second.manifest)

    # a changed source redoes only its case
    arr = np.asarray(_load(files["BraTS-MEN-00001-000"]["t1n"]).dataobj) * 2.0
    write_nii(files["BraTS-MEN-00001-000"]["t1n"], arr, brats_affine())
    third = prepare(rg, out, images=[img])
    assert (third.n_prepared, third.n_skipped_existing) == (1, 1)
    assert _mtimes(cases / "BraTS-GLI-00000-000") == {k[len("BraTS-GLI-00000-000/"):]: v for k, v in stamps.items()
                                                     if k.startswith("BraTS-GLI-00000-000/")}
    new_sha = json.loads(third.manifest.set_index("case_id").loc["BraTS-MEN-00001-000", "source_sha256"])
    assert new_sha["t1"] == _sha(files["BraTS-MEN-00001-000"]["t1n"])

    # a changed split only updates the records, without resampling
    split = {"train": ["BraTS-GLI-00000-000", "BraTS-MEN-00001-000"]}
    (rg / "train_val_test_split.json").write_text(json.dumps(split))
    fourth = prepare(rg, out, images=[img])
    assert (fourth.n_prepared, fourth.n_skipped_existing) == (0, 2)
    assert set(fourth.manifest["split"]) == {"train"}
    assert json.loads((cases / "BraTS-MEN-00001-000" / "case.json").read_text())["split"] == "train"

    forced = prepare(rg, out, images=[img], force=True)
    assert (forced.n_prepared, forced.n_skipped_existing) == (2, 0)
    assert not any(p.name.startswith(".") for p in cases.iterdir())


def test_interrupted_run_leaves_no_half_case(tmp_path, monkeypatch):
    make_release(tmp_path, {"BraTS-GLI-00000-000": "train", "BraTS-MEN-00001-000": "test"})
    rg, img, out = tmp_path / "radgenome", tmp_path / "images", tmp_path / "prep"
    real_save = prep_mod.save_volume
    calls = {"n": 0}

    def flaky(vol, path, description=None):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the second case
            raise KeyboardInterrupt
        real_save(vol, path, description)

    monkeypatch.setattr(prep_mod, "save_volume", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(rg, out, images=[img])
    assert [p.name for p in (out / "cases").iterdir()] == ["BraTS-GLI-00000-000"]
    assert not (out / "manifest.parquet").exists()
    monkeypatch.setattr(prep_mod, "save_volume", real_save)
    res = prepare(rg, out, images=[img])
    assert (res.n_prepared, res.n_skipped_existing) == (1, 1)


def test_workers_match_inline(tmp_path):
    make_release(tmp_path / "a", {"BraTS-GLI-00000-000": "train", "sub-strokecase0001": "test",
                                  "Utrecht_3": "val"})
    rg, img = tmp_path / "a" / "radgenome", tmp_path / "a" / "images"
    one = prepare(rg, tmp_path / "p1", images=[img], workers=1)
    two = prepare(rg, tmp_path / "p2", images=[img], workers=2)
    pd.testing.assert_frame_equal(one.manifest, two.manifest)
    for case in one.manifest["case_id"]:
        for name in ("flair", "mask", "brain"):
            f1, f2 = (tmp_path / p / "cases" / case / f"{name}.nii.gz" for p in ("p1", "p2"))
            if f1.exists():
                np.testing.assert_array_equal(np.asarray(_load(f1).dataobj), np.asarray(_load(f2).dataobj))


def test_truncated_gzip_is_really_truncated(tmp_path):
    """Guards the fixture: a half .nii.gz is not readable by gzip."""
    p = write_nii(tmp_path / "x.nii.gz", np.ones((24, 24, 12), np.float32), np.eye(4))
    _truncate(p)
    with pytest.raises((EOFError, OSError)), gzip.open(p) as fh:
        fh.read()


def test_spacing_option_sets_the_grid_and_a_changed_spacing_redoes_the_case(tmp_path):
    """--spacing 2: every case grid is 2 mm isotropic over the same physical extent (half the
    voxels per axis of the 1 mm grid), recorded in case.json and the manifest; a rerun at 1 mm
    redoes the case, a rerun at the same spacing skips it; the lesion stays where it was."""
    make_release(tmp_path, {"BraTS-GLI-00000-000": "train"})
    rg, img = tmp_path / "radgenome", tmp_path / "images"
    fine = prepare(rg, tmp_path / "p1", images=[img])
    coarse = prepare(rg, tmp_path / "p2", images=[img], spacing=2.0)
    r1 = json.loads((tmp_path / "p1/cases/BraTS-GLI-00000-000/case.json").read_text())
    r2 = json.loads((tmp_path / "p2/cases/BraTS-GLI-00000-000/case.json").read_text())
    assert r1["spacing"] == [1.0, 1.0, 1.0] and r2["spacing"] == [2.0, 2.0, 2.0]
    assert json.loads(coarse.manifest["spacing"].iloc[0]) == [2.0, 2.0, 2.0]
    assert all(abs(2 * b - a) <= 1 for a, b in zip(r1["shape"], r2["shape"], strict=True))
    m1 = _load(tmp_path / "p1/cases/BraTS-GLI-00000-000/mask.nii.gz")
    m2 = _load(tmp_path / "p2/cases/BraTS-GLI-00000-000/mask.nii.gz")
    c1 = _centroid(np.asarray(m1.dataobj) > 0, m1.affine)
    c2 = _centroid(np.asarray(m2.dataobj) > 0, m2.affine)
    assert np.linalg.norm(c1 - c2) < 2.0  # mm: the same lesion in the same place
    again = prepare(rg, tmp_path / "p2", images=[img], spacing=2.0)
    assert (again.n_prepared, again.n_skipped_existing) == (0, 1)
    back = prepare(rg, tmp_path / "p2", images=[img], spacing=1.0)
    assert (back.n_prepared, back.n_skipped_existing) == (1, 0)
    assert back.manifest["shape"].iloc[0] == fine.manifest["shape"].iloc[0]
    for bad in (0.0, float("nan"), 9.0):
        with pytest.raises(UserError) as err:
            prepare(rg, tmp_path / "p3", images=[img], spacing=bad)
        assert err.value.where == "--spacing"
    assert not (tmp_path / "p3").exists()


@pytest.mark.parametrize("fill", ["sparse", "none_zero", "all_zero", "negative"])
def test_label_values_equal_numpy_unique(fill):
    rng = np.random.default_rng(3)
    labels = np.zeros((12, 10, 8), dtype=np.int16)
    if fill == "sparse":
        labels[2:5, 3:6, 1:4] = rng.integers(1, 5, (3, 3, 3))
    elif fill == "none_zero":
        labels[:] = rng.integers(1, 4, labels.shape)
    elif fill == "negative":
        labels[::3] = rng.integers(-3, 3, labels[::3].shape)
    got = prep_mod._label_values(labels)
    assert got == [int(v) for v in np.unique(labels)]
    assert all(type(v) is int for v in got)
