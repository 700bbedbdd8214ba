"""The ``und`` stage: the understanding side alone, between ``unified`` and ``dhs``.

The paper starts from BAGEL-7B-MoT, whose SigLIP ViT and understanding expert already read images
when UniBrain's stages begin. A from-scratch model learns to read the slices only from the
diagnosis answers of the ``unified`` stage, about five tumour answers per packed step between long
interleaved samples, and there it learns the cheap cues first: the modality set tells stroke (DWI)
and white-matter hyperintensities apart, while the three tumour classes stay at chance (fifteenth
session, README: a linear probe on the frozen ViT features separates them at 70 %).

A sample is :func:`dataflow.understanding_plan` of a random train slice (a random non-empty subset
of its modalities as ViT images, in random order, with visual dropout; the impression / diagnosis
question and its answer, NTP loss), packed up to ``data.pack_tokens``: about 70 tokens a sample,
so a pack holds some 25 answers. No image is generated, so a step costs about 60 % of a
``unified`` one. No findings question (``data.findings_prob`` is 0 here): with one, 30 % of the
answers follow a findings text that names the lesion, so they can be read off that text, and the
findings answers' ``"<MOD>: ..."`` form leaked into the thinking the model writes before each
generated image (sixteenth session, two seeds, README: closed-set Top-1 over Table 1's four
scenarios 49.7 % with findings questions, 59.3 % without them in ``und`` and ``dhs``, 57.3 % as
shipped in ``small``, whose ``dhs`` keeps them). What the demo model writes as thinking
before a generated image changes form: an impression and a diagnosis where the paper's planning
sentence and findings go (before the stage: one training case's findings, whatever the input).

Trainable: the ViT, the connector and the understanding expert (every decoder module that is not a
``*_moe_gen`` one: token embedding, attention projections and norms, MLP, layer norms, final norm,
LM head). The generation expert, its bridges (``vae2llm``, ``llm2vae``, ``time_embedder``), the
aligned path and the autoencoder are frozen and exported bit-identical. Generation still reads the
understanding expert's keys and values of the context's text and ViT tokens; ``dhs`` then trains
the whole model on its own rollouts (sixteenth session, README: T1 -> T2 PSNR unchanged to 0.02 dB).

With ``data.understanding_flip_prob`` > 0 a share of the samples is its slice's left-right mirror
(:func:`dataflow.mirror_plan`: every image flipped, "left" / "right" swapped in the text). Measured
at 0.5 in the seventeenth session (two seeds, README): UniBrain's closed-set Top-1 -0.7 and -5.3
points, so every shipped recipe keeps 0.

With ``data.understanding_rotate_deg`` / ``understanding_shift_px`` / ``understanding_scale`` > 0 every
sample is a random similarity transform of its slice (all of its images alike, text unchanged:
:func:`unibrain_cli.training.materialize.similarity_transform`). Without it the stage memorises the
165 training cases: closed-set Top-1 on complete data 88-93 % on training cases against 62-66 % on
the test cases (twenty-third session, README); small rotations, shifts and zooms leave every answer
true (no laterality flips, sizes within the zoom) and move the lesions the answers depend on.
``small`` uses 8 degrees, 2 px, 5 % (two seeds, all 300 test slices: complete data 61.0 -> 68.0 and
55.7 -> 68.0 %); 15 degrees, 4 px, 10 % gained as much on complete data but lost T1-only answers.

With ``data.understanding_all_prob`` > 0 that share of the samples shows every modality its slice
has instead of a random-size subset (:func:`dataflow.understanding_plan`), so a fused view
(``model.fused_view``) before the question is full more often. ``small`` uses 0.25 (twenty-sixth
session, seeds 0 / 1 / 2, README: complete-data closed-set Top-1 on the demo's slices 78.0 -> 84.0,
80.0 -> 82.0, 70.0 -> 76.0 %, T1-only 67.5 -> 67.5, 60.0 -> 65.0, 55.0 -> 60.0 %); 0.5 gained as
much on complete data but lost T1-only answers on one seed.

After ``unified``, not before ``sa``: 150 understanding-only steps placed first were lost in the
400 unified steps after them (fifteenth session, README).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from unibrain_cli.config.components import DataConfig
from unibrain_cli.data.dataflow import (
    SamplePlan,
    mirror_plan,
    record_diseases,
    record_impression,
    record_modalities,
    understanding_plan,
)
from unibrain_cli.training.stages.unified import ModelStage

#: Top-level modules of the unified model the ``und`` stage trains besides the decoder's
#: understanding expert (and ``fused_view`` when the model has one).
UND_MODULES: tuple[str, ...] = ("vit_model", "connector")


def understanding_expert_modules(model: nn.Module, prefix: str = "") -> list[str]:
    """Dotted names (under ``prefix``) of the decoder's modules that hold parameters directly and
    are not part of the generation expert (no ``*_moe_gen`` in their path): the token embedding,
    attention projections and norms, MLPs, layer norms, final norm and LM head."""
    names = []
    for name, module in model.language_model.named_modules():
        if any(part.endswith("_moe_gen") for part in name.split(".")):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            names.append(f"{prefix}language_model.{name}" if name else f"{prefix}language_model")
    return names


class UndStage(ModelStage):
    """See the module docstring."""

    name = "und"

    def usable(self, record: dict[str, Any]) -> bool:
        return bool(record_modalities(record, self.ctx.recipe.data.modalities)) and (
            bool(record_impression(record)) or bool(record_diseases(record)))

    def plan_config(self) -> DataConfig:
        """The recipe's data flow without findings questions (``findings_prob = 0``): an answer that
        follows a findings answer of the same sample can be read off that text instead of the images
        (see the module docstring)."""
        return dataclasses.replace(self.ctx.recipe.data, findings_prob=0.0)

    def draw_plan(self, rng: np.random.Generator) -> tuple[int, SamplePlan]:
        _, records = self.dataset()
        i = int(rng.integers(len(records)))
        cfg = self.plan_config()
        plan = understanding_plan(records[i], rng, cfg, cfg.understanding_all_prob)
        if cfg.understanding_flip_prob > 0 and rng.random() < cfg.understanding_flip_prob:
            plan = mirror_plan(plan)
        if cfg.understanding_rotate_deg or cfg.understanding_shift_px or cfg.understanding_scale:
            angle = float(rng.uniform(-cfg.understanding_rotate_deg, cfg.understanding_rotate_deg))
            dy, dx = (float(v) for v in rng.uniform(-cfg.understanding_shift_px, cfg.understanding_shift_px, 2))
            log_s = np.log1p(cfg.understanding_scale)
            plan = dataclasses.replace(plan, meta={**plan.meta, "affine": (
                angle, dy, dx, float(np.exp(rng.uniform(-log_s, log_s))))})
        return i, plan

    def trainable_modules(self, model: nn.Module) -> Sequence[str]:
        inner = model.get_submodule("model")
        fused = ("model.fused_view",) if getattr(inner, "fused_view", None) is not None else ()
        return (*understanding_expert_modules(inner, "model."), *(f"model.{n}" for n in UND_MODULES), *fused)
