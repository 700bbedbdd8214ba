"""Slices reader, copy-nearest and U-Net baselines on a tiny synthetic slices folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from slices_helpers import S, write_slices

from unibrain_cli.data.slices_data import SliceDataset, filter_index, load_index
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
from unibrain_cli.modalities import MODALITIES


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
