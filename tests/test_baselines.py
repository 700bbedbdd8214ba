"""Slices reader, copy-nearest and U-Net baselines on a tiny synthetic slices folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from unibrain_cli.errors import UserError
from unibrain_cli.evaluation.baselines import (
    CHAINS,
    COPY_PREFERENCE,
    CopyNearestBaseline,
    UNet,
    UNetBaseline,
    chain_key,
    fit_copy_nearest,
    parse_chain,
    train_unet,
)
from unibrain_cli.evaluation.slices_data import SliceDataset, filter_index, load_index
from unibrain_cli.modalities import MODALITIES

S = 32


def _smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    f = np.zeros_like(yy)
    for _ in range(4):
        cy, cx, sig = rng.uniform(6, 26), rng.uniform(6, 26), rng.uniform(3, 8)
        f += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))
    return (f - f.min()) / (f.max() - f.min())


def make_slice(rng: np.random.Generator, with_flair: bool = True) -> dict[str, np.ndarray]:
    """One synthetic slice: T1 = 0.3 + 0.5 f, T2 = 0.35 + 0.55 (1 - f), FLAIR = 0.1 + 0.3 (1 - f)
    inside an elliptic brain, a bright T2/FLAIR lesion, rim enhancement on T1ce."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    cy, cx = 16 + rng.uniform(-1.5, 1.5), 16 + rng.uniform(-1.5, 1.5)
    ry, rx = rng.uniform(11, 14), rng.uniform(10, 13)
    brain = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    f = _smooth_field(rng, yy, xx)
    ly, lx = cy + rng.uniform(-5, 5), cx + rng.uniform(-5, 5)
    d = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
    lesion = (d <= 3.0) & brain
    images = np.zeros((6, S, S), np.float32)
    t1 = 0.3 + 0.5 * f - 0.1 * lesion
    t2 = 0.35 + 0.55 * (1 - f) + 0.1 * lesion
    flair = 0.1 + 0.3 * (1 - f) + 0.05 * lesion
    t1ce = t1 + 0.3 * ((d > 2.0) & (d <= 3.0))
    for c, img in enumerate((t1, t2, flair, t1ce)):
        images[c] = np.clip(img, 0, 1) * brain
    present = np.array([1, 1, int(with_flair), 1, 0, 0], np.uint8)
    if not with_flair:
        images[2] = 0
    return {"images": images, "present": present, "mask": lesion.astype(np.uint8),
            "labels": lesion.astype(np.uint8), "brain": brain.astype(np.uint8)}


