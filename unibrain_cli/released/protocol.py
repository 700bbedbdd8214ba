"""The facts of the released checkpoint's protocol: strings, token names, numbers.

Everything here is read from the authors' evaluation code (``zhiyuns/UniBrain`` f7c4df7,
``evaluate_metrics.py`` and ``inferencer.py``; see ``released-checkpoint-protocol.md``). Nothing
is tunable: a model only behaves as trained when it is fed exactly this.

Text: every text item is ``<|im_start|> + encode(text) + <|im_end|>`` (no chat template, no role
tags; ``<think>`` is plain text). Generation feeds ``<|im_start|>`` and decodes greedily for at most
``max_length`` steps, the fed ``<|im_start|>`` counting as the first (so at most ``max_length - 1``
new tokens); it stops when ``<|im_end|>`` is produced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unibrain_cli.data.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN

#: Special tokens looked up by name in the Qwen2 tokenizer (Qwen2.5 ids 151644, 151645, 151652, 151653).
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)

#: The unified chain's system prompt (note the space before the newline).
SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here"
)
#: Understanding only (``--task diagnosis``): the one question after the images.
DIAGNOSIS_QUESTION = (
    "Based on the provided information, provide a detailed impression of the observed structures and any "
    "potential issues, and tell me what is the most likely clinical diagnosis?"
)
#: Unified chain tail: the impression instruction (its answer is not appended) ...
IMPRESSION_INSTRUCTION = (
    "Assess the given data and present a comprehensive impression of the observed anatomical structures."
)
#: ... then the closed diagnosis question.
FINAL_DIAGNOSIS_QUESTION = (
    "Based on the provided information, what is the most likely clinical diagnosis? "
    "Answer with Glioblastoma, Meningioma, or Metastatic tumor."
)

#: Our canonical modality -> the authors' modality code (BraTS 2023 file suffixes).
CODES: dict[str, str] = {"t1": "t1n", "t2": "t2w", "flair": "t2f", "t1ce": "t1c", "dwi": "dwi", "adc": "adc"}

#: Greedy text bounds (``max_length`` of their ``gen_text``, the fed ``<|im_start|>`` included).
THINK_MAX_LENGTH = 800  # unified chain: thinking, impression, final label
DIAGNOSIS_MAX_LENGTH = 512  # understanding only

#: Images: slices are zero-padded to this side (unless their height already reaches it).
PAD_SIZE = 256
#: Percentiles of the voxels > 0 that map to 1 and 255.
PERCENTILES: tuple[float, float] = (0.5, 99.5)


@dataclass(frozen=True)
class ResizeRule:
    """BAGEL's ``MaxLongEdgeMinShortEdgeResize`` (bicubic): sides scaled into [min, max] and
    rounded to multiples of ``stride``, at most ``max_pixels`` pixels."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


#: VAE input transform (``ImageTransform(512, 256, 16)``) and ViT input transform (``ImageTransform(980, 224, 14)``).
VAE_RESIZE = ResizeRule(512, 256, 16)
VIT_RESIZE = ResizeRule(980, 224, 14)


@dataclass(frozen=True)
class SamplerSettings:
    """One task's image sampler (BAGEL ``generate_image``).

    ``num_timesteps`` is their count of schedule points: ``t = linspace(1, 0, num_timesteps)``,
    shifted by ``s t / (1 + (s - 1) t)``, and ``num_timesteps - 1`` Euler updates. Guidance is on
    for ``interval[0] < t <= interval[1]``; ``text_channel`` renormalises the text-guided velocity
    per token before image guidance.
    """

    num_timesteps: int = 10
    shift: float = 3.0
    text_scale: float = 3.0
    img_scale: float = 1.2
    interval: tuple[float, float] = (0.4, 1.0)
    renorm_type: str = "text_channel"
    renorm_min: float = 0.0

    @property
    def euler_steps(self) -> int:
        """Euler updates (our sampler's ``steps``)."""
        return self.num_timesteps - 1


#: Imputation only: 10 steps, shift 3 (``interleave_inference``'s default shift).
GENERATION_SAMPLER = SamplerSettings(shift=3.0)
#: Unified chain: 10 steps, shift 1.
UNIFIED_SAMPLER = SamplerSettings(shift=1.0)

#: Diagnosis scoring: a class is named when its stem occurs in the answer (case-insensitive).
DIAGNOSIS_STEMS: dict[str, str] = {
    "Gli": "glioma", "Mening": "meningioma", "Meta": "metastasis", "Infarct": "stroke", "Degeneration": "wmh",
}

#: The authors' step folders are named with 7 digits (``0000200``).
STEP_FOLDER = re.compile(r"^\d{7}$")


def modality_code(modality: str) -> str:
    """The authors' code of a canonical modality (``t2`` -> ``t2w``)."""
    return CODES[modality]


def generation_instruction(target: str) -> str:
    """The first (or only) instruction: ``Translate the attached MRI into its {T} image.``, with
    the target's code and ``t2f`` written ``T2-FLAIR`` (``t2w``, ``t1c`` stay literal)."""
    return f"Translate the attached MRI into its {modality_code(target).replace('t2f', 'T2-FLAIR')} image."


def chain_instruction(target: str) -> str:
    """The instruction before every later target of the unified chain (raw code, e.g. ``t2f``)."""
    return f"Translate the attached MRI images into {modality_code(target)} image."


def classify_answer(answer: str) -> tuple[str | None, list[str]]:
    """(predicted class, every class whose stem occurs) for a generated answer.

    Their Top-1 counts an answer correct when the true class's stem is a case-insensitive
    substring; the prediction here is the class whose stem occurs first (None when none does).
    """
    low = answer.lower()
    found = sorted((low.find(stem.lower()), cls) for stem, cls in DIAGNOSIS_STEMS.items() if stem.lower() in low)
    return (found[0][1] if found else None), [cls for _, cls in found]
