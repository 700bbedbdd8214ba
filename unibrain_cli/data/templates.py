"""Phrasings of the interleaved data flow: instructions, thinking, questions, answers, prompts.

Pure text, no model and no tensors. Every phrasing family is a tuple of ``str.format``
templates; a sampler takes an optional ``numpy.random.Generator`` and returns the FIRST
phrasing when it is ``None`` — those deterministic variants are the inference/evaluation
protocol (:func:`instruction_for`, :func:`planning_sentence`, :func:`impression_question`,
:func:`diagnosis_question`, :func:`both_question`, :func:`reconstruction_prompt`).

Modality names come from :data:`unibrain_cli.modalities.DISPLAY_NAMES`. Placeholders:

- ``{inputs}``: the known modalities with their noun, e.g. ``"T1 and FLAIR images"``;
- ``{target}``: the target with its noun, e.g. ``"T2-weighted MRI"``;
- ``{image}``: one modality with its noun, e.g. ``"FLAIR image"`` (reconstruction prompts).

Answers use one parseable format (:func:`format_answer` / :func:`parse_answer`)::

    Impression: <text>
    Final Diagnosis: <phrase>
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from unibrain_cli.modalities import DISEASES, DISPLAY_NAMES, MODALITIES

AnswerTask = Literal["impression", "diagnosis", "both"]

#: Noun phrase of a modality used as a generation target ("... into the corresponding <target>").
TARGET_NOUNS: dict[str, str] = {
    "t1": f"{DISPLAY_NAMES['t1']}-weighted MRI",
    "t2": f"{DISPLAY_NAMES['t2']}-weighted MRI",
    "flair": f"{DISPLAY_NAMES['flair']} MRI",
    "t1ce": f"contrast-enhanced {DISPLAY_NAMES['t1ce']} MRI",
    "dwi": f"diffusion-weighted {DISPLAY_NAMES['dwi']} MRI",
    "adc": f"{DISPLAY_NAMES['adc']} map",
}

#: Diagnosis phrase per class name (:data:`unibrain_cli.modalities.DISEASES`).
DIAGNOSIS_PHRASES: dict[str, str] = {
    "glioma": "glioma",
    "meningioma": "meningioma",
    "metastasis": "metastasis",
    "stroke": "stroke",
    "wmh": "white matter hyperintensities",
}

#: Phrase used when a record lists no disease.
NO_DISEASE_PHRASE = "no abnormality"

INSTRUCTION_TEMPLATES: tuple[str, ...] = (
    "Translate the given {inputs} into the corresponding {target}.",
    "Given the {inputs} above, generate the matching {target}.",
    "Synthesize the {target} that corresponds to the provided {inputs}.",
    "Using the {inputs} shown, produce the {target} of the same slice.",
    "Convert the available {inputs} into the corresponding {target}.",
    "Create the missing {target} from the given {inputs}.",
    "Impute the {target} for this slice based on the {inputs}.",
    "From the provided {inputs}, render the equivalent {target}.",
    "Please generate the {target} consistent with the given {inputs}.",
    "Map the supplied {inputs} to the corresponding {target}.",
)

PLANNING_TEMPLATES: tuple[str, ...] = (
    "I need to translate the given {inputs} into the corresponding {target}.",
    "My task is to generate the {target} that matches the given {inputs}.",
    "I will synthesize the corresponding {target} from the provided {inputs}.",
    "The goal is to convert the {inputs} into the matching {target}.",
    "I should produce the {target} of this slice using the {inputs}.",
    "To complete the study, I will create the {target} from the available {inputs}.",
    "Next, I need to impute the missing {target} based on the {inputs}.",
    "I am going to map the supplied {inputs} to the corresponding {target}.",
    "Using the {inputs}, I will generate the equivalent {target}.",
    "I have to render the {target} consistent with the given {inputs}.",
)

IMPRESSION_QUESTIONS: tuple[str, ...] = (
    "Based on the images above, what is your impression?",
    "Summarize the key findings of these MRI images as an impression.",
    "Review the provided scans and write the radiological impression.",
    "What is the overall impression of this brain MRI?",
    "Describe the main abnormalities seen in these images and give your impression.",
    "Write the impression section of the report for these MRI slices.",
    "Interpret the given brain MR images and state the impression.",
    "Considering all sequences shown, provide a concise radiological impression.",
    "Examine the images and summarize the significant observations.",
    "Please give the impression for this brain MRI study.",
)

DIAGNOSIS_QUESTIONS: tuple[str, ...] = (
    "Based on the images above, what is the final diagnosis?",
    "What is the most likely diagnosis for this brain MRI?",
    "Identify the disease shown in these MR images.",
    "Which condition do these brain MRI findings indicate?",
    "State the final diagnosis suggested by the provided scans.",
    "Classify the abnormality seen in these images.",
    "Considering all sequences shown, what disease does the patient have?",
    "Give the diagnosis that best explains these MRI findings.",
    "What pathology is demonstrated in this brain MRI?",
    "Please provide the final diagnosis for this study.",
)

BOTH_QUESTIONS: tuple[str, ...] = (
    "Based on the images above, what is your impression and the final diagnosis?",
    "Write the impression for this brain MRI and state the final diagnosis.",
    "Summarize the key findings as an impression, then give the most likely diagnosis.",
    "Review the provided scans: give the radiological impression and the diagnosis.",
    "What is the overall impression of this study, and what disease does it indicate?",
    "Interpret the given MR images, then provide the impression and final diagnosis.",
    "Considering all sequences shown, report the impression and the final diagnosis.",
    "Describe the main abnormalities as an impression and classify the disease.",
    "Please give the impression and the final diagnosis for this brain MRI.",
    "Provide an impression of these images followed by the final diagnosis.",
)

RECONSTRUCTION_PROMPTS: tuple[str, ...] = (
    "Reconstruct the {image} shown above.",
    "Generate the same {image} again.",
    "Reproduce this {image} in full detail.",
    "Recreate the given {image} exactly.",
    "Redraw the {image} above, preserving all anatomy.",
    "Rebuild this {image} from its visual features.",
    "Render an identical copy of the {image}.",
    "Restore the {image} shown, pixel by pixel.",
    "Produce a faithful reconstruction of this {image}.",
    "Synthesize the {image} above once more.",
)

FINDINGS_QUESTIONS: tuple[str, ...] = (
    "Describe the {mod} image.",
    "What are the findings on the {mod} image?",
    "Report the findings of the {mod} sequence.",
    "Describe what the {mod} scan shows.",
    "What does the {mod} image show?",
    "Please describe the {mod} findings.",
    "Summarise the {mod} appearance of this case.",
    "Give the findings for the {mod} image.",
)

QUESTIONS: dict[str, tuple[str, ...]] = {
    "impression": IMPRESSION_QUESTIONS,
    "diagnosis": DIAGNOSIS_QUESTIONS,
    "both": BOTH_QUESTIONS,
}


def _choose(templates: Sequence[str], rng: np.random.Generator | None) -> str:
    """The first template when ``rng`` is None, else one drawn uniformly."""
    return templates[0] if rng is None else templates[int(rng.integers(len(templates)))]


def join_names(names: Sequence[str]) -> str:
    """English list: ``["A"] -> "A"``, ``["A", "B"] -> "A and B"``, ``["A", "B", "C"] -> "A, B and C"``."""
    names = list(names)
    if not names:
        raise ValueError("join_names needs at least one name")
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown canonical modality '{modality}'; expected one of {MODALITIES}")
    return modality


def inputs_phrase(inputs: Sequence[str]) -> str:
    """Known modalities with their noun: ``("t1", "flair") -> "T1 and FLAIR images"``."""
    names = [DISPLAY_NAMES[_check_modality(m)] for m in inputs]
    return join_names(names) + (" image" if len(names) == 1 else " images")


def target_phrase(target: str) -> str:
    """Target modality with its noun: ``"t2" -> "T2-weighted MRI"``."""
    return TARGET_NOUNS[_check_modality(target)]


def instruction_text(inputs: Sequence[str], target: str, rng: np.random.Generator | None = None) -> str:
    """Generation instruction for ``target`` given the known ``inputs`` (canonical names)."""
    return _choose(INSTRUCTION_TEMPLATES, rng).format(inputs=inputs_phrase(inputs), target=target_phrase(target))


def planning_text(inputs: Sequence[str], target: str, rng: np.random.Generator | None = None) -> str:
    """Planning sentence that opens a thinking segment (the paper's "enriched description")."""
    return _choose(PLANNING_TEMPLATES, rng).format(inputs=inputs_phrase(inputs), target=target_phrase(target))


def question_text(task: AnswerTask, rng: np.random.Generator | None = None) -> str:
    """Tail question for an understanding task: ``"impression"``, ``"diagnosis"`` or ``"both"``."""
    if task not in QUESTIONS:
        raise ValueError(f"no question for task '{task}'; expected one of {tuple(QUESTIONS)}")
    return _choose(QUESTIONS[task], rng)


def reconstruction_text(modality: str, rng: np.random.Generator | None = None) -> str:
    """Self-alignment reconstruction prompt for one modality."""
    image = f"{DISPLAY_NAMES[_check_modality(modality)]} image"
    return _choose(RECONSTRUCTION_PROMPTS, rng).format(image=image)


def findings_text(findings: Mapping[str, str], known: Sequence[str]) -> str:
    """Findings of the ``known`` modalities, in that order, as ``"T1: <finding> FLAIR: <finding>"``.

    Modalities without a (non-empty) finding are skipped; returns ``""`` when none has one.
    """
    parts = []
    for m in known:
        text = " ".join(str(findings.get(m, "")).split())
        if text:
            parts.append(f"{DISPLAY_NAMES[_check_modality(m)]}: {text}")
    return " ".join(parts)


def thinking_text(
    inputs: Sequence[str],
    target: str,
    findings: Mapping[str, str],
    rng: np.random.Generator | None = None,
) -> str:
    """Thinking before generating ``target``: planning sentence + findings of the known ``inputs``."""
    plan = planning_text(inputs, target, rng)
    known = findings_text(findings, inputs)
    return f"{plan} {known}" if known else plan


def diagnosis_phrase(diseases: Sequence[str]) -> str:
    """Diagnosis text for class names: ``("glioma", "wmh") -> "glioma and white matter hyperintensities"``.

    Known classes (:data:`unibrain_cli.modalities.DISEASES`) use :data:`DIAGNOSIS_PHRASES`;
    any other name is kept as given (whitespace-normalised). Duplicates are removed, order kept.
    An empty list gives :data:`NO_DISEASE_PHRASE`.
    """
    phrases: list[str] = []
    for d in diseases:
        key = d.strip().lower()
        phrase = DIAGNOSIS_PHRASES[key] if key in DISEASES else " ".join(d.split())
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    return join_names(phrases) if phrases else NO_DISEASE_PHRASE


def format_answer(task: AnswerTask, impression: str = "", diagnosis: str = "") -> str:
    """The answer text for a task: ``"Impression: <text>"``, ``"Final Diagnosis: <phrase>"`` or both,
    separated by a newline. Internal whitespace (including newlines) of the parts is collapsed
    to single spaces so that :func:`parse_answer` recovers them exactly."""
    imp = " ".join(impression.split())
    dia = " ".join(diagnosis.split())
    if task == "impression":
        return f"Impression: {imp}"
    if task == "diagnosis":
        return f"Final Diagnosis: {dia}"
    if task == "both":
        return f"Impression: {imp}\nFinal Diagnosis: {dia}"
    raise ValueError(f"no answer for task '{task}'; expected impression, diagnosis or both")


@dataclass(frozen=True)
class Answer:
    """The parts of a generated answer; ``None`` where the marker was absent."""

    impression: str | None
    diagnosis: str | None


_IMPRESSION_RE = re.compile(r"impression\s*:", re.IGNORECASE)
_DIAGNOSIS_RE = re.compile(r"final\s+diagnosis\s*:", re.IGNORECASE)


def parse_answer(text: str) -> Answer:
    """Split generated text into impression and diagnosis (inverse of :func:`format_answer`).

    The impression is the text after the first ``Impression:`` up to ``Final Diagnosis:`` (or the
    end); the diagnosis is the text after the first ``Final Diagnosis:`` up to a following
    ``Impression:`` (or the end). Markers are case-insensitive; whitespace is collapsed.
    """
    imp_m = _IMPRESSION_RE.search(text)
    dia_m = _DIAGNOSIS_RE.search(text)

    def _span(start: int, stop_re: re.Pattern[str]) -> str:
        stop = stop_re.search(text, start)
        return " ".join(text[start : stop.start() if stop else len(text)].split())

    impression = _span(imp_m.end(), _DIAGNOSIS_RE) if imp_m else None
    diagnosis = _span(dia_m.end(), _IMPRESSION_RE) if dia_m else None
    return Answer(impression=impression, diagnosis=diagnosis)


# ---- deterministic inference/evaluation protocol (first phrasing of each family) ----


def instruction_for(inputs: Sequence[str], target: str) -> str:
    """Evaluation instruction, e.g. ``"Translate the given T1 and FLAIR images into the corresponding
    T2-weighted MRI."``."""
    return instruction_text(inputs, target, None)


def planning_sentence(inputs: Sequence[str], target: str) -> str:
    """Evaluation planning sentence, e.g. ``"I need to translate the given T1 image into the
    corresponding T2-weighted MRI."``."""
    return planning_text(inputs, target, None)


def findings_question_text(modality: str, rng: np.random.Generator | None = None) -> str:
    """Question asking for one modality's findings (first phrasing when ``rng`` is None)."""
    return _choose(FINDINGS_QUESTIONS, rng).format(mod=DISPLAY_NAMES[modality])


def findings_answer(modality: str, finding: str) -> str:
    """Answer to a findings question: ``"<MOD>: <finding>"`` (the label ``report`` forces)."""
    return f"{DISPLAY_NAMES[modality]}: {finding.strip()}"


def findings_question(modality: str) -> str:
    """Evaluation / report findings question (deterministic)."""
    return findings_question_text(modality)


def impression_question() -> str:
    """Evaluation impression question."""
    return IMPRESSION_QUESTIONS[0]


def diagnosis_question() -> str:
    """Evaluation diagnosis question."""
    return DIAGNOSIS_QUESTIONS[0]


def both_question() -> str:
    """Evaluation question asking for impression and diagnosis together."""
    return BOTH_QUESTIONS[0]


def reconstruction_prompt(modality: str) -> str:
    """Evaluation self-alignment prompt, e.g. ``"Reconstruct the T1 image shown above."``."""
    return reconstruction_text(modality, None)
