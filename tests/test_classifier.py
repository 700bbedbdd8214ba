"""The supervised CNN diagnosis reference (evaluation/classifier.py) on a tiny learnable slices folder.

Toy task: two classes whose T2 carries a bright (glioma) or dark (stroke) blob at a random place;
T1 is texture of the same distribution in both classes, so a T1-only classifier can only guess.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from slices_helpers import save_slices_folder

from unibrain_cli.errors import UserError
from unibrain_cli.evaluation.classifier import (
    ClassifierReference,
    DiagnosisCNN,
    evaluate_classifier,
    input_mask,
    main,
    train_classifier,
)
from unibrain_cli.modalities import MODALITIES

S = 32
N_TRAIN_CASES, N_TEST_CASES = 30, 20  # two slices per case, classes alternate
T1, T2, FLAIR = (MODALITIES.index(m) for m in ("t1", "t2", "flair"))


def _toy_slice(rng: np.random.Generator, label: str, mods: tuple[str, ...]) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    brain = ((yy - 15.5) / 13) ** 2 + ((xx - 15.5) / 12) ** 2 <= 1.0
    ly, lx = rng.uniform(9, 22, size=2)
    blob = np.hypot(yy - ly, xx - lx) <= 3.0
    images = np.zeros((6, S, S), np.float32)
    images[T1] = (0.4 + 0.3 * rng.random((S, S))) * brain
    t2 = 0.5 + 0.1 * rng.random((S, S)) + (0.4 if label == "glioma" else -0.4) * blob
    images[T2] = np.clip(t2, 0, 1) * brain
    images[FLAIR] = (0.3 + 0.2 * rng.random((S, S))) * brain
    present = np.array([m in mods for m in MODALITIES], np.uint8)
    images *= present[:, None, None]
    lesion = (blob & brain).astype(np.uint8)
    return {"images": images, "present": present, "mask": lesion, "labels": lesion, "brain": brain.astype(np.uint8)}


def write_toy_slices(root: Path, seed: int = 0) -> Path:
    """Train: 30 cases x 2 slices (T1+T2), plus 3 train slices that no scenario may use for a class:
    one labelled "glioma|stroke", one unlabelled, and one T1-only glioma (usable by t1 only).
    Test: 20 cases x 2 slices, one evaluation slice each. No slice has FLAIR in train."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    slices: list[dict[str, np.ndarray]] = []

    def add(case: str, k: int, split: str, diseases: str, mods: tuple[str, ...], is_eval: bool) -> None:
        label = diseases if diseases in ("glioma", "stroke") else "glioma"
        slices.append(_toy_slice(rng, label, mods))
        rows.append({"slice_id": f"{case}:{k}", "case_id": case, "subset": "toy", "split": split,
                     "diseases": diseases, "slice_k": k, "is_eval": is_eval, "shard": "", "row": 0,
                     "modalities": "|".join(mods)})

    for c in range(N_TRAIN_CASES + N_TEST_CASES):
        split = "train" if c < N_TRAIN_CASES else "test"
        for k in range(2):
            add(f"case{c:02d}", k, split, ("glioma", "stroke")[c % 2], ("t1", "t2"), k == 0)
    add("mixed", 0, "train", "glioma|stroke", ("t1", "t2"), True)
    add("unlabelled", 0, "train", "", ("t1", "t2"), True)
    add("t1only", 0, "train", "glioma", ("t1",), True)
    return save_slices_folder(root, rows, slices, S)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_slices(tmp_path_factory.mktemp("clf") / "slices")


@pytest.fixture(scope="module")
def trained(toy: Path) -> ClassifierReference:
    return train_classifier(toy, "t1_t2", steps=150, seed=0, batch_size=16)


def _test_arrays(toy: Path) -> tuple[np.ndarray, np.ndarray]:
    from unibrain_cli.data.slices_data import SliceDataset

    ds = SliceDataset(toy, split="test")
    b = ds.batch(range(len(ds)))
    return b["images"], b["present"].astype(bool)


def test_network_shape_and_size() -> None:
    net = DiagnosisCNN(5)
    assert net(torch.zeros(2, 12, 64, 64)).shape == (2, 5)
    assert net(torch.zeros(1, 12, 17, 23)).shape == (1, 5)  # odd sizes too
    assert sum(p.numel() for p in net.parameters()) < 150_000


def test_cohort_classes_and_meta(toy: Path, trained: ClassifierReference) -> None:
    assert trained.scenario == "t1_t2" and trained.classes == ("glioma", "stroke")
    # 60 two-modality slices; the mixed, unlabelled and T1-only slices are not used
    assert trained.meta["train_slices"] == 2 * N_TRAIN_CASES
    assert trained.meta["train_per_class"] == {"glioma": N_TRAIN_CASES, "stroke": N_TRAIN_CASES}
    assert trained.meta["steps"] == 150 and trained.meta["seed"] == 0
    assert len(trained.history) == 150 and trained.history[-1] < trained.history[0]
    t1 = train_classifier(toy, "t1", steps=1, batch_size=4)
    assert t1.meta["train_slices"] == 2 * N_TRAIN_CASES + 1  # the T1-only glioma joins


