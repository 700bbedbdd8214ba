"""Training stages as plug-ins of the generic trainer.

A stage is a :class:`StageTask` subclass registered in :data:`STAGES` by import path. The trainer
(:func:`unibrain_cli.training.trainer.run_stage`) owns everything generic — Accelerate, AdamW,
warm-up + cosine LR, gradient accumulation and clipping, EMA, checkpoints, resume, logging,
progress, Ctrl-C — and asks the stage only for what is specific to it.

How to write a stage (``sa``, ``unified``, ``dhs``)
---------------------------------------------------
1. Create ``unibrain_cli/training/stages/<name>.py`` with ``class XStage(StageTask)``, set
   ``name = "<name>"`` and ``unit`` ("tokens" or "images": the throughput unit).
2. Implement the hooks (all receive/return plain objects; the trainer does device placement,
   autocast, backward and the optimizer):

   - ``check()`` — cheap validation of data / config / predecessor outputs before ANY stage
     trains; raise :class:`UserError`. Called on every rank, predecessors' exports may not exist
     yet (they are produced by earlier stages of the same run): only check paths of stages that
     are not part of this run, i.e. where ``name in ctx.inputs`` and ``ctx.inputs[name]`` exists.
   - ``build_model() -> nn.Module`` — the module to train, on CPU, initialised from
     ``ctx.inputs`` (exports of earlier stages, e.g. ``ctx.inputs["vae"] / "ae.safetensors"``) or
     from scratch. Its ``forward`` must do all the compute that needs gradients (DDP/FSDP only
     sync gradients of computation that went through the wrapper's ``forward``), so wrap the
     pure model in a small loss module when needed (see ``vae.VAETrainModule``).
   - ``trainable_modules(model) -> Sequence[str]`` — dotted submodule names that are trained
     (``""`` = all). Everything else gets ``requires_grad=False``, is excluded from the optimizer
     and the EMA, and is put in ``eval()`` mode.
   - ``next_batch(position, generator) -> dict`` — micro-batch number ``position`` (0, 1, 2, ...
     counted per rank; all ranks share the same position) of THIS rank, as a dict of CPU tensors
     (other values pass through). It must be a deterministic function of ``position`` and the
     generator state, and ALL randomness of a step (sampling, noise, timesteps, dropout masks)
     must be drawn here from ``generator`` (a per-rank ``torch.Generator`` seeded from
     ``train.seed``, the stage index and the rank, saved in checkpoints). This is what makes
     ``--resume`` exact. :class:`EpochSampler` gives rank-disjoint, epoch-shuffled indices.
   - ``loss_counts(batch) -> dict[str, int]`` (optional) — the number of target tokens of each
     loss term in the (CPU) micro-batch, e.g. ``{"ntp": 37, "flow": 256, "sa": 64}``. The
     trainer sums them over the step's ``grad_accum`` micro-batches and over all ranks (so every
     rank must return the same keys, zeros included) to normalise each term by its GLOBAL token
     count (BAGEL). The default ``{}`` keeps each micro-batch's own normalisation (``vae``).
   - ``loss(model, batch, norm=None) -> StepOutput`` — call ``model(...)`` (the WRAPPED model,
     never its submodules) and return the scalar loss to back-propagate, float terms for logging,
     and the number of tokens (or images) processed. It runs under ``accelerator.autocast()``.
     ``norm`` is None when ``loss_counts`` returned ``{}`` (the trainer then calls
     ``loss(model, batch)``); otherwise ``norm[k] = global_count[k] / (grad_accum * world_size)``
     and term ``k`` must be the SUM of its per-token losses in this micro-batch divided by
     ``norm[k]`` (0 when the count is 0). Accelerate's division by ``grad_accum`` and the DDP
     average then leave the gradient of ``sum over the step / global count``; with one
     micro-batch and one process ``norm[k]`` is the micro-batch's own count (its mean).
   - ``evaluate(model) -> dict[str, float]`` (optional) — end-of-stage metrics on the plain
     module holding the EMA weights (main process only); logged to metrics.jsonl and run.json.
   - ``export(model, out_dir)`` — write the stage's deliverable (plain module, EMA weights, main
     process only) into ``out_dir`` (a temp folder renamed to ``RUN/<name>/final``). The next
     stage finds it in ``ctx.inputs[<name>]``. Unified-model stages write a ``save_pretrained``
     folder there.
3. Register it: ``STAGES["<name>"] = "unibrain_cli.training.stages.<name>:XStage"``.

A stage listed in a recipe whose entry is None raises a UserError naming it before any training.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from unibrain_cli.config.components import Recipe, StageConfig
from unibrain_cli.errors import UserError

#: Stage name -> "module:Class" of its StageTask, or None while not available in this version.
STAGES: dict[str, str | None] = {
    "vae": "unibrain_cli.training.stages.vae:VAEStage",
    "sa": "unibrain_cli.training.stages.sa:SAStage",
    "draft": "unibrain_cli.training.stages.draft:DraftStage",
    "unified": "unibrain_cli.training.stages.unified:UnifiedStage",
    "und": "unibrain_cli.training.stages.und:UndStage",
    "dhs": "unibrain_cli.training.stages.dhs:DHSStage",
}


@dataclass(frozen=True)
class StageContext:
    """What a stage knows about its run. ``inputs`` maps each EARLIER stage of the recipe to its
    export folder ``RUN/<name>/final`` (present once that stage has finished)."""

    recipe: Recipe
    stage: StageConfig
    index: int  # position of this stage in recipe.train.stages
    data_dir: Path  # the SLICES folder
    run_dir: Path  # RUN
    inputs: Mapping[str, Path] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def stage_dir(self) -> Path:
        """RUN/<stage>: checkpoints and the final export."""
        return self.run_dir / self.stage.name

    @property
    def previous(self) -> Path | None:
        """Export folder of the stage just before this one in the recipe, if any."""
        return list(self.inputs.values())[-1] if self.inputs else None


@dataclass
class StepOutput:
    """Result of one micro-batch: ``loss`` (scalar tensor to back-propagate, already normalised,
    by ``norm`` when given), ``terms`` (named float values for logs, e.g. {"recon": .., "kl": ..},
    normalised like ``loss``: the trainer averages them over micro-batches and ranks) and
    ``n_tokens`` (tokens or images processed, for throughput)."""

    loss: Tensor
    terms: dict[str, float]
    n_tokens: int


class StageTask(ABC):
    """One training stage plugged into the generic trainer (see the module docstring)."""

    name: ClassVar[str]
    unit: ClassVar[str] = "tokens"  # throughput unit shown in logs: "tokens" or "images"
    find_unused_parameters: ClassVar[bool] = False  # DDP: set when forward may skip trainable weights

    def __init__(self, ctx: StageContext) -> None:
        """Cheap: store the context; open data lazily (``check`` runs before training)."""
        self.ctx = ctx

    def check(self) -> None:
        """Raise UserError for inputs the user can fix (default: nothing to check)."""
        return None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The module to train (CPU), initialised from ``ctx.inputs`` or from scratch."""

    def trainable_modules(self, model: nn.Module) -> Sequence[str]:
        """Dotted names of the submodules to train; ``""`` is the whole module."""
        return ("",)

    @abstractmethod
    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        """Micro-batch ``position`` of this rank (CPU tensors); all randomness from ``generator``."""

    def loss_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """Target tokens per loss term of a CPU micro-batch (default ``{}``: per-micro-batch
        normalisation); see the module docstring."""
        return {}

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any], norm: Mapping[str, float] | None = None) -> StepOutput:
        """Forward through the wrapped ``model``; see :class:`StepOutput`. ``norm``: per-term
        divisors of the summed token losses (see the module docstring); None = per-micro-batch means."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """End-of-stage metrics of the plain EMA module (main process only)."""
        return {}

    @abstractmethod
    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write the stage's output (EMA weights) into ``out_dir`` (main process only)."""


