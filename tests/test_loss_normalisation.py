"""NTP / flow / SA losses normalised by GLOBAL token counts (over the optimizer step's micro-batches
and ranks, BAGEL), on the tiny unified model with hand-built packs of very different sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from unibrain_cli.config import load_recipe
from unibrain_cli.config.components import Recipe
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.training.materialize import (
    ImageGeometry,
    ImageItem,
    Item,
    TextItem,
    TrainBatch,
    build_batch,
)
from unibrain_cli.training.model_init import fresh_model
from unibrain_cli.training.stages import StageContext
from unibrain_cli.training.stages.dhs import DHSTrainModule
from unibrain_cli.training.stages.unified import UnifiedStage, UnifiedTrainModule
from unibrain_cli.training.trainer import StepInfo, run_stage, set_trainable

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

NTP_W, FLOW_W = 1.0, 0.5
ONES = {"ntp": 1.0, "flow": 1.0, "sa": 1.0}  # norm that turns every term into its plain sum


def tiny_recipe(grad_accum: int) -> Recipe:
    stage = (f"{{name='unified', steps=1, lr=1e-3, grad_accum={grad_accum}, ntp_weight={NTP_W}, "
             f"flow_weight={FLOW_W}}}")
    return load_recipe("tiny", [f"train.stages=[{stage}]", "train.log_every=1", "train.checkpoint_every=100"])


def geometry() -> ImageGeometry:
    recipe = load_recipe("tiny")
    return ImageGeometry.from_config(recipe.model, recipe.data.image_size)


def make_module(cls: type[UnifiedTrainModule] = UnifiedTrainModule, **kw: Any) -> UnifiedTrainModule:
    cfg = load_recipe("tiny").model
    model = fresh_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the velocity head starts at zero: give the flow terms real gradients
        model.llm2vae.weight.copy_(0.05 * torch.randn(model.llm2vae.weight.shape, generator=gen))
    torch.manual_seed(1)
    return cls(model, AutoEncoder(cfg.vae).eval(), geometry(), NTP_W, FLOW_W, **kw)


def text(n: int, loss: bool, role: str, start: int = 10) -> TextItem:
    return TextItem((1, *range(start, start + n), 2), loss, role)


def hand_batches() -> list[TrainBatch]:
    """A: 2 NTP targets, one generation target, no SA. B: 31 NTP targets, two generation targets
    and one self-alignment target (two samples)."""
    g = geometry()
    gen = torch.Generator().manual_seed(3)
    a: list[Item] = [ImageItem("vit", False, 0), ImageItem("vae", False, 0), text(4, False, "instruction"),
                     ImageItem("vae", True, 1, 0), ImageItem("vae", False, 1, 0), text(1, True, "answer", 40)]
    b1: list[Item] = [ImageItem("vae", False, 0), ImageItem("vit", False, 0), text(3, False, "instruction"),
                      text(20, True, "thinking", 60), ImageItem("vae", True, 1, 0), ImageItem("vae", False, 1, 0),
                      ImageItem("vae", True, 2, 1), text(9, True, "answer", 100)]
    b2: list[Item] = [ImageItem("vit", False, 3), text(5, False, "instruction", 200), ImageItem("vae", True, 3, 2, sa=True)]
    batches = []
    for samples, n_img, n_slots in (([a], 2, 1), ([b1, b2], 4, 3)):
        pixels = torch.rand((n_img, g.image_size, g.image_size), generator=gen)
        times = torch.rand((n_slots,), generator=gen) * 0.8 + 0.1
        noise = torch.randn((n_slots, g.vae_image_tokens, g.latent_dim), generator=gen)
        exit_steps = torch.tensor([0, 1, -1][:n_slots]) if n_slots == 3 else torch.tensor([1])
        batches.append(build_batch(samples, pixels, g, (3, 4), times, noise, exit_steps=exit_steps))
    return batches


def on_schedule(batch: TrainBatch, module: DHSTrainModule) -> TrainBatch:
    """``batch`` with each generation slot's flow time set to its DHS exit step's rollout time."""
    sched = torch.tensor(module.schedule())
    exits = batch.exit_steps
    times = torch.where(exits >= 0, sched[exits.clamp(min=0)], batch.timesteps)
    return build_batch(batch.samples, batch.pixels, geometry(), batch.markers, times, batch.noise, exit_steps=exits)


class HandStage(UnifiedStage):
    """The unified stage on fixed packs (no slices, no tokenizer): micro-batch i is BATCHES[i]."""

    BATCHES: ClassVar[list[TrainBatch]] = []

    def build_model(self) -> nn.Module:
        return make_module()

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        torch.rand((), generator=generator)
        return {"batch": self.BATCHES[position % len(self.BATCHES)]}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        (out_dir / "done.json").write_text(json.dumps({"ok": True}))


def train_one_step(batches: list[TrainBatch], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> tuple[list[Tensor], StepInfo]:
    """One optimizer step over ``batches`` (grad_accum = len); the accumulated gradient before clipping."""
    grads: list[list[Tensor]] = []
    original = Accelerator.clip_grad_norm_

    def spy(self: Accelerator, parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        parameters = list(parameters)
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in parameters])
        return original(self, parameters, max_norm, norm_type)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    monkeypatch.setattr(HandStage, "BATCHES", batches)
    recipe = tiny_recipe(len(batches))
    infos: list[StepInfo] = []
    ctx = StageContext(recipe, recipe.train.stages[0], 0, tmp_path / "SLICES", tmp_path / "RUN")
    run_stage(HandStage(ctx), hooks=[infos.append])
    assert len(grads) == 1 and len(infos) == 1
    return grads[0], infos[0]


def reference(batches: list[TrainBatch]) -> tuple[UnifiedTrainModule, list[nn.Parameter], list[dict[str, Tensor]]]:
    """A fresh copy of the trained module (same weights and modes) and each batch's token-loss sums."""
    module = make_module()
    set_trainable(module, ("model",))
    params = [p for p in module.parameters() if p.requires_grad]
    sums = []
    for b in batches:
        t = module.terms(b, *module.encode_images(b.pixels), norm=ONES)
        assert (t.n_ntp, t.n_flow, t.n_sa) == tuple(b.loss_counts()[k] for k in ("ntp", "flow", "sa"))
        sums.append({"ntp": t.ntp, "flow": t.flow, "sa": t.sa})
    return module, params, sums


