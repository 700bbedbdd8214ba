"""The conditioning probe (evaluation/probe.py) on a random tiny checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from slices_helpers import write_slices

from unibrain_cli.evaluation.probe import conditioning_probe, main
from unibrain_cli.inference.bench import make_random_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe")
    return make_random_checkpoint(root / "ckpt", velocity_std=0.5), write_slices(root / "slices")


def test_probe_is_deterministic_and_context_sensitive(setup: tuple[Path, Path]) -> None:
    ckpt, slices = setup
    a = conditioning_probe(ckpt, slices, split="test", times=(0.5,))
    b = conditioning_probe(ckpt, slices, split="test", times=(0.5,))
    assert a == b and a["n"] == 2
    assert all(math.isfinite(a[c]) and a[c] > 0 for c in ("own", "other", "none"))
    assert a["own"] != a["none"] and a["own"] != a["other"]  # the random model's velocity sees the image
    psnrs = [a[f"psnr_{c}"] for c in ("own", "other", "none")]
    assert all(math.isfinite(p) and 0 < p < 60 for p in psnrs) and len(set(psnrs)) == 3


def test_probe_needs_two_slices(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, slices = setup
    with pytest.raises(ValueError, match="need at least 2"):
        conditioning_probe(ckpt, slices, split="test", target="flair")  # case11 of the test split has no FLAIR
    main([str(ckpt), str(slices), "--max-slices", "2"])
    assert '"n": 2' in capsys.readouterr().out


def test_probe_masks_with_the_input_only(setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-step estimate is zeroed outside the slice's own INPUT mask, never the target's extent."""
    import numpy as np

    from unibrain_cli.evaluation import probe
    from unibrain_cli.inference.checkpoint import load_for_inference
    from unibrain_cli.inference.diagnose import engine_for

    ckpt, _ = setup
    size = 32
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    inner, outer = r <= 8, r <= 14
    rng = np.random.default_rng(0)
    pairs = [((0.3 + 0.6 * rng.random((size, size)) * inner).astype(np.float32) * inner,
              ((0.3 + 0.6 * rng.random((size, size))) * outer).astype(np.float32)) for _ in range(2)]
    seen: list[np.ndarray] = []
    real = probe.psnr

    def spy(pred: np.ndarray, ref: np.ndarray) -> float:
        seen.append(pred)
        return real(pred, ref)

    monkeypatch.setattr(probe, "psnr", spy)
    res = probe.probe_slices(engine_for(load_for_inference(ckpt)), pairs, times=(0.5,))
    assert res["n"] == 2 and res["conditioning_gap_db"] == res["psnr_own"] - res["psnr_other"]
    # 2 slices x 3 contexts, one-step estimates and sampled images alike
    assert len(seen) == 12 and all(not p[~inner].any() and p[inner].any() for p in seen)
    assert res["sampled_gap_db"] == res["psnr_sampled_own"] - res["psnr_sampled_other"]


def test_probe_samples_like_impute_with_the_same_noise_in_every_context(setup: tuple[Path, Path]) -> None:
    """psnr_sampled_*: one image per context from ``generate_modality`` (no thinking) with a generator
    seeded per slice, so the contexts differ only in what the model is given."""
    import numpy as np
    import torch

    from unibrain_cli.data.slices_data import SliceDataset
    from unibrain_cli.data.slicing import slice_brain_mask
    from unibrain_cli.evaluation import probe
    from unibrain_cli.evaluation.metrics import psnr
    from unibrain_cli.inference.checkpoint import load_for_inference
    from unibrain_cli.inference.diagnose import engine_for
    from unibrain_cli.inference.engine import generate_modality
    from unibrain_cli.modalities import MODALITIES

    ckpt, slices = setup
    engine = engine_for(load_for_inference(ckpt))
    ds = SliceDataset(slices, split="test", is_eval=True, require=("t1", "t2"))
    pairs = [(img[MODALITIES.index("t1")], img[MODALITIES.index("t2")])
             for img in (ds.arrays(i)["images"] for i in range(len(ds)))]
    res = probe.probe_slices(engine, pairs, times=(0.5,), seed=3)
    expect = {"own": [], "none": []}
    for i, (src, tgt) in enumerate(pairs):
        mask = torch.from_numpy(slice_brain_mask(np.asarray(src)[None]).astype(np.float32))
        for name, img in (("own", src), ("none", None)):
            ctx = engine.start([] if img is None else engine.encode(torch.from_numpy(np.asarray(img))[None], ["t1"]))
            image, _ = generate_modality(engine, ctx, ["t1"], "t2", torch.Generator().manual_seed(3 + 2 + i), 0,
                                         brain=mask)
            expect[name].append(psnr(image.clamp(0, 1).numpy(), np.asarray(tgt)))
    assert res["psnr_sampled_own"] == pytest.approx(sum(expect["own"]) / len(pairs), rel=1e-6)
    assert res["psnr_sampled_none"] == pytest.approx(sum(expect["none"]) / len(pairs), rel=1e-6)
    assert res["psnr_sampled_own"] != res["psnr_sampled_other"]  # the random model's sample sees the image