def get_stage(name: str) -> type[StageTask]:
    """The StageTask class registered for ``name``; UserError when unknown or not available."""
    if name not in STAGES:
        raise UserError(f"unknown training stage '{name}'; known stages: {', '.join(STAGES)}", "train.stages")
    target = STAGES[name]
    if target is None:
        available = [n for n, t in STAGES.items() if t is not None]
        raise UserError(
            f"training stage '{name}' is listed in the recipe but not available in this version "
            f"(available: {', '.join(available)}); remove it from train.stages or run --stage "
            f"{available[0] if available else 'NAME'}", "train.stages")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, StageTask)):
        raise TypeError(f"{target} is not a StageTask")
    return cls


def stage_generator(seed: int, stage_index: int, rank: int) -> torch.Generator:
    """The per-rank CPU generator of a stage, seeded from (train.seed, stage index, rank)."""
    mixed = np.random.SeedSequence([int(seed), int(stage_index), int(rank)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))


class EpochSampler:
    """Deterministic item indices for micro-batches: epoch-wise shuffles, disjoint across ranks.

    Conceptually all ranks read one global stream: epoch ``e`` is a permutation of ``range(n)``
    seeded by (seed, e); global micro-batch ``position`` covers stream items
    ``[position * B * W, (position + 1) * B * W)`` and rank ``r`` takes its ``r``-th block of ``B``.
    So ``indices(position)`` depends only on its arguments (no state to save) and the union over
    ranks equals a single-process run with batch ``B * W``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, position: int) -> list[int]:
        """Dataset indices of micro-batch ``position`` of this rank (``batch_size`` items)."""
        start = (position * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(i // self.n)[i % self.n]) for i in range(start, start + self.batch_size)]
