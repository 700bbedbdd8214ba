"""``unibrain diagnose``: closed-set diagnosis over the five classes, scored by the model.

On the case's representative slice (``--slices lesion`` of :mod:`inputs`):

- ``impute=True``: the interleaved context of ``impute`` — inputs as clean VAE + ViT, then the
  missing modalities of the chain T1 -> T2 -> FLAIR -> T1ce generated (instruction, thinking,
  image) — followed by the diagnosis question;
- ``impute=False``: understanding only — the given images as ViT tokens (the layout of the
  understanding-only training samples), then the question.

Each class c is scored by the summed log-likelihood of its answer
``"Final Diagnosis: <templates.diagnosis_phrase([c])>" + eos``; probabilities are the softmax
over the five sums.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unibrain_cli.errors import UserError
from unibrain_cli.inference.checkpoint import InferenceBundle, load_for_inference, resolve_checkpoint
from unibrain_cli.inference.engine import (
    UNDERSTANDING_VIEWS,
    Engine,
    diagnosis_scores,
    impute_chain,
    softmax_scores,
)
from unibrain_cli.inference.impute import CHAIN
from unibrain_cli.inference.inputs import (
    CaseVolumes,
    InputSpec,
    load_case,
    representative_rule,
    representative_slice,
)
from unibrain_cli.modalities import DISEASES
from unibrain_cli.model.memory import MemoryOptions


@dataclass
class Diagnosis:
    """Result of :func:`diagnose`."""

    prediction: str
    probabilities: dict[str, float]
    log_likelihoods: dict[str, float]
    given: list[str]
    imputed: list[str]
    slice_index: int
    slice_rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_for(bundle: InferenceBundle) -> Engine:
    """An engine with the bundle's sampler and text settings."""
    return Engine(bundle.model, bundle.vae, bundle.tokenizer, bundle.recipe.flow, bundle.image_size,
                  bundle.recipe.data.max_text_tokens)


def load_case_and_model(
    spec: InputSpec, ckpt: str | Path | None, device: str, bundle: InferenceBundle | None,
    memory: MemoryOptions | None = None,
) -> tuple[CaseVolumes, InferenceBundle]:
    """The preprocessed case and the model; bad input files fail before the (slow) model load,
    and modalities the model was not trained on are refused."""
    folder = resolve_checkpoint(ckpt) if bundle is None else None
    case = load_case(spec)
    if bundle is None:
        bundle = load_for_inference(folder, device, memory)
    known = bundle.recipe.data.modalities
    bad = [m for m in spec.files if m not in known]
    if bad:
        raise UserError(f"this model was not trained on '{bad[0]}' (it knows {', '.join(known)})", "--have")
    return case, bundle


def diagnose(
    spec: InputSpec,
    ckpt: str | Path | None,
    impute: bool = True,
    seed: int = 0,
    device: str = "cpu",
    bundle: InferenceBundle | None = None,
    thinking_tokens: int | None = None,
    steps: int | None = None,
    memory: MemoryOptions | None = None,
) -> Diagnosis:
    """Score the five classes for the case in ``spec`` (see the module docstring)."""
    case, bundle = load_case_and_model(spec, ckpt, device, bundle, memory)
    known = bundle.recipe.data.modalities
    images, brain, k = representative_slice(case, bundle.image_size)
    engine = engine_for(bundle)
    slice_inputs = {m: torch.from_numpy(v) for m, v in images.items()}
    targets: list[str] = []
    if impute:
        targets = [m for m in CHAIN if m not in images and m in known]
        think = bundle.recipe.data.max_text_tokens if thinking_tokens is None else thinking_tokens
        res = impute_chain(engine, slice_inputs, targets, seed, thinking_tokens=think,
                           brain=torch.from_numpy(brain.astype("float32")), steps=steps)
        ctx = res.contexts.cond
    else:
        ctx = engine.new_context()
        engine.add_images(ctx, engine.encode(torch.stack(list(slice_inputs.values())), list(slice_inputs)),
                          UNDERSTANDING_VIEWS)
    scores = diagnosis_scores(engine, ctx, DISEASES)
    probs = softmax_scores(scores)
    best = max(probs, key=lambda c: probs[c])
    return Diagnosis(best, probs, scores, list(images), targets, k, representative_rule(case))


def diagnosis_table(result: Diagnosis):  # -> rich.table.Table
    """A rich table: class, probability, log-likelihood; the prediction in bold."""
    from rich.table import Table

    table = Table(title=f"Diagnosis: {result.prediction}",
                  caption=f"on axial slice {result.slice_index} of the 1 mm grid: {result.slice_rule}")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column("log-likelihood", justify="right")
    for c in sorted(result.probabilities, key=lambda c: -result.probabilities[c]):
        style = "bold" if c == result.prediction else None
        table.add_row(c, f"{result.probabilities[c]:.3f}", f"{result.log_likelihoods[c]:.2f}", style=style)
    return table