def grads_of(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]


def test_loss_counts_are_what_the_losses_average_over() -> None:
    a, b = hand_batches()
    t = geometry().vae_image_tokens
    assert a.loss_counts() == {"ntp": 2, "flow": t, "sa": 0}
    assert b.loss_counts() == {"ntp": 21 + 10, "flow": 2 * t, "sa": t}
    # DHS: the rollout carries no loss; each slot's noisy split is trained once, at its exit step
    module = make_module(DHSTrainModule, rollout_steps=2, sample_shift=3.0)
    b = on_schedule(b, module)
    with torch.no_grad():
        lat, vit = module.encode_images(b.pixels)
        plain = module.losses(b, lat, vit)
        normed = module.losses(b, lat, vit, norm={k: 2.0 * v for k, v in b.loss_counts().items()})
    assert {"ntp": plain.n_ntp, "flow": plain.n_flow, "sa": plain.n_sa} == b.loss_counts()
    for k in ("ntp", "flow", "sa"):  # a norm of twice the own count halves the per-token mean
        assert float(getattr(normed, k)) == pytest.approx(float(getattr(plain, k)) / 2, rel=1e-6)


def test_grad_accum_normalises_by_the_global_token_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = hand_batches()
    got, info = train_one_step(batches, tmp_path, monkeypatch)
    _, params, sums = reference(batches)
    total = {k: sum(b.loss_counts()[k] for b in batches) for k in ONES}
    per_token = {k: sum(s[k] for s in sums) / total[k] for k in ONES}
    loss = NTP_W * per_token["ntp"] + FLOW_W * (per_token["flow"] + per_token["sa"])
    want = grads_of(loss, params)
    assert len(got) == len(want) and float(sum(g.abs().sum() for g in want)) > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # logs: the per-token means over the whole step
    for k in ONES:
        assert info.terms[k] == pytest.approx(float(per_token[k].detach()), rel=1e-5)
    assert info.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    # ... which is not the old mean of per-micro-batch means
    counts = [b.loss_counts() for b in batches]
    old = sum(NTP_W * s["ntp"] / c["ntp"] + FLOW_W * (s["flow"] / c["flow"] + s["sa"] / max(c["sa"], 1))
              for s, c in zip(sums, counts, strict=True)) / len(batches)
    old_grads = grads_of(old, params)
    diff = max(float((g - o).abs().max()) for g, o in zip(got, old_grads, strict=True))
    assert diff > 1e-3


def test_one_micro_batch_keeps_the_per_micro_batch_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = hand_batches()[1]
    got, info = train_one_step([batch], tmp_path, monkeypatch)
    module, params, _ = reference([batch])
    out = module(batch)  # no norm: each term's mean over this micro-batch (the previous behaviour)
    assert info.loss == pytest.approx(float(out["loss"].detach()), rel=1e-6)
    for k in ONES:
        assert info.terms[k] == pytest.approx(float(out[k]), rel=1e-6)
    for g, w in zip(got, grads_of(out["loss"], params), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_flow_signal_bench_counts_the_flow_loss_tokens_of_each_pack():
    """make bench's flow_signal: generation-only packs carry flow tokens (whole latent images), understanding-only
    packs none."""
    from unibrain_cli.training.bench import bench_flow_signal

    gen = bench_flow_signal("tiny", ("data.generation_only_prob=1.0", "data.impression_prob=0.0",
                                     "data.diagnosis_prob=0.0", "data.understanding_only_prob=0.0"), packs=1)
    tokens_per_image = (32 // 4 // 2) ** 2  # tiny: 32-px slices, downsample 4, latent patch 2
    assert gen["flow_tokens"] > 0 and gen["flow_tokens"] % tokens_per_image == 0
    assert gen["flow_tokens_per_s"] > 0 and gen["tokens"] <= 1024 * 1.5
    und = bench_flow_signal("tiny", ("data.understanding_only_prob=1.0",), packs=1)
    assert und["flow_tokens"] == 0
