"""``unibrain report``: generated per-modality findings and an impression, as text, markdown or JSON.

On the case's representative slice, the given images enter as clean VAE + ViT (the layout of
the interleaved training samples). Then, each from that same image context (a fork of the
cache, so findings do not condition each other):

- findings of modality m: the prompt :func:`findings_prompt` (``"Describe the T2 image."``),
  then the answer generated greedily after the forced prefix ``"T2:"`` — the format in which
  findings appear in the training thinking text (``templates.findings_text``);
- the impression: ``templates.impression_question()``, then ``"Impression: ..."`` generated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from unibrain_cli.data import templates
from unibrain_cli.errors import UserError
from unibrain_cli.inference.checkpoint import InferenceBundle
from unibrain_cli.inference.diagnose import engine_for, load_case_and_model
from unibrain_cli.inference.engine import ANSWER_PREFIX, Context, Engine
from unibrain_cli.inference.inputs import InputSpec, representative_rule, representative_slice
from unibrain_cli.modalities import DISPLAY_NAMES
from unibrain_cli.model.memory import MemoryOptions

ReportFormat = Literal["text", "markdown", "json"]
FORMATS: tuple[str, ...] = ("text", "markdown", "json")


def findings_prompt(modality: str) -> str:
    """The question asking for one modality's findings, e.g. ``"Describe the T2 image."``."""
    return templates.findings_question(modality)


@dataclass
class Report:
    """Result of :func:`report`: modality -> findings, and the impression."""

    findings: dict[str, str]
    impression: str
    slice_index: int
    seed: int
    slice_rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_findings(engine: Engine, ctx: Context, modality: str, max_tokens: int) -> str:
    """Findings of ``modality`` after ``ctx`` (a fork is used; ``ctx`` is unchanged)."""
    q = ctx.fork()
    engine.ask(q, findings_prompt(modality))
    tok = engine.tokenizer
    label = f"{DISPLAY_NAMES[modality]}:"
    new = engine.generate(q, [tok.bos_id, *tok.encode(label)], max_tokens)
    return engine.decode_text([i for i in new if i != tok.eos_id])


def generate_impression(engine: Engine, ctx: Context, max_tokens: int) -> str:
    """The impression after ``ctx`` + the impression question (a fork is used)."""
    q = ctx.fork()
    engine.ask(q, templates.impression_question())
    tok = engine.tokenizer
    new = engine.generate(q, [tok.bos_id, *tok.encode(ANSWER_PREFIX)], max_tokens)
    text = ANSWER_PREFIX + tok.decode([i for i in new if i != tok.eos_id])
    return templates.parse_answer(text).impression or ""


def report(
    spec: InputSpec,
    ckpt: str | Path | None,
    seed: int = 0,
    device: str = "cpu",
    bundle: InferenceBundle | None = None,
    max_tokens: int | None = None,
    memory: MemoryOptions | None = None,
) -> Report:
    """Findings per given modality and the impression (see the module docstring).

    Text is decoded greedily, so ``seed`` changes nothing; it is recorded with the report.
    """
    case, bundle = load_case_and_model(spec, ckpt, device, bundle, memory)
    images, _, k = representative_slice(case, bundle.image_size)
    engine = engine_for(bundle)
    ctx = engine.new_context()
    engine.add_images(ctx, engine.encode(torch.stack([torch.from_numpy(v) for v in images.values()]), list(images)))
    limit = bundle.recipe.data.max_text_tokens if max_tokens is None else max_tokens
    findings = {m: generate_findings(engine, ctx, m, limit) for m in images}
    return Report(findings, generate_impression(engine, ctx, limit), k, seed, representative_rule(case))


def format_report(result: Report, fmt: str) -> str:
    """The report as ``text``, ``markdown`` or ``json``."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2)
    if fmt == "markdown":
        lines = ["# UniBrain report", "", "## Findings", ""]
        lines += [f"- **{DISPLAY_NAMES[m]}**: {t}" for m, t in result.findings.items()]
        lines += ["", "## Impression", "", result.impression, "",
                  f"*Slice: axial {result.slice_index} of the 1 mm grid, {result.slice_rule}.*"]
        return "\n".join(lines)
    if fmt == "text":
        lines = ["FINDINGS"]
        lines += [f"  {DISPLAY_NAMES[m]}: {t}" for m, t in result.findings.items()]
        lines += ["", "IMPRESSION", f"  {result.impression}", "",
                  f"SLICE  axial {result.slice_index} of the 1 mm grid, {result.slice_rule}"]
        return "\n".join(lines)
    raise UserError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}", "--format")
