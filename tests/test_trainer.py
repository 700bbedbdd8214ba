"""Generic trainer: schedule, exact resume, Ctrl-C, pickle-free checkpoints, stage plug-ins,
activation checkpointing, gradient accumulation and input errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from slices_helpers import write_slices
from torch import nn

from unibrain_cli.config import load_recipe
from unibrain_cli.config.components import Recipe
from unibrain_cli.errors import UserError
from unibrain_cli.training import stages as stage_registry
from unibrain_cli.training.checkpoint import (
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    unflatten_optimizer_state,
)
from unibrain_cli.training.parallel import apply_activation_checkpointing
from unibrain_cli.training.run import stage_train_seconds, train
from unibrain_cli.training.stages import EpochSampler, StageTask, StepOutput
from unibrain_cli.training.trainer import StepInfo, defer_sigint, lr_factor

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slices(tmp_path_factory.mktemp("trainer_slices") / "SLICES", n_cases=8)


def recipe_with(stages: list[dict[str, Any]], *sets: str) -> Recipe:
    inline = ", ".join("{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in s.items()) + "}" for s in stages)
    return load_recipe("tiny", [f"train.stages=[{inline}]", "train.log_every=1", *sets])


VAE = {"name": "vae", "steps": 6, "lr": 2e-3, "batch_size": 2, "warmup_steps": 2, "min_lr": 1e-4}


class Stop(Exception):
    pass


def interrupt_at(step: int):
    def hook(info: StepInfo) -> None:
        if info.step == step:
            raise KeyboardInterrupt

    return hook


# -- a toy stage registered as "sa": the plug-in interface the later stages use ------------------
class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ToyStage(StageTask):
    """Regression of sum(x) with the head frozen; starts from the vae export's existence."""

    name = "sa"
    unit = "tokens"

    def check(self) -> None:
        if "vae" not in self.ctx.inputs:
            raise UserError("toy stage needs the vae stage before it")

    def build_model(self) -> nn.Module:
        assert (self.ctx.inputs["vae"] / "ae.safetensors").is_file()  # chained from the previous export
        torch.manual_seed(1)
        return ToyNet()

    def trainable_modules(self, model: nn.Module) -> list[str]:
        return ["layers"]

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        x = torch.randn(8, 4, generator=generator)
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        loss = (model(batch["x"]) - batch["y"]).square().mean()
        return StepOutput(loss, {"mse": float(loss.detach())}, 8)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "toy.safetensors"))


@pytest.fixture
def toy_sa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(stage_registry.STAGES, "sa", f"{__name__}:ToyStage")


# -- pure pieces ----------------------------------------------------------------------------------
def test_stage_train_seconds_sums_the_processes_of_a_resumed_stage(tmp_path: Path) -> None:
    recs = [{"kind": "train", "stage": "vae", "step": 10, "elapsed_s": 3.0},
            {"kind": "train", "stage": "unified", "step": 10, "elapsed_s": 10.0},
            {"kind": "train", "stage": "unified", "step": 20, "elapsed_s": 20.0},
            {"kind": "eval", "stage": "unified", "step": 20, "metrics": {}},
            {"kind": "train", "stage": "unified", "step": 20, "elapsed_s": 5.0},  # resumed from step 10
            {"kind": "train", "stage": "unified", "step": 30, "elapsed_s": 15.5}]
    lines = [json.dumps(r) for r in recs]
    lines.insert(3, "{not json")
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert stage_train_seconds(tmp_path, "unified") == 35.5
    assert stage_train_seconds(tmp_path, "vae") == 3.0
    assert stage_train_seconds(tmp_path, "dhs") is None
    assert stage_train_seconds(tmp_path / "absent", "unified") is None


def test_lr_schedule_warmup_then_cosine_to_min_lr() -> None:
    st = dataclasses.replace(load_recipe("tiny").train.stages[0], steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    f = [lr_factor(s, st) for s in range(10)]
    assert f[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the 8 cosine steps
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and f[-1] > 0.1
    assert lr_factor(10, st) == pytest.approx(0.1)


def test_optimizer_state_round_trips_without_pickle() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    meta = json.loads(json.dumps(meta))
    back = unflatten_optimizer_state(tensors, meta)
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(back)
    assert fresh.param_groups[0]["betas"] == (0.9, 0.95)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][k], v)