def write_slices(root: Path, n_cases: int = 12, per_case: int = 2, seed: int = 0, shard_rows: int = 10) -> Path:
    """A slices folder in the /tmp/slices.md format (unibrain-slices/1)."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    rows, buf, shard_id = [], [], 0
    splits = ["train"] * (n_cases - 4) + ["val"] * 2 + ["test"] * 2

    def flush() -> None:
        nonlocal buf, shard_id
        if buf:
            save_file({k: np.stack([b[k] for b in buf]) for k in buf[0]},
                      str(root / "shards" / f"shard-{shard_id:05d}.safetensors"))
            buf, shard_id = [], shard_id + 1

    for c in range(n_cases):
        with_flair = c % 4 != 3
        for k in range(per_case):
            sl = make_slice(rng, with_flair)
            mods = [m for m, p in zip(MODALITIES, sl["present"]) if p]
            rows.append({
                "slice_id": f"case{c:02d}:{40 + k}", "case_id": f"case{c:02d}", "subset": "BraTS_GLI",
                "split": splits[c], "diseases": "glioma", "slice_k": 40 + k, "is_eval": k == per_case // 2,
                "shard": f"shard-{shard_id:05d}.safetensors", "row": len(buf), "modalities": "|".join(mods),
                "lesion_area_px": int(sl["mask"].sum()), "lesion_w_mm": 6.0, "lesion_h_mm": 6.0,
                "findings_2d": json.dumps({"t2": "hyperintense 6 * 6 mm lesion"}),
                "findings_3d": json.dumps({"t2": "hyperintense 6*6*5mm lesion"}),
                "global_finding_2d": "a lesion", "global_finding": "a lesion", "impression": "glioma",
            })
            buf.append(sl)
            if len(buf) == shard_rows:
                flush()
    flush()
    pd.DataFrame(rows).to_parquet(root / "index.parquet")
    meta = {"format": "unibrain-slices/1", "size": S, "axis": "axial", "modalities": list(MODALITIES),
            "num_slices": len(rows), "source": "synthetic"}
    (root / "slices.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slices(tmp_path_factory.mktemp("slices") / "SLICES")


def test_slice_dataset_reads_and_filters(slices: Path) -> None:
    ds = SliceDataset(slices)
    assert len(ds) == 24 and ds.size == S
    item = ds[3]
    assert item["images"].shape == (6, S, S) and item["images"].dtype == np.float32
    assert item["present"].dtype == bool and item["brain"].shape == (S, S)
    assert item["slice_id"] == "case01:41" and item["diseases"] == ("glioma",)
    assert item["findings_2d"] == {"t2": "hyperintense 6 * 6 mm lesion"}
    # lazily read rows equal the shard content
    other = SliceDataset(slices, split="train")
    assert np.array_equal(other[3]["images"], item["images"])
    train_eval = SliceDataset(slices, split="train", is_eval=True)
    assert len(train_eval) == 8 and train_eval.index["is_eval"].all()
    with_flair = SliceDataset(slices, split=["train", "val"], require=["T2F"])
    assert len(with_flair) == 2 * 8 and all("flair" in m for m in with_flair.index["modalities"])
    b = ds.batch([0, 11, 23])
    assert b["images"].shape == (3, 6, S, S) and b["present"].shape == (3, 6)
    assert len(filter_index(load_index(slices), split="nope")) == 0


def test_slice_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="slices.json missing"):
        SliceDataset(tmp_path)
    (tmp_path / "slices.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="unsupported slices format"):
        SliceDataset(tmp_path)


def test_chain_keys() -> None:
    assert [chain_key(i, t) for i, t in CHAINS] == ["t1->t2", "t1,t2->flair", "t1,t2,flair->t1ce"]
    assert parse_chain("T1n,t2w->T2F") == (("t1", "t2"), "flair")
    with pytest.raises(UserError, match="--chain"):
        parse_chain("t1-t2")
    assert set(COPY_PREFERENCE) == set(MODALITIES)
    assert all(t not in prefs and set(prefs) == set(MODALITIES) - {t} for t, prefs in COPY_PREFERENCE.items())


def test_copy_nearest_beats_naive_copy(slices: Path, tmp_path: Path) -> None:
    base = fit_copy_nearest(slices)
    assert base.counts["t1"] == 16 and base.counts["flair"] == 12 and "dwi" not in base.templates
    assert np.all(np.diff(base.templates["t2"]) >= 0)
    test = SliceDataset(slices, split="test", require=["flair"])
    b = test.batch(range(len(test)))
    assert base.source_for("t2", ["t1", "flair"]) == "flair"
    assert base.source_for("t2", ["t1"]) == "t1"
    pred = base.impute(b["images"], b["present"], b["brain"], ("t1", "flair"), "t2")
    ref = b["images"][:, 1]
    naive = b["images"][:, 2]
    mse_matched = float(np.mean((pred - ref) ** 2))
    mse_naive = float(np.mean((naive - ref) ** 2))
    assert mse_matched < 0.25 * mse_naive
    assert np.all(pred[b["brain"] == 0] == 0)
    # the chain restricts what may be copied: T1 only, even though FLAIR is present
    pred_t1 = base.impute(b["images"], b["present"], b["brain"], ("t1",), "t2")
    assert not np.allclose(pred_t1, pred)
    # single slice and JSON round trip
    base.save(tmp_path / "copy.json")
    again = CopyNearestBaseline.load(tmp_path / "copy.json")
    single = again.impute(b["images"][0], b["present"][0], b["brain"][0], ("t1", "flair"), "t2")
    np.testing.assert_allclose(single, pred[0], atol=1e-6)
    with pytest.raises(UserError, match="no training histogram"):
        again.impute(b["images"], b["present"], b["brain"], ("t1",), "dwi")


def test_unet_size() -> None:
    n = sum(p.numel() for p in UNet(6, 1, base=24, depth=3).parameters())
    assert 1_000_000 <= n <= 2_000_000
    x = np.zeros((2, 6, 30, 34), np.float32)  # odd sizes are padded inside
    import torch

    assert UNet(6, 1, base=8, depth=3)(torch.as_tensor(x)).shape == (2, 1, 30, 34)


def test_unet_trains_and_round_trips(slices: Path, tmp_path: Path) -> None:
    model = train_unet(slices, ["t1"], "t2", steps=30, seed=0, batch_size=4, lr=3e-3, base_channels=8)
    h = model.history
    assert len(h) == 30 and np.mean(h[-5:]) < 0.7 * np.mean(h[:5])
    assert model.meta["train_slices"] == 16
    test = SliceDataset(slices, split="test")
    b = test.batch(range(len(test)))
    pred = model.predict(b["images"], b["present"], b["brain"])
    assert pred.shape == (len(test), S, S) and pred.min() >= 0 and pred.max() <= 1
    assert np.all(pred[b["brain"] == 0] == 0)
    model.save(tmp_path / "unet")
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json", "weights.safetensors"]
    loaded = UNetBaseline.load(tmp_path / "unet")
    np.testing.assert_array_equal(loaded.predict(b["images"], b["present"], b["brain"]), pred)
    np.testing.assert_array_equal(loaded.impute(b["images"], b["present"], b["brain"], ("t1",), "t2"), pred)
    with pytest.raises(ValueError, match="imputes t1->t2"):
        loaded.impute(b["images"], b["present"], b["brain"], ("t1", "t2"), "flair")
    # determinism for a seed
    runs = [train_unet(slices, ["t1"], "t2", steps=3, seed=5, batch_size=4, base_channels=8) for _ in range(2)]
    assert runs[0].history == runs[1].history


def test_unet_missing_input_uses_presence_planes(slices: Path) -> None:
    model = train_unet(slices, ["t1", "flair"], "t2", steps=2, seed=1, batch_size=4, base_channels=8)
    assert model.meta["train_slices"] == 16  # slices lacking FLAIR still train (presence plane 0)
    test = SliceDataset(slices, split="test")
    b = test.batch(range(len(test)))
    x = model.net_inputs(b["images"], b["present"]).numpy()
    assert x.shape == (len(test), 4, S, S)
    np.testing.assert_array_equal(x[:, 2, 0, 0], b["present"][:, 0].astype(np.float32))
    np.testing.assert_array_equal(x[:, 3, 0, 0], b["present"][:, 2].astype(np.float32))
    with pytest.raises(UserError, match="no train slices"):
        train_unet(slices, ["t1"], "dwi", steps=1)
