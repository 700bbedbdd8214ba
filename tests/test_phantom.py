"""The physics-based phantom behind `unibrain synth` (2 mm mode, few cases, generated once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from unibrain_cli.data.phantom import synthesize
from unibrain_cli.data.phantom.anatomy import centred_grid, lobe_at
from unibrain_cli.data.phantom.layouts import SUBSETS, case_specs
from unibrain_cli.data.phantom.physics import (
    NORMAL,
    SEQUENCES,
    TissueParams,
    contrast_signal,
    csf_null_ti,
    signal,
)
from unibrain_cli.data.phantom.simulate import case_warp, simulate_case
from unibrain_cli.errors import UserError

SEED = 3
RES = 2
N_DEFAULT = 10  # two cases per subset
N_FLAT = 5


@pytest.fixture(scope="module")
def default_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "phantom"
    result = synthesize(out, N_DEFAULT, seed=SEED, resolution=RES)
    assert result.out == out and result.preview == out / "preview.png"
    assert sum(len(v) for v in result.case_ids.values()) == N_DEFAULT
    assert result.n_files == sum(1 for p in out.rglob("*") if p.is_file())
    return out


@pytest.fixture(scope="module")
def flat_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_flat") / "phantom"
    synthesize(out, N_FLAT, seed=SEED, resolution=RES, all_modalities=True)
    return out


@pytest.fixture(scope="module")
def flat_cases():
    """The five all-modality cases rendered in memory (same seed as ``flat_ds``)."""
    return {spec.disease: simulate_case(spec, SEED, RES) for spec in case_specs(N_FLAT, RES, True)}


# ------------------------------------------------------------------ physics

def test_flair_inversion_time_nulls_csf():
    ti = csf_null_ti()
    assert abs(ti - 1705.0) < 2.0
    assert signal(NORMAL["csf"], SEQUENCES["flair"]) < 1e-9
    assert SEQUENCES["flair"].ti == pytest.approx(ti)


def test_pure_tissue_contrasts_follow_the_equations():
    s = {m: {t: contrast_signal(p, m) for t, p in NORMAL.items()} for m in ("t1", "t2", "flair", "dwi", "adc")}
    assert s["t1"]["csf"] < s["t1"]["gm"] < s["t1"]["wm"]
    assert s["t2"]["csf"] > s["t2"]["gm"] > s["t2"]["wm"]
    assert s["flair"]["csf"] < min(s["flair"]["gm"], s["flair"]["wm"])
    assert s["adc"]["csf"] > s["adc"]["gm"] > s["adc"]["wm"]
    # golden value: WM on T1w = 0.77 (1 - e^{-500/500}) e^{-15/70}
    assert s["t1"]["wm"] == pytest.approx(0.77 * (1 - np.exp(-1.0)) * np.exp(-15 / 70))
    # gadolinium shortens T1 only after contrast: 1/T1' = 1/T1 + r1 C
    gd = TissueParams(1200.0, 110.0, 0.88, 1.0, gd=0.3)
    assert contrast_signal(gd, "t1ce") > 1.5 * contrast_signal(gd, "t1")
    assert contrast_signal(NORMAL["wm"], "t1ce") == contrast_signal(NORMAL["wm"], "t1")


def test_grid_mni_coordinates_match_pointwise_warp():
    spec = case_specs(1, RES, False)[0]
    warp = case_warp(spec, SEED, RES)
    grid = spec.acquisitions[0].grid
    box = (slice(10, 30), slice(40, 45), slice(5, 60))
    dense = warp.grid_to_mni(grid, box)
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(b.start, b.stop, 50) for b in box], 1)
    direct = warp.to_mni(grid.index_to_world(ijk.astype(float)))
    got = dense[:, ijk[:, 0] - 10, ijk[:, 1] - 40, ijk[:, 2] - 5].T
    np.testing.assert_allclose(got, direct, atol=1e-3)


# ------------------------------------------------------------------ contrasts on generated volumes

def _tissue_means(case, mod):
    g = case.grids[0]
    img = g.images[mod][g.crop].astype(np.float64)
    clean = g.lesion < 1e-3
    return {t: img[(g.tissue[i] > 0.9) & clean].mean() for i, t in enumerate(("gm", "wm", "csf"))}


def test_tissue_contrast_orderings_on_volumes(flat_cases):
    case = flat_cases["wmh"]
    t1, t2, flair, adc = (_tissue_means(case, m) for m in ("t1", "t2", "flair", "adc"))
    assert t1["csf"] < t1["gm"] < t1["wm"]
    assert t2["csf"] > t2["gm"] > t2["wm"]
    assert flair["csf"] < 0.5 * min(flair["gm"], flair["wm"])
    assert adc["csf"] > adc["gm"] > adc["wm"]
    assert adc["wm"] == pytest.approx(700, rel=0.1)  # stored in 1e-6 mm^2/s
    # background is exactly zero (skull-stripped style)
    assert case.grids[0].images["t1"][0, 0, 0] == 0


def _ratio(case, mod, region, reference="wm"):
    """Mean of ``mod`` in ``region`` over normal white matter (or all normal parenchyma, GM + WM)."""
    g = case.grids[0]
    img = g.images[mod][g.crop].astype(np.float64)
    normal = g.tissue[1] > 0.9 if reference == "wm" else g.tissue[0] + g.tissue[1] > 0.95
    return img[region].mean() / img[normal & (g.lesion < 1e-3)].mean()


def _label(case, *values):
    """Voxels of the given mask labels that are (almost) pure lesion (no partial volume)."""
    g = case.grids[0]
    return np.isin(g.labels[g.crop], values) & (g.lesion > 0.9)


def test_stroke_restricted_diffusion_and_no_enhancement(flat_cases):
    case = flat_cases["stroke"]
    lesion = _label(case, 1)
    assert lesion.sum() > 20
    assert _ratio(case, "dwi", lesion) > 1.5
    assert _ratio(case, "adc", lesion) < 0.85  # vs white matter (0.70): ADC 0.40-0.55 plus noise
    assert _ratio(case, "adc", lesion, reference="parenchyma") < 0.8
    assert _ratio(case, "flair", lesion) > 1.3
    assert _ratio(case, "t1ce", lesion) == pytest.approx(_ratio(case, "t1", lesion), rel=0.05)


@pytest.mark.parametrize("disease", ["glioma", "meningioma", "metastasis"])
def test_enhancing_tumour_bright_only_after_contrast(flat_cases, disease):
    case = flat_cases[disease]
    rim = _label(case, 3)
    if not rim.any():  # a low-grade glioma: nothing enhances
        core = _label(case, 1)
        assert _ratio(case, "t1ce", core) == pytest.approx(_ratio(case, "t1", core), rel=0.05)
        return
    assert _ratio(case, "t1ce", rim) > 1.3 * _ratio(case, "t1", rim)
    oedema = _label(case, 2)
    if oedema.sum() > 5:
        assert _ratio(case, "flair", oedema) > 1.3
        assert _ratio(case, "t2", oedema) > 1.3
        assert _ratio(case, "t1ce", oedema) == pytest.approx(_ratio(case, "t1", oedema), rel=0.05)


def test_glioma_core_has_high_adc(flat_cases):
    """Necrosis (high grade, ADC 1.8-2.5) or non-enhancing tumour (low grade, 1.1-1.4) vs WM 0.70."""
    case = flat_cases["glioma"]
    core = _label(case, 1) & ~ndi.binary_dilation(_label(case, 2, 3))
    assert core.sum() > 3
    assert _ratio(case, "adc", core) > (2.0 if case.plan.info["grade"] == "high" else 1.4)


def test_wmh_bright_on_flair_without_enhancement(flat_cases):
    case = flat_cases["wmh"]
    wmh = _label(case, 1)
    assert wmh.sum() > 3
    assert _ratio(case, "flair", wmh) > 1.3
    assert _ratio(case, "t1ce", wmh) == pytest.approx(_ratio(case, "t1", wmh), rel=0.05)


def test_written_files_equal_rendered_volumes(flat_ds, flat_cases):
    case = flat_cases["stroke"]
    acq = case.spec.acquisitions[0]
    for mod in ("dwi", "t1"):
        img = nib.load(flat_ds / acq.paths[mod])
        np.testing.assert_array_equal(np.asarray(img.dataobj), case.grids[0].images[mod])
        np.testing.assert_allclose(img.affine, acq.grid.affine)
    seg = np.asarray(nib.load(flat_ds / acq.mask_path).dataobj)
    np.testing.assert_array_equal(seg, case.grids[0].labels)


# ------------------------------------------------------------------ reports agree with the masks

SIDES = ("left", "right", "bilateral")
LOBE_WORDS = {"frontal": "frontal", "parietal": "parietal", "temporal": "temporal", "occipital": "occipital",
              "cerebell": "cerebellum"}
SIZE = re.compile(r"(\d+)\*(\d+)\*(\d+)mm")


def _first(text, words):
    hits = [(m.start(), w) for w in words for m in re.finditer(rf"\b{w}", text.lower())]
    return min(hits)[1] if hits else None


def _truth(spec, mask_path):
    """Side, lobe and size computed here from the written mask (independently of the generator)."""
    img = nib.load(mask_path)
    lab = np.asarray(img.dataobj)
    full = lab > 0
    if spec.disease == "wmh":
        full = lab == 1
    comps, n = ndi.label(full, structure=np.ones((3, 3, 3)))
    region = full
    if spec.disease in ("wmh", "metastasis") and n > 1:
        region = comps == 1 + np.argmax(np.bincount(comps.ravel())[1:])
    located = full if spec.disease == "wmh" else region
    ijk = np.argwhere(located).astype(float)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    mni = case_warp(spec, SEED, RES).to_mni(world)
    left = np.mean(mni[:, 0] < 0)
    side = "bilateral" if min(left, 1 - left) >= 0.2 else ("left" if left >= 0.5 else "right")
    names, counts = np.unique(lobe_at(mni), return_counts=True)
    lobe = names[np.argmax(counts)]
    idx = np.argwhere(region)
    size = (idx.max(0) - idx.min(0) + 1) * np.abs(np.diag(img.affine)[:3])
    return side, lobe, size


def test_reports_state_side_lobe_and_size_of_the_mask(default_ds):
    checked = 0
    for spec in case_specs(N_DEFAULT, RES, False):
        subset = default_ds / "radgenome" / spec.subset
        findings = json.loads((subset / "modal_wise_finding.json").read_text())
        glob = json.loads((subset / "global_finding.json").read_text())[spec.case_id]
        imp = json.loads((subset / "impression.json").read_text())[spec.case_id]
        side, lobe, size = _truth(spec, default_ds / spec.mask_acquisition.mask_path)
        texts = [findings[spec.image_id(m)] for m in spec.modalities] + [glob]
        for text in texts + [imp["impression"]]:
            assert _first(text, SIDES) == side, (spec.case_id, text)
            assert LOBE_WORDS[_first(text, LOBE_WORDS)] == lobe, (spec.case_id, text)
        for text in texts:
            stated = np.array([int(v) for v in SIZE.search(text).groups()])
            np.testing.assert_allclose(stated, size, rtol=0.2, err_msg=f"{spec.case_id}: {text}")
        assert imp["disease"] == [spec.disease]
        checked += 1
    assert checked == N_DEFAULT


def test_findings_mention_each_modality_and_vary_in_phrasing(default_ds):
    names = {"t1n": "T1", "t2w": "T2", "t2f": "FLAIR", "t1c": "contrast", "dwi": "DWI", "adc": "ADC",
             "flair": "FLAIR", "T1": "T1", "FLAIR": "FLAIR"}
    openings = set()
    for subset in SUBSETS:
        findings = json.loads((default_ds / "radgenome" / subset / "modal_wise_finding.json").read_text())
        for key, text in findings.items():
            assert names[key.rsplit("-", 1)[1]] in text, (key, text)
            openings.add(" ".join(text.split()[:2]))
    assert len(openings) >= 5


# ------------------------------------------------------------------ layout

def test_default_layout_matches_the_release(default_ds):
    root = default_ds / "radgenome"
    split = json.loads((root / "train_val_test_split.json").read_text())
    assert set(split) == {"train", "val", "test"}
    all_ids = [i for part in split.values() for i in part]
    assert len(all_ids) == len(set(all_ids))
    expected_ids = set()
    for subset in SUBSETS:
        for name in ("modal_wise_finding.json", "impression.json", "global_finding.json"):
            assert (root / subset / name).is_file()
        expected_ids |= set(json.loads((root / subset / "modal_wise_finding.json").read_text()))
    assert set(all_ids) == expected_ids
    # all images of a case are in the same split
    for part in split.values():
        for other in split.values():
            if other is not part:
                assert not {i.rsplit("-", 1)[0] for i in part} & {i.rsplit("-", 1)[0] for i in other}

    img = default_ds / "images"
    for p in ["BraTS2023-GLI/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{}.nii.gz",
              "BraTS2023-MEN/BraTS-MEN-00001-000/BraTS-MEN-00001-000-{}.nii.gz",
              "BraTS2023-MET/BraTS-MET-00000-000/BraTS-MET-00000-000-{}.nii.gz"]:
        for seq in ("t1n", "t1c", "t2w", "t2f", "seg"):
            assert (img / p.format(seq)).is_file(), p.format(seq)
    brats = nib.load(img / "BraTS2023-GLI/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz")
    assert brats.shape == (120, 120, 78) and np.allclose(np.abs(np.diag(brats.affine)[:3]), 2.0)
    assert brats.affine[0, 0] < 0 and brats.affine[1, 1] < 0  # LPS-like, as BraTS ships
    seg = np.asarray(nib.load(img / "BraTS2023-GLI/BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz").dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 3} and (seg == 2).any()

    sub = "sub-strokecase0002"
    dwi = nib.load(img / f"ISLES-2022/{sub}/ses-0001/dwi/{sub}_ses-0001_dwi.nii.gz")
    adc = nib.load(img / f"ISLES-2022/{sub}/ses-0001/dwi/{sub}_ses-0001_adc.nii.gz")
    flair = nib.load(img / f"ISLES-2022/{sub}/ses-0001/anat/{sub}_ses-0001_FLAIR.nii.gz")
    msk = nib.load(img / f"ISLES-2022/derivatives/{sub}/ses-0001/{sub}_ses-0001_msk.nii.gz")
    assert dwi.shape == adc.shape == msk.shape == (112, 112, 73)
    assert flair.shape != dwi.shape and not np.allclose(flair.affine, dwi.affine)
    assert set(np.unique(np.asarray(msk.dataobj))) == {0, 1}

    for site, n in (("Utrecht", 0), ("Singapore", 50)):
        case = img / f"WMH2017/training/{site}/{n}"
        t1 = nib.load(case / "pre/T1.nii.gz")
        assert (case / "pre/FLAIR.nii.gz").is_file()
        zooms = t1.header.get_zooms()
        assert zooms[2] == pytest.approx(3.0) and zooms[0] < 2.5
        assert set(np.unique(np.asarray(nib.load(case / "wmh.nii.gz").dataobj))) <= {0, 1, 2}
    wmh = json.loads((root / "WMH" / "modal_wise_finding.json").read_text())
    assert set(wmh) == {"Utrecht_0-T1", "Utrecht_0-FLAIR", "Singapore_50-T1", "Singapore_50-FLAIR"}
    isles = json.loads((root / "ISLES22" / "modal_wise_finding.json").read_text())
    assert {"sub-strokecase0001-dwi", "sub-strokecase0001-adc", "sub-strokecase0001-flair"} <= set(isles)
    assert (default_ds / "preview.png").stat().st_size > 10_000
    assert not (default_ds / "all_data_Reg").exists()


def test_flat_layout_has_all_six_contrasts(flat_ds):
    subjects = sorted(p.name for p in (flat_ds / "all_data_Reg").iterdir())
    assert subjects == sorted(["BraTS-GLI-00000-000", "BraTS-MEN-00000-000", "BraTS-MET-00000-000",
                               "sub-strokecase0001", "Utrecht_0"])
    for s in subjects:
        for mod in ("t1", "t2", "flair", "t1ce", "dwi", "adc", "seg"):
            assert (flat_ds / "all_data_Reg" / s / f"{s}-{mod}.nii.gz").is_file()
    findings = json.loads((flat_ds / "combined_modal_wise_finding.json").read_text())
    assert len(findings) == 6 * N_FLAT and "Utrecht_0-adc" in findings
    imp = json.loads((flat_ds / "combined_impression.json").read_text())
    assert [v["disease"] for v in imp.values()] == [["glioma"], ["meningioma"], ["metastasis"], ["stroke"], ["wmh"]]
    assert set(json.loads((flat_ds / "combined_global_finding.json").read_text())) == set(subjects)
    split = json.loads((flat_ds / "train_val_test_split.json").read_text())
    assert sorted(i for part in split.values() for i in part) == sorted(findings)
    stroke_seg = np.asarray(nib.load(flat_ds / "all_data_Reg/sub-strokecase0001/sub-strokecase0001-seg.nii.gz").dataobj)
    assert set(np.unique(stroke_seg)) == {0, 1}
    assert not (flat_ds / "radgenome").exists() and (flat_ds / "preview.png").is_file()


# ------------------------------------------------------------------ determinism, errors

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, 6, seed=11, resolution=RES)
    b.mkdir()
    (b / "stale.txt").write_text("old")
    # neither the bar nor worker processes change anything (the preview included)
    synthesize(b, 6, seed=11, resolution=RES, force=True, progress=True, workers=2)
    synthesize(c, 6, seed=12, resolution=RES)
    ta, tb, tc = _tree(a), _tree(b), _tree(c)
    assert ta == tb
    assert set(ta) == set(tc) and ta != tc
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


def test_user_errors(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    with pytest.raises(UserError, match="--force"):
        synthesize(full, 1, resolution=RES)
    assert (full / "x").read_text() == "keep"
    with pytest.raises(UserError) as err:
        synthesize(tmp_path / "new", 0, resolution=RES)
    assert err.value.where == "--cases"
    with pytest.raises(UserError) as err:
        synthesize(tmp_path / "new", 1, resolution=3)
    assert err.value.where == "--resolution"
    assert not (tmp_path / "new").exists()


def test_centred_grid_centre():
    g = centred_grid((11, 20, 7), (2.0, 1.5, 3.0), centre=(1.0, -2.0, 5.0))
    np.testing.assert_allclose(g.centre, [1.0, -2.0, 5.0])
