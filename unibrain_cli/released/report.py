"""``unibrain report --protocol released``: the released checkpoint's own written answer.

The released protocol has one understanding-only sequence (their ``--task diagnosis``): the
given images of the representative slice, then ``Based on the provided information, provide a
detailed impression of the observed structures and any potential issues, and tell me what is the
most likely clinical diagnosis?``, answered greedily (at most 512 steps). That answer is the
report's impression; the class named in it (their stems) is its diagnosis. The protocol asks
for no per-modality findings, so the report has none (our own protocol's ``report`` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unibrain_cli.errors import UserError
from unibrain_cli.inference.inputs import InputSpec
from unibrain_cli.modalities import DISPLAY_NAMES
from unibrain_cli.model.memory import MemoryOptions
from unibrain_cli.released.diagnose import load_case_and_bundle
from unibrain_cli.released.engine import ReleasedEngine, run_diagnosis
from unibrain_cli.released.folder import ReleasedBundle
from unibrain_cli.released.images import released_slices, slice_rgb
from unibrain_cli.released.protocol import DIAGNOSIS_MAX_LENGTH, classify_answer

FORMATS: tuple[str, ...] = ("text", "markdown", "json")


@dataclass
class ReleasedReport:
    """Result of :func:`report_released`."""

    impression: str
    diagnosis: str | None
    matched: list[str]
    given: list[str]
    slice_index: int
    seed: int
    protocol: str = "released"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def report_released(
    spec: InputSpec,
    ckpt: str | Path | None,
    base: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    bundle: ReleasedBundle | None = None,
    max_length: int = DIAGNOSIS_MAX_LENGTH,
    memory: MemoryOptions | None = None,
) -> ReleasedReport:
    """The released model's impression of the case (see the module docstring).

    ``seed`` draws the VAE posterior samples of the context images (the text itself is greedy).
    """
    case, order, u8, bundle = load_case_and_bundle(spec, ckpt, base, device, bundle, memory)
    k = released_slices(case, "lesion")[0]
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    answer, _ = run_diagnosis(engine, [slice_rgb(u8[m], k)[0] for m in order],
                              torch.Generator().manual_seed(int(seed)), max_length)
    prediction, matched = classify_answer(answer)
    return ReleasedReport(answer.strip(), prediction, matched, order, k, seed)


def format_released_report(result: ReleasedReport, fmt: str) -> str:
    """The report as ``text``, ``markdown`` or ``json``."""
    given = ", ".join(DISPLAY_NAMES[m] for m in result.given)
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2)
    if fmt == "markdown":
        return "\n".join(["# UniBrain report (released checkpoint)", "", f"Images: {given} (axial slice "
                          f"{result.slice_index})", "", "## Impression", "", result.impression, "",
                          "## Diagnosis", "", result.diagnosis or "no class named"])
    if fmt == "text":
        return "\n".join([f"IMAGES  {given} (axial slice {result.slice_index})", "", "IMPRESSION",
                          f"  {result.impression}", "", "DIAGNOSIS", f"  {result.diagnosis or 'no class named'}"])
    raise UserError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}", "--format")
