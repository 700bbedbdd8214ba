"""The vae training stage: loss, batches, latent scale fitting, export round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from slices_helpers import write_slices

from unibrain_cli.config import load_recipe
from unibrain_cli.config.components import Recipe
from unibrain_cli.errors import UserError
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.training.run import train
from unibrain_cli.training.stages import StageContext, stage_generator
from unibrain_cli.training.stages.vae import (
    VAEStage,
    latent_brain_mask,
    latent_stats,
    load_trained_vae,
    vae_loss,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slices(tmp_path_factory.mktemp("vae_slices") / "SLICES")


def vae_recipe(steps: int = 30, **stage_kw: object) -> Recipe:
    stage = {"name": "vae", "steps": steps, "lr": 2e-3, "batch_size": 4, **stage_kw}
    inline = ", ".join(f"{k}={json.dumps(v)}" for k, v in stage.items())
    return load_recipe("tiny", [f"train.stages=[{{{inline}}}]", "train.log_every=1", "train.checkpoint_every=100"])


def stage_for(recipe: Recipe, slices: Path, tmp: Path) -> VAEStage:
    return VAEStage(StageContext(recipe, recipe.train.stages[0], 0, slices, tmp))


def test_vae_loss_golden_values() -> None:
    x = torch.zeros(2, 1, 8, 8)
    zero = torch.zeros(2, 4, 2, 2)
    loss, recon, kl = vae_loss(x, x, zero, zero, kl_weight=1.0)
    assert float(loss) == 0.0 and float(recon) == 0.0 and float(kl) == 0.0
    # |diff| = 0.5 everywhere; KL of mean 1, logvar 0 = 0.5 per element x 16 elements
    loss, recon, kl = vae_loss(x, x + 0.5, zero + 1.0, zero, kl_weight=2.0)
    assert float(recon) == pytest.approx(0.5)
    assert float(kl) == pytest.approx(8.0)
    assert float(loss) == pytest.approx(0.5 + 2.0 * 8.0 / 64)
    _, mse, _ = vae_loss(x, x + 0.5, zero, zero, kl_weight=0.0, kind="mse")
    assert float(mse) == pytest.approx(0.25)


def test_batches_are_deterministic_and_split_consistently(slices: Path, tmp_path: Path) -> None:
    r4 = vae_recipe(batch_size=4)
    r2 = dataclasses.replace(r4, train=dataclasses.replace(
        r4.train, stages=(dataclasses.replace(r4.train.stages[0], batch_size=2),)))
    b4 = stage_for(r4, slices, tmp_path).next_batch(0, stage_generator(0, 0, 0))
    again = stage_for(r4, slices, tmp_path).next_batch(0, stage_generator(0, 0, 0))
    s2, g = stage_for(r2, slices, tmp_path), stage_generator(0, 0, 0)
    halves = [s2.next_batch(0, g), s2.next_batch(1, g)]
    assert b4["x"].shape == (4, 1, 32, 32) and b4["eps"].shape == (4, 4, 8, 8)
    assert float(b4["x"].min()) >= -1.0 and float(b4["x"].max()) <= 1.0
    for k in ("x", "eps"):
        assert torch.equal(b4[k], again[k])
        assert torch.equal(b4[k], torch.cat([h[k] for h in halves]))
    # other ranks draw other items
    other = VAEStage(StageContext(r4, r4.train.stages[0], 0, slices, tmp_path, rank=1, world_size=2))
    assert not torch.equal(other.next_batch(0, stage_generator(0, 0, 1))["x"], b4["x"])


def test_three_channel_vae_replicates_the_modality(slices: Path, tmp_path: Path) -> None:
    r = vae_recipe()
    r = dataclasses.replace(r, model=dataclasses.replace(r.model, vae=dataclasses.replace(r.model.vae, in_channels=3)))
    b = stage_for(r, slices, tmp_path).next_batch(0, stage_generator(0, 0, 0))
    assert b["x"].shape == (4, 3, 32, 32)
    assert torch.equal(b["x"][:, 0], b["x"][:, 2])


def test_latent_stats_match_direct_computation() -> None:
    torch.manual_seed(0)
    ae = AutoEncoder(load_recipe("tiny").model.vae).eval()
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    mu, std = latent_stats(ae, images, batch_size=2)
    with torch.no_grad():
        mean = ae.encode_moments(images)[0].double()
    assert mu == pytest.approx(float(mean.mean()), rel=1e-5)
    assert std == pytest.approx(float(mean.std(unbiased=False)), rel=1e-5)


def test_vae_stage_trains_exports_and_round_trips(slices: Path, tmp_path: Path) -> None:
    recipe = vae_recipe(steps=30)
    summary = train(recipe, slices, tmp_path / "RUN")
    run = tmp_path / "RUN"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    # export: weights + config with fitted scale/shift; latents of the stats images are standardised
    vae = load_trained_vae(run / "vae" / "final")
    stats = json.loads((run / "vae" / "final" / "latent_stats.json").read_text())
    assert vae.scale_factor == pytest.approx(1.0 / stats["std"]) and vae.shift_factor == pytest.approx(stats["mean"])
    stage = stage_for(recipe, slices, tmp_path)
    ds = stage._dataset()
    order = np.random.default_rng(recipe.train.seed).permutation(len(ds))
    imgs = np.stack([ds.arrays(int(i))["images"][stage._choices[int(i)][0]] for i in order])
    brain = latent_brain_mask(np.stack([ds.arrays(int(i))["brain"] for i in order]), vae.downsample)
    assert stats["region"] == "brain" and 0.0 < stats["brain_fraction"] < 1.0
    with torch.no_grad():
        z = vae.encode(stage._to_input(imgs)).double()
    zb = z.permute(0, 2, 3, 1)[brain]  # brain latents are standardised, not the whole field
    assert float(zb.mean()) == pytest.approx(0.0, abs=1e-4) and float(zb.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert stats["std_full"] > 0 and np.isfinite(stats["mean_full"])
    # PSNR of the trained VAE beats an untrained one on the same held-out batch
    psnr = summary.stages["vae"]["metrics"]["psnr"]
    eval_line = [x for x in lines if x["kind"] == "eval"][0]
    assert eval_line["metrics"]["psnr"] == psnr
    assert np.isfinite(summary.stages["vae"]["metrics"]["psnr_brain"])
    untrained = stage.evaluate(stage.build_model().eval())["psnr"]
    assert psnr > untrained + 3.0
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def test_load_trained_vae_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="ae.safetensors"):
        load_trained_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"ch": 16, "bogus": 1}))
    (tmp_path / "ae.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="bogus"):
        load_trained_vae(tmp_path)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_recon_loss_selects_the_reconstruction_term(slices: Path, tmp_path: Path, kind: str) -> None:
    recipe = vae_recipe(recon_loss=kind, kl_weight=0.0)
    stage = stage_for(recipe, slices, tmp_path)
    torch.manual_seed(0)
    model = stage.build_model()
    batch = stage.next_batch(0, stage_generator(0, 0, 0))
    out = stage.loss(model, batch)
    with torch.no_grad():
        x_hat, _, _ = model(batch["x"], batch["eps"])
    diff = (x_hat - batch["x"]).float()
    want = diff.abs().mean() if kind == "l1" else diff.square().mean()
    assert out.terms["recon"] == pytest.approx(float(want), rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-6)


def test_unknown_recon_loss_is_a_recipe_error() -> None:
    with pytest.raises(UserError, match="recon_loss"):
        vae_recipe(recon_loss="l2")
