"""`slice`: orientation convention, slice choice, crop/resize, size-phrase rewriting, format."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from test_prepare import make_flat, make_release

from unibrain_cli.data.findings import find_size_phrases, format_mm, rewrite_size_phrases
from unibrain_cli.data.prepare import prepare
from unibrain_cli.data.slicing import (
    INDEX_COLUMNS,
    axial_slice,
    axial_unslice,
    choose_slices,
    crop_box,
    lesion_extent_mm,
    make_slices,
    square_resize,
)
from unibrain_cli.errors import UserError
from unibrain_cli.modalities import DISEASES, MODALITIES, canonical_modality

# --------------------------------------------------------------------------- orientation


def test_axial_slice_orientation_and_inverse():
    vol = np.zeros((5, 7, 3), dtype=np.int16)  # RAS+: i -> right, j -> anterior
    vol[0, 6, 1] = 1  # leftmost, most anterior
    vol[4, 0, 1] = 2  # rightmost, most posterior
    s = axial_slice(vol, 1)
    assert s.shape == (7, 5)
    assert s[0, 0] == 1 and s[6, 4] == 2  # row 0 anterior, column 0 subject's left
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(6, 9, 4))
    for k in range(4):
        np.testing.assert_array_equal(axial_unslice(axial_slice(vol, k)), vol[:, :, k])


# --------------------------------------------------------------------------- size phrases


@pytest.mark.parametrize("phrase", ["76*72*69mm", "76 x 72 x 69 mm", "7.6 x 7.2 x 6.9 cm", "7.6*7.2*6.9cm",
                                    "76 × 72 × 69 mm", "76mm x 72mm x 69mm"])
def test_rewrite_size_phrases_formats(phrase):
    text = f"An irregular mass of about {phrase} in the left frontal lobe, with oedema."
    assert find_size_phrases(text) == [pytest.approx((76.0, 72.0, 69.0))]
    assert rewrite_size_phrases(text, 31, 24.5) == (
        "An irregular mass of about 31 * 24.5 mm in the left frontal lobe, with oedema.")


def test_rewrite_leaves_other_numbers_and_no_lesion():
    text = "T2 FLAIR at 3 mm slices; 2 lesions, largest 12*10*8mm and 5 x 4 x 3 mm."
    assert rewrite_size_phrases(text, 7, 6) == "T2 FLAIR at 3 mm slices; 2 lesions, largest 7 * 6 mm and 7 * 6 mm."
    assert rewrite_size_phrases(text, 0, 0) == text
    assert format_mm(12.0) == "12" and format_mm(7.25) == "7.2" and format_mm(0.96) == "1"


# --------------------------------------------------------------------------- geometry helpers


def test_choose_slices_middle_first_then_area():
    mask = np.zeros((8, 8, 20), dtype=bool)
    areas = {5: 3, 6: 9, 7: 4, 8: 1, 9: 2, 14: 5}  # lesion extent 5..14 -> middle 9
    for k, a in areas.items():
        mask.flat[np.ravel_multi_index((np.arange(a) // 8, np.arange(a) % 8, np.full(a, k)), mask.shape)] = True
    brain = np.ones_like(mask)
    assert choose_slices(mask, brain, 3) == [(9, True), (6, False), (14, False)]
    assert choose_slices(mask, brain, 1) == [(9, True)]
    every = choose_slices(mask, brain, 3, all_lesion_slices=True)
    assert every[0] == (9, True) and sorted(k for k, _ in every) == sorted(areas)
    # middle of the extent without lesion: the nearest lesion slice is the eval slice
    mask[:, :, 9] = False
    assert choose_slices(mask, brain, 1) == [(8, True)]


def test_choose_slices_without_lesion_takes_central():
    brain = np.zeros((8, 8, 40), dtype=bool)
    brain[:, :, 10:31] = True  # brain extent 10..30, centre 20
    picks = choose_slices(np.zeros_like(brain), brain, 3)
    assert picks[0] == (20, True) and len(picks) == 3 and all(not e for _, e in picks[1:])
    assert all(10 <= k <= 30 for k, _ in picks) and len({k for k, _ in picks}) == 3


def test_crop_box_and_square_resize():
    brain = np.zeros((20, 30, 4), dtype=bool)  # X=20 (cols), Y=30 (rows)
    brain[5:15, 3:27, 1] = True
    brain[2:4, 10:12, 3] = True
    r0, r1, c0, c1 = crop_box(brain)
    # rows are flipped j: j in [3, 26] -> rows [30-1-26, 30-1-3] = [3, 26]
    assert (r0, r1, c0, c1) == (3, 27, 2, 15)
    plane = np.ones((30, 20), dtype=np.float32)
    out = square_resize(plane, (r0, r1, c0, c1), 24, order=1)
    assert out.shape == (24, 24)
    # 24 rows x 13 cols padded to 24 x 24 centred: columns 5..17 are ones, the rest zero
    np.testing.assert_allclose(out[:, 5:18], 1.0)
    assert np.all(out[:, :5] == 0) and np.all(out[:, 19:] == 0)
    small = square_resize(plane, (r0, r1, c0, c1), 12, order=0)
    assert small.shape == (12, 12) and set(np.unique(small)) <= {0.0, 1.0}


def test_lesion_extent_mm():
    m = np.zeros((10, 12), dtype=bool)
    m[2:5, 3:10] = True  # 3 rows (A-P), 7 columns (L-R)
    m[8, 0] = True  # a second component widens the box
    assert lesion_extent_mm(m, (1.0, 1.0)) == (10.0, 7.0)
    assert lesion_extent_mm(m[:6], (0.5, 2.0)) == (3.5, 6.0)
    assert lesion_extent_mm(np.zeros((4, 4), bool), (1.0, 1.0)) == (0.0, 0.0)


# --------------------------------------------------------------------------- make_slices


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slice")
    make_release(tmp, {"BraTS-GLI-00000-000": "train", "sub-strokecase0001": "val", "Singapore_69": "test"})
    prepare(tmp / "radgenome", tmp / "prepared", images=[tmp / "images"])
    return tmp / "prepared"


def _vol(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_make_slices_format_and_content(prepared, tmp_path):
    res = make_slices(prepared, tmp_path / "slices", size=16, per_case=2)
    meta = json.loads((tmp_path / "slices" / "slices.json").read_text())
    assert meta == {"format": "unibrain-slices/1", "size": 16, "axis": "axial", "modalities": list(MODALITIES),
                    "num_slices": res.num_slices, "source": str(prepared.resolve())}
    index = pd.read_parquet(tmp_path / "slices" / "index.parquet")
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert res.num_cases == 3 and res.num_slices == len(index) == 6
    assert index.groupby("case_id")["is_eval"].sum().tolist() == [1, 1, 1]
    assert index["split"].tolist() == ["train"] * 2 + ["test"] * 2 + ["val"] * 2  # manifest order: case id
    shard = load_file(str(tmp_path / "slices" / "shards" / index["shard"].iloc[0]))
    n = len(index)
    assert shard["images"].shape == (n, 6, 16, 16) and shard["images"].dtype == np.float32
    assert shard["present"].shape == (n, 6) and shard["present"].dtype == np.uint8
    for key in ("mask", "labels", "brain"):
        assert shard[key].shape == (n, 16, 16) and shard[key].dtype == np.uint8
    assert shard["images"].min() >= 0.0 and shard["images"].max() <= 1.0
    assert set(np.unique(shard["mask"])) <= {0, 1}
    man = pd.read_parquet(prepared / "manifest.parquet").set_index("case_id")
    for r in index.itertuples():
        mods = r.modalities.split("|")
        present = shard["present"][r.row]
        assert [MODALITIES[c] for c in np.flatnonzero(present)] == mods
        assert np.all(shard["images"][r.row][present == 0] == 0)
        assert all(shard["images"][r.row][MODALITIES.index(m)].max() > 0 for m in mods)
        # the lesion extent is measured on the prepared mask at 1 mm before resizing
        mask3d = _vol(prepared / "cases" / r.case_id / "mask.nii.gz")
        plane = axial_slice(mask3d, r.slice_k) > 0
        rows, cols = np.flatnonzero(plane.any(1)), np.flatnonzero(plane.any(0))
        assert (r.lesion_w_mm, r.lesion_h_mm) == (cols[-1] - cols[0] + 1.0, rows[-1] - rows[0] + 1.0)
        assert r.lesion_area_px == int(shard["mask"][r.row].sum()) > 0
        f3, f2 = json.loads(r.findings_3d), json.loads(r.findings_2d)
        assert f3 == json.loads(man.loc[r.case_id, "findings"]) and set(f2) == set(f3)
        size = f"{r.lesion_w_mm:g} * {r.lesion_h_mm:g} mm"
        assert all(size in t and "76*72*69mm" not in t for t in f2.values())
        assert all("76*72*69mm" in t for t in f3.values())
        assert r.global_finding_2d == r.global_finding.replace("7.6 x 7.2 x 6.9 cm", size)
        if r.is_eval:
            ks = np.flatnonzero(mask3d.reshape(-1, mask3d.shape[2]).any(0))
            assert abs(r.slice_k - (ks.min() + ks.max()) // 2) <= 1


def test_slice_pixels_match_manual_pipeline(prepared, tmp_path):
    """One slice recomputed by hand: crop to the case brain box, centred pad, resize."""
    from skimage.transform import resize

    make_slices(prepared, tmp_path / "s", size=20, per_case=1)
    index = pd.read_parquet(tmp_path / "s" / "index.parquet")
    r = index[index["case_id"] == "Singapore_69"].iloc[0]
    shard = load_file(str(tmp_path / "s" / "shards" / r["shard"]))
    case = prepared / "cases" / "Singapore_69"
    brain = _vol(case / "brain.nii.gz") > 0
    flair = axial_slice(_vol(case / "flair.nii.gz"), r["slice_k"])
    proj = axial_slice(brain.any(2)[:, :, None], 0)
    rows, cols = np.flatnonzero(proj.any(1)), np.flatnonzero(proj.any(0))
    crop = flair[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(crop.shape)
    pr, pc = side - crop.shape[0], side - crop.shape[1]
    sq = np.pad(crop, ((pr // 2, pr - pr // 2), (pc // 2, pc - pc // 2)))
    want = resize(sq, (20, 20), order=1, preserve_range=True, anti_aliasing=side > 20, mode="constant")
    np.testing.assert_allclose(shard["images"][r["row"], MODALITIES.index("flair")], want, atol=1e-5)


def test_all_lesion_slices_and_sharding(prepared, tmp_path, monkeypatch):
    from unibrain_cli.data import slicing

    monkeypatch.setattr(slicing, "SHARD_ROWS", 4)
    res = make_slices(prepared, tmp_path / "all", size=8, all_lesion_slices=True)
    index = res.index
    man = pd.read_parquet(prepared / "manifest.parquet")
    for case in man["case_id"]:
        mask = _vol(prepared / "cases" / case / "mask.nii.gz")
        ks = set(np.flatnonzero(mask.reshape(-1, mask.shape[2]).any(0)).tolist())
        assert set(index.loc[index["case_id"] == case, "slice_k"]) == ks
    assert res.num_shards == -(-len(index) // 4)
    assert sorted(p.name for p in (tmp_path / "all" / "shards").iterdir()) == sorted(index["shard"].unique())
    for shard_name, group in index.groupby("shard"):
        shard = load_file(str(tmp_path / "all" / "shards" / shard_name))
        assert sorted(group["row"]) == list(range(len(shard["images"])))


def test_slice_errors(prepared, tmp_path):
    with pytest.raises(UserError) as err:
        make_slices(prepared, tmp_path / "x", axis="coronal")
    assert err.value.where == "--axis"
    with pytest.raises(UserError) as err:
        make_slices(tmp_path / "nothing", tmp_path / "x")
    assert "unibrain prepare" in str(err.value)
    make_slices(prepared, tmp_path / "x", size=8, per_case=1)
    with pytest.raises(UserError, match="--force"):
        make_slices(prepared, tmp_path / "x", size=8, per_case=1)
    res = make_slices(prepared, tmp_path / "x", size=12, per_case=1, force=True)
    assert json.loads((tmp_path / "x" / "slices.json").read_text())["size"] == 12
    assert res.num_slices == 3


def test_case_without_lesion_gets_central_eval_slice(tmp_path):
    root = make_flat(tmp_path, {"patient1": ("glioma", "train")})
    # drop the seg: the case is kept with an empty mask
    (root / "all_data_Reg" / "patient1" / "patient1-seg.nii.gz").unlink()
    res = prepare(root, tmp_path / "prep")
    assert [p.kind for p in res.problems] == ["missing_mask"]
    out = make_slices(tmp_path / "prep", tmp_path / "sl", size=8, per_case=2)
    assert out.index["is_eval"].tolist() == [True, False]
    assert out.index["lesion_w_mm"].tolist() == [0.0, 0.0]
    r = out.index.iloc[0]
    assert r["findings_2d"] == r["findings_3d"]  # no lesion on the slice: text unchanged


@pytest.mark.slow  # ~40 s per layout on one core: the 2 mm phantom is prepared at 1 mm
@pytest.mark.parametrize("all_modalities", [False, True])
def test_phantom_round_trip(tmp_path, all_modalities):
    """synth 5 cases at 2 mm -> prepare -> slice: every case lands with its modalities,
    diseases and split as the phantom wrote them."""
    from unibrain_cli.data.phantom import synthesize

    synthesize(tmp_path / "ph", cases=5, seed=0, resolution=2, all_modalities=all_modalities, force=False)
    ph = tmp_path / "ph"
    res = prepare(ph, tmp_path / "prep")
    assert res.n_prepared == 5 and res.problems == [], res.problems
    split_file = next(ph.rglob("train_val_test_split.json"))
    split = json.loads(split_file.read_text())
    if all_modalities:
        imp = json.loads((ph / "combined_impression.json").read_text())
        mwf = json.loads((ph / "combined_modal_wise_finding.json").read_text())
    else:
        imp, mwf = {}, {}
        for sub in (ph / "radgenome").iterdir():
            if sub.is_dir():
                imp.update(json.loads((sub / "impression.json").read_text()))
                mwf.update(json.loads((sub / "modal_wise_finding.json").read_text()))
    man = res.manifest.set_index("case_id")
    assert set(man.index) == set(imp)
    for case, entry in imp.items():
        assert man.loc[case, "diseases"].split("|") == sorted(entry["disease"], key=DISEASES.index)
        mods = {key.rpartition("-")[2] for key in mwf if key.rpartition("-")[0] == case}
        assert set(man.loc[case, "modalities"].split("|")) >= {canonical_modality(m) for m in mods}
        listed = [s for s, ids in split.items() for i in ids if i == case or i.rpartition("-")[0] == case]
        want = {"validation": "val"}.get(listed[0], listed[0]) if listed else "unsplit"
        assert man.loc[case, "split"] == want
    sl = make_slices(tmp_path / "prep", tmp_path / "slices", size=32, per_case=2)
    assert set(sl.index["case_id"]) == set(imp)
    assert sl.index.groupby("case_id")["is_eval"].sum().eq(1).all()