def test_same_seed_same_weights_other_seed_differs(toy: Path) -> None:
    a = train_classifier(toy, "t1_t2", steps=12, seed=3, batch_size=8)
    b = train_classifier(toy, "t1_t2", steps=12, seed=3, batch_size=8)
    c = train_classifier(toy, "t1_t2", steps=12, seed=4, batch_size=8)
    sa, sb, sc = (m.net.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == b.history
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight"))
    images, present = _test_arrays(toy)
    assert np.array_equal(a.scores(images, present), b.scores(images, present))
    assert a.predict(images, present) == b.predict(images, present)


def test_learns_the_informative_modality_and_masks_the_rest(toy: Path) -> None:
    """T2 separates the classes: trained with T2 the held-out accuracy is high; the T1-only scenario
    cannot see T2 (its channel is zeroed) and stays near chance (50 %)."""
    res = evaluate_classifier(toy, "t1,t1_t2", split="test", all_slices=True, steps=150, seed=0, batch_size=16)
    assert res["selection"] == "all" and res["split"] == "test"
    with_t2, t1_only = res["scenarios"]["t1_t2"], res["scenarios"]["t1"]
    assert with_t2["n"] == t1_only["n"] == 2 * N_TEST_CASES
    assert with_t2["top1"] >= 90.0, with_t2
    assert 25.0 <= t1_only["top1"] <= 75.0, t1_only
    assert with_t2["per_class"] == {"glioma": {"top1": pytest.approx(with_t2["per_class"]["glioma"]["top1"]),
                                               "n": N_TEST_CASES},
                                    "stroke": {"top1": pytest.approx(with_t2["per_class"]["stroke"]["top1"]),
                                               "n": N_TEST_CASES}}
    assert with_t2["majority_top1"] == 50.0 and with_t2["train_slices"] == 2 * N_TRAIN_CASES
    assert with_t2["train_seconds"] > 0
    ev = evaluate_classifier(toy, "t1_t2", split="test", steps=150, seed=0, batch_size=16)
    assert ev["selection"] == "eval" and ev["scenarios"]["t1_t2"]["n"] == N_TEST_CASES  # one per case
    assert ev["scenarios"]["t1_t2"]["top1"] >= 90.0
    empty = evaluate_classifier(toy, "t1_t2_flair", steps=1)  # no test slice has FLAIR: reported, not trained
    assert empty["scenarios"]["t1_t2_flair"] == {"top1": None, "n": 0, "per_class": {}, "majority_top1": None}


def test_predict_ignores_non_input_channels(toy: Path, trained: ClassifierReference) -> None:
    images, present = _test_arrays(toy)
    base = trained.scores(images, present)
    assert base.shape == (len(images), 2) and np.allclose(base.sum(1), 1.0, atol=1e-5)
    noisy = images.copy()
    rng = np.random.default_rng(1)
    for c in range(len(MODALITIES)):
        if c not in (T1, T2):
            noisy[:, c] = rng.random(noisy[:, c].shape)
    pres_more = present.copy()
    pres_more[:, FLAIR] = True  # FLAIR present too: still not an input of t1_t2
    assert np.array_equal(trained.scores(noisy, pres_more), base)
    changed = images.copy()
    changed[:, T2] = 1.0 - changed[:, T2]  # an input channel: the scores move
    assert not np.array_equal(trained.scores(changed, present), base)
    # "complete" uses every PRESENT modality: pixels of an absent modality are ignored
    complete = train_classifier(toy, "complete", steps=2, batch_size=4)
    assert np.array_equal(complete.scores(noisy, present), complete.scores(images, present))
    assert not np.array_equal(complete.scores(noisy, pres_more), complete.scores(images, pres_more))
    mask = input_mask("complete", pres_more)
    assert mask[:, [T1, T2, FLAIR]].all() and not mask[:, [3, 4, 5]].any()
    with pytest.raises(ValueError, match="not in the cohort"):
        trained.predict(images, np.eye(6, dtype=bool)[[0] * len(images)])  # T1 only: no T2


def test_save_load_round_trip(tmp_path: Path, toy: Path, trained: ClassifierReference) -> None:
    trained.save(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "weights.safetensors"]
    back = ClassifierReference.load(tmp_path / "clf")
    images, present = _test_arrays(toy)
    assert np.array_equal(back.scores(images, present), trained.scores(images, present))
    assert back.predict(images, present) == trained.predict(images, present)
    assert back.config == trained.config and back.meta == json.loads(json.dumps(trained.meta))
    with pytest.raises(UserError, match="not a diagnosis classifier folder"):
        ClassifierReference.load(tmp_path)
    (tmp_path / "clf" / "config.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(UserError, match="unsupported"):
        ClassifierReference.load(tmp_path / "clf")


def test_errors(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="steps must be >= 1"):
        train_classifier(toy, "t1", steps=0)
    with pytest.raises(UserError, match="steps must be >= 1"):
        evaluate_classifier(toy, "t1", steps=0)
    with pytest.raises(UserError, match="no train slice is in the cohort of scenario 't1_t2_flair'"):
        train_classifier(toy, "t1_t2_flair", steps=1)
    with pytest.raises(UserError, match="unknown scenario"):
        train_classifier(toy, "t2", steps=1)
    with pytest.raises(UserError, match="exactly one scenario"):
        train_classifier(toy, "t1,complete", steps=1)
    with pytest.raises(UserError, match="no evaluation slices in split 'tset'"):
        evaluate_classifier(toy, "t1", split="tset", steps=1)
    with pytest.raises(UserError, match="does not exist"):
        train_classifier(tmp_path / "nowhere", "t1", steps=1)


def test_main(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(toy), "--scenario", "t1_t2", "--steps", "3", "--seed", "1"])
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 3 and res["seed"] == 1 and list(res["scenarios"]) == ["t1_t2"]
    assert res["scenarios"]["t1_t2"]["n"] == N_TEST_CASES
    for argv, needle in (([str(tmp_path / "missing")], "missing"),
                         ([str(toy), "--scenario", "t9"], "unknown scenario 't9'"),
                         ([str(toy), "--steps", "0"], "steps must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
        assert "Traceback" not in captured.err