def test_epoch_sampler_ranks_partition_the_stream() -> None:
    single = EpochSampler(10, 4, seed=3)
    ranks = [EpochSampler(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for pos in range(6):
        assert single.indices(pos) == ranks[0].indices(pos) + ranks[1].indices(pos)
    first_epoch = [i for p in range(5) for i in EpochSampler(10, 2, seed=3).indices(p)]
    assert sorted(first_epoch) == list(range(10))


def test_activation_checkpointing_keeps_outputs_grads_and_keys() -> None:
    torch.manual_seed(0)
    a, b = ToyNet(), ToyNet()
    b.load_state_dict(a.state_dict())
    assert apply_activation_checkpointing(b) == 2 and apply_activation_checkpointing(b) == 0
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(5, 4)
    a(x).sum().backward()
    b(x).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7)


def test_defer_sigint_finishes_the_block_then_raises() -> None:
    done = []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    with pytest.raises(KeyboardInterrupt), defer_sigint():
        os.kill(os.getpid(), signal.SIGINT)
        done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


# -- the loop -------------------------------------------------------------------------------------
def test_resume_after_ctrl_c_equals_uninterrupted(slices: Path, tmp_path: Path) -> None:
    recipe = recipe_with([VAE], "train.checkpoint_every=2")
    train(recipe, slices, tmp_path / "A")
    with pytest.raises(KeyboardInterrupt):
        train(recipe, slices, tmp_path / "B", hooks=[interrupt_at(3)])
    b = tmp_path / "B"
    assert latest_checkpoint(b / "vae") == b / "vae" / "checkpoint-3"  # Ctrl-C saved the step it reached
    assert json.loads((b / "run.json").read_text())["status"] == "interrupted"
    assert not (b / "vae" / "final").exists()
    # checkpoints hold only safetensors + JSON, no pickle
    files = [p for p in (b / "vae").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}
    assert not any(p.read_bytes()[:1] == b"\x80" for p in files)
    ckpt = load_checkpoint(b / "vae" / "checkpoint-3")
    assert (ckpt.step, ckpt.position) == (3, 3) and set(ckpt.generators) == {0}

    summary = train(recipe, slices, b, resume=True)
    assert summary.stages["vae"]["resumed_from"] == 3
    for name in ("vae/checkpoint-6/model.safetensors", "vae/checkpoint-6/ema.safetensors",
                 "vae/checkpoint-6/optimizer.safetensors", "vae/final/ae.safetensors"):
        ta, tb = load_file(str(tmp_path / "A" / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.allclose(ta[k], tb[k], atol=1e-6, rtol=0), (name, k)
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    # a finished run resumes to a no-op
    again = train(recipe, slices, b, resume=True)
    assert again.stages["vae"]["status"] == "skipped"


def test_gradient_accumulation_matches_the_larger_batch(slices: Path, tmp_path: Path) -> None:
    big = recipe_with([{**VAE, "steps": 3, "batch_size": 4, "grad_accum": 1}])
    acc = recipe_with([{**VAE, "steps": 3, "batch_size": 2, "grad_accum": 2}])
    train(big, slices, tmp_path / "big")
    train(acc, slices, tmp_path / "acc")

    def losses(run: Path) -> list[float]:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]

    # same items and noise per optimizer step; updates agree up to float summation order
    # (Adam's first steps amplify that noise on near-zero gradients, so compare the losses)
    la, lb = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert la[0] == pytest.approx(lb[0], rel=1e-6)
    assert la == pytest.approx(lb, rel=1e-3)
    assert la[1] != pytest.approx(la[0], rel=1e-3)  # the steps did change the model


def test_stages_chain_freeze_and_run_alone(slices: Path, tmp_path: Path, toy_sa: None) -> None:
    toy = {"name": "sa", "steps": 4, "lr": 1e-2}
    recipe = recipe_with([{**VAE, "steps": 2}, toy])
    run = tmp_path / "RUN"
    with pytest.raises(UserError, match="needs the finished outputs of vae"):
        train(recipe, slices, run, stage="sa")
    train(recipe, slices, run, stage="vae")
    assert json.loads((run / "run.json").read_text())["status"] == "partial"
    summary = train(recipe, slices, run, stage="sa")
    assert summary.stages == {"sa": summary.stages["sa"]} and summary.stages["sa"]["status"] == "trained"
    info = json.loads((run / "run.json").read_text())
    assert info["stages_done"] == ["vae", "sa"] and info["status"] == "done"
    torch.manual_seed(1)
    init = ToyNet().state_dict()
    out = load_file(str(run / "sa" / "final" / "toy.safetensors"))
    assert torch.equal(out["head.weight"], init["head.weight"])  # frozen
    assert not torch.equal(out["layers.0.0.weight"], init["layers.0.0.weight"])  # trained
    with pytest.raises(UserError, match="already has outputs"):
        train(recipe, slices, run, stage="sa")


def test_unregistered_stage_is_refused_before_training(slices: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(stage_registry.STAGES, "sa", None)
    recipe = recipe_with([VAE, {"name": "sa", "steps": 1}])
    with pytest.raises(UserError, match="'sa' is listed in the recipe but not available"):
        train(recipe, slices, tmp_path / "RUN")
    assert not (tmp_path / "RUN").exists()
    with pytest.raises(UserError, match="not in this recipe"):
        train(recipe_with([VAE]), slices, tmp_path / "RUN", stage="dhs")


def test_bad_inputs_are_user_errors_before_training(slices: Path, tmp_path: Path) -> None:
    recipe = recipe_with([{**VAE, "steps": 1}])
    big = load_recipe("tiny", ["data.image_size=64", "train.stages=[{name='vae', steps=1}]"])
    with pytest.raises(UserError, match="image size 32 .*data.image_size is 64"):
        train(big, slices, tmp_path / "R1")
    assert not (tmp_path / "R1").exists()

    empty = tmp_path / "EMPTY"
    shutil.copytree(slices, empty)
    index = pd.read_parquet(empty / "index.parquet")
    index["split"] = "test"
    index.to_parquet(empty / "index.parquet")
    with pytest.raises(UserError, match="train split"):
        train(recipe, empty, tmp_path / "R2")

    stranger = tmp_path / "R3"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no UniBrain run"):
        train(recipe, slices, stranger)

    run = tmp_path / "RUN"
    train(recipe, slices, run)
    with pytest.raises(UserError, match="use --resume"):
        train(recipe, slices, run)
    other = dataclasses.replace(recipe, model=dataclasses.replace(
        recipe.model, vae=dataclasses.replace(recipe.model.vae, ch=8)))
    with pytest.raises(UserError, match=r"model\.vae\.ch: 16 -> 8"):
        train(other, slices, run, resume=True)


def test_interrupt_inside_a_step_saves_the_last_completed_step(slices: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from unibrain_cli.training.stages.vae import VAEStage

    calls = []
    original = VAEStage.loss

    def flaky(self: VAEStage, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        calls.append(1)
        if len(calls) == 6:  # second micro-batch of step 3
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(VAEStage, "loss", flaky)
    recipe = recipe_with([{**VAE, "grad_accum": 2}], "train.checkpoint_every=100")
    with pytest.raises(KeyboardInterrupt):
        train(recipe, slices, tmp_path / "RUN")
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "RUN" / "vae"))
    assert (ckpt.step, ckpt.position, ckpt.ema_updates) == (2, 4, 2)


def test_bf16_mixed_precision_runs_on_cpu(slices: Path, tmp_path: Path) -> None:
    recipe = recipe_with([{**VAE, "steps": 2}], "train.mixed_precision='bf16'")
    summary = train(recipe, slices, tmp_path / "RUN")
    assert summary.stages["vae"]["steps"] == 2
    weights = load_file(str(tmp_path / "RUN" / "vae" / "final" / "ae.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
