"""``unibrain diagnose --protocol released``: the released checkpoint's own diagnosis.

On the representative slice (their middle lesion slice when a lesion mask is known):

- ``impute=True`` and a modality of T1 -> T2 -> FLAIR -> T1ce missing: the unified chain
  (:func:`~unibrain_cli.released.engine.run_unified`) imputes the missing ones, then answers the
  impression instruction and the closed question (``... Answer with Glioblastoma, Meningioma, or
  Metastatic tumor.``); the answer is that last greedy text;
- otherwise understanding only (:func:`~unibrain_cli.released.engine.run_diagnosis`): the images
  and the one diagnosis question, greedy answer of at most 512 steps.

The class is read from the answer by their stems (``Gli``, ``Mening``, ``Meta``, ``Infarct``,
``Degeneration``, case-insensitive substrings; the first occurring wins). The model is not
scored class by class here: the released protocol generates text, it does not rank classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unibrain_cli.inference.impute import CHAIN
from unibrain_cli.inference.inputs import CaseVolumes, InputSpec
from unibrain_cli.model.memory import MemoryOptions
from unibrain_cli.released.engine import ReleasedEngine, run_diagnosis, run_unified
from unibrain_cli.released.folder import ReleasedBundle, resolve_released
from unibrain_cli.released.images import released_slices, slice_rgb
from unibrain_cli.released.impute import load_bundle, load_uint8_case
from unibrain_cli.released.protocol import DIAGNOSIS_MAX_LENGTH, THINK_MAX_LENGTH, classify_answer


@dataclass
class ReleasedDiagnosis:
    """Result of :func:`diagnose_released`."""

    prediction: str | None
    answer: str
    matched: list[str]
    task: str
    given: list[str]
    imputed: list[str]
    slice_index: int
    impression: str | None = None
    thinking: dict[str, str] = field(default_factory=dict)
    protocol: str = "released"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_case_and_bundle(spec: InputSpec, ckpt: str | Path | None, base: str | Path | None, device: str,
                         bundle: ReleasedBundle | None, memory: MemoryOptions | None = None,
                         ) -> tuple[CaseVolumes, list[str], dict, ReleasedBundle]:
    """(case, inputs in sequence order, uint8 volumes, bundle): the folder is checked first, then
    the inputs are read (before the slow model load)."""
    files = resolve_released(ckpt, base) if bundle is None else bundle.files
    case, order, u8 = load_uint8_case(spec)
    return case, order, u8, bundle if bundle is not None else load_bundle(files, device, memory)


def diagnose_released(
    spec: InputSpec,
    ckpt: str | Path | None,
    base: str | Path | None = None,
    impute: bool = True,
    seed: int = 0,
    device: str = "cpu",
    steps: int | None = None,
    bundle: ReleasedBundle | None = None,
    think_max_length: int = THINK_MAX_LENGTH,
    answer_max_length: int = DIAGNOSIS_MAX_LENGTH,
    memory: MemoryOptions | None = None,
) -> ReleasedDiagnosis:
    """Diagnose the case in ``spec`` with the released protocol (see the module docstring)."""
    case, order, u8, bundle = load_case_and_bundle(spec, ckpt, base, device, bundle, memory)
    k = released_slices(case, "lesion")[0]
    rgbs = [slice_rgb(u8[m], k)[0] for m in order]
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    generator = torch.Generator().manual_seed(int(seed))
    targets = [m for m in CHAIN if m not in order] if impute else []
    if targets:
        chain = run_unified(engine, rgbs, targets, generator, think_max_length=think_max_length, steps=steps)
        answer, task, impression, thinking = chain.label or "", "unified", chain.impression, chain.thinking
    else:
        answer, _ = run_diagnosis(engine, rgbs, generator, answer_max_length)
        task, impression, thinking = "diagnosis", None, {}
    prediction, matched = classify_answer(answer)
    return ReleasedDiagnosis(prediction, answer, matched, task, order, targets, k, impression, dict(thinking))


def released_diagnosis_table(result: ReleasedDiagnosis):  # -> rich.table.Table
    """A rich table: the predicted class, the stems found, the task and the generated answer."""
    from rich.table import Table

    table = Table(title=f"Diagnosis (released protocol): {result.prediction or 'no class named'}")
    table.add_column("field")
    table.add_column("value")
    table.add_row("prediction", result.prediction or "-", style="bold")
    table.add_row("classes named", ", ".join(result.matched) or "-")
    table.add_row("task", result.task + (f" (imputed {', '.join(result.imputed)})" if result.imputed else ""))
    if result.impression is not None:
        table.add_row("impression", result.impression)
    table.add_row("answer", result.answer)
    return table
