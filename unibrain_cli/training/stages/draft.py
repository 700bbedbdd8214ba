"""The ``draft`` stage: the aligned path's draft network trained alone, before ``unified``.

The draft (``model.aligned_draft``, :class:`~unibrain_cli.model.aligned.AlignedDraft`) regresses a
target's clean latent tokens from the same-position latents of a sample's earlier images; the
``unified`` stage trains it on its own latent MSE beside the transformer, ``data.draft_pairs``
pairs per step. Its estimate improves with optimizer steps far longer than the transformer's
stage lasts (twelfth and thirteenth sessions, README), and a draft step costs a small fraction of a
packed transformer step, so this stage gives it those steps first: per step ``batch_size`` pairs
(:meth:`ModelStage.draw_draft_pairs`: random train slices, :func:`dataflow.draft_pair`, mirrored
with ``data.draft_flip_prob``) from the latent bank of the train slices (encoded once by the frozen
autoencoder), loss = their latent MSE (the ``unified`` stage's ``draft`` term). Only the draft's
weights train (at its ``lr_scale`` times the stage's learning rate, like in ``unified``); every
other weight of the model is exported as it came in (from ``sa``, or initialised), so ``unified``
starts from the same transformer as without this stage.

Export: a ``save_pretrained`` folder like the other model stages; ``unified`` starts from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from unibrain_cli.errors import UserError
from unibrain_cli.training.stages import StepOutput
from unibrain_cli.training.stages.unified import UnifiedStage

#: The one module the stage trains.
DRAFT_MODULE = "model.aligned_context.draft"


class DraftStage(UnifiedStage):
    """See the module docstring (``unified``'s model, latent bank and pairs; only the batches and the
    loss differ)."""

    name = "draft"
    unit = "images"
    find_unused_parameters = False  # every draft weight is used by every step

    def check(self) -> None:
        recipe = self.ctx.recipe
        if recipe.model.aligned_context == "off" or recipe.model.aligned_draft <= 0:
            raise UserError("the draft stage trains the aligned path's draft network: set model.aligned_context "
                            "and model.aligned_draft > 0, or remove the stage from train.stages", "model.aligned_draft")
        if self.ctx.stage.batch_size < 1:
            raise UserError("the draft stage needs at least one pair per step", f"train.stages[{self.ctx.index}].batch_size")
        super().check()

    def trainable_modules(self, model: nn.Module) -> Sequence[str]:
        return (DRAFT_MODULE,)

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        return {"draft": self.draw_draft_pairs(self.numpy_rng(generator), self.ctx.stage.batch_size)}

    def loss_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        return {"draft": batch["draft"].count()}

    def loss(self, model: nn.Module, batch: dict[str, Any], norm: Mapping[str, float] | None = None) -> StepOutput:
        out = model(None, norm=norm, draft=batch["draft"])
        return StepOutput(out["loss"], {"draft": float(out["draft"])}, int(batch["draft"].target.shape[0]))
