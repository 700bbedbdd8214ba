"""The ``sa`` stage: self-alignment of the generation expert (paper section 2.3).

A sample is ``self_alignment_plan(m)`` for a random present modality ``m`` of a random train
slice: the image's ViT dense embeddings, a reconstruction prompt (random phrasing), then the
noisy VAE latent of the SAME image, which carries the flow loss
``L_SA = E ||V(e_t, t, w, p_rec) - (eps - e)||^2`` (t from the training distribution,
``flow.train_timestep_shift``). Several samples are packed per micro-batch up to
``data.pack_tokens`` (every random choice drawn in ``next_batch`` from the stage generator).

Trainable: the generation expert (every ``*_moe_gen`` module of the decoder: q/k/v/o
projections, q/k norms, MLP, input/post-attention norms, final norm) plus ``vae2llm``,
``llm2vae`` and ``time_embedder``. The ViT, the connector, the understanding expert, the token
embedding and the LM head are frozen (the latent position table has no parameters). The
flow loss still back-propagates THROUGH the frozen understanding expert's keys/values of the
ViT and prompt tokens into the generation expert's queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from unibrain_cli.data.dataflow import SamplePlan, record_modalities, self_alignment_plan
from unibrain_cli.training.stages.unified import ModelStage

#: Top-level modules of the unified model trained by SA besides the generation expert.
SA_BRIDGES: tuple[str, ...] = ("vae2llm", "llm2vae", "time_embedder")


def generation_expert_modules(model: nn.Module, prefix: str = "") -> list[str]:
    """Dotted names (under ``prefix``) of every ``*_moe_gen`` submodule of ``model`` (outermost only)."""
    names: list[str] = []
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("_moe_gen") and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return [f"{prefix}{n}" for n in names]


def draw_sa_plan(records: Sequence[dict[str, Any]], modalities: Sequence[str],
                 rng: np.random.Generator) -> tuple[int, SamplePlan]:
    """(record index, self-alignment plan) of a random present modality of a random record."""
    i = int(rng.integers(len(records)))
    present = record_modalities(records[i], modalities)
    m = present[int(rng.integers(len(present)))]
    return i, self_alignment_plan(m, rng)


class SAStage(ModelStage):
    """See the module docstring."""

    name = "sa"
    find_unused_parameters = False  # every trainable weight is used by every SA pack

    def usable(self, record: dict[str, Any]) -> bool:
        return bool(record_modalities(record, self.ctx.recipe.data.modalities))

    def draw_plan(self, rng: np.random.Generator) -> tuple[int, SamplePlan]:
        return draw_sa_plan(self.dataset()[1], self.ctx.recipe.data.modalities, rng)

    def trainable_modules(self, model: nn.Module) -> Sequence[str]:
        inner = model.get_submodule("model")
        return (*generation_expert_modules(inner, "model."), *(f"model.{n}" for n in SA_BRIDGES))
