"""The interleaved, description-enriched data flow (paper section 2.2; DESIGN section 5).

One slice record becomes an abstract :class:`SamplePlan`: an ordered list of segments that
the trainer materialises into the model's packed sequence (tokenising text, encoding images).
This module is data-side only and never imports the model.

Sequence of an interleaved plan (``kind="interleaved"``)::

    [input images: vae_clean + vit]                      (conditioning; visual dropout)
    for each target:
        instruction                   (loss False; text dropout)
        thinking                      (loss True, optional): planning sentence + findings
                                       of the modalities known so far
        target: vae_noisy (flow loss) -> vae_clean -> vit   (clean copy for later tokens;
                                                             not after the last target of a
                                                             generation-only plan: nothing reads it)
    tail (task != "generation"): question (loss False) -> answer (loss True)

Generation-only plans draw thinking with ``cfg.generation_thinking_prob`` (the others with
``cfg.thinking_prob``), and with ``cfg.image_free_prob`` lose every clean image view (inputs and
generated targets): the image-free context that image guidance (``flow.cfg_img_scale``) queries
at inference, which the rescue of step 5 would otherwise never show in training.

Understanding-only plans (``kind="understanding"``, the ablation "A") show images as ViT only,
then question + answer. Self-alignment plans (``kind="self_alignment"``) are
``[vit(m), reconstruction prompt, vae_noisy(m)]``.

Randomisation of :func:`build_plan`, in draw order (all from the caller's generator):

1. understanding-only with ``cfg.understanding_only_prob`` (-> :func:`understanding_plan`);
2. the task among the *feasible* ones with the ``DataConfig`` probabilities renormalised
   (``"both"`` takes the remaining mass). Feasibility: ``"generation"`` needs >= 2 present
   modalities, ``"impression"``/``"both"`` a non-empty impression, ``"diagnosis"``/``"both"``
   a disease list;
3. thinking with ``cfg.thinking_prob`` (recorded only when the plan has targets);
4. a random permutation of the present modalities (replaced, with ``cfg.canonical_order_prob``
   and one more draw only when that probability is > 0, by their canonical
   :data:`~unibrain_cli.modalities.MODALITIES` order: inputs a prefix, targets the next ones, the
   order ``impute`` and ``evaluate`` generate in); the first ``n_in`` are the inputs
   (``n_in`` uniform in 1..n-1 for generation, 1..n otherwise), the next ``n_tgt`` the targets
   (uniform in 1..n-n_in for generation, 0..n-n_in otherwise), in that random order;
5. visual dropout: each clean view (``vae_clean``, ``vit``) of each INPUT image is dropped
   independently with ``cfg.visual_dropout``; generated targets' clean copies and noisy
   targets are never dropped. If every input view was dropped, one of them (uniformly chosen)
   is kept, so every plan has visual context: the expected per-view drop rate is thus
   ``p - p**(2 n_in) / (2 n_in)`` (0.255 for one input at p = 0.3);
6. text dropout: each instruction is dropped (absent) with ``cfg.text_dropout``;
7. phrasings of instructions, planning sentences and questions.

Dropout only removes conditioning: the instruction and thinking texts still name all inputs
and the thinking still carries the findings of dropped inputs (they are known modalities).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from unibrain_cli.config.components import DataConfig
from unibrain_cli.data import templates
from unibrain_cli.errors import UserError
from unibrain_cli.modalities import MODALITIES, canonical_modality, parse_modality

logger = logging.getLogger(__name__)

TextRole = Literal["instruction", "thinking", "question", "answer", "prompt"]
ImageView = Literal["vit", "vae_clean", "vae_noisy"]
Task = Literal["generation", "impression", "diagnosis", "both"]
PlanKind = Literal["interleaved", "understanding", "self_alignment"]

TASKS: tuple[str, ...] = ("generation", "impression", "diagnosis", "both")
#: Text roles that carry next-token-prediction loss; every other role is conditioning only.
LOSS_ROLES: frozenset[str] = frozenset({"thinking", "answer"})
_ROLES = frozenset({"instruction", "thinking", "question", "answer", "prompt"})
_VIEWS = frozenset({"vit", "vae_clean", "vae_noisy"})


@dataclass(frozen=True)
class TextSegment:
    """A text span. The trainer tokenises it, wraps it with bos/eos tokens, and applies the NTP
    loss on its tokens iff ``loss``. ``role`` says what the text is (see :data:`LOSS_ROLES`)."""

    text: str
    loss: bool
    role: TextRole

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"unknown text role '{self.role}'; expected one of {sorted(_ROLES)}")


@dataclass(frozen=True)
class ImageSegment:
    """One image block of ``modality`` (canonical name) of the sample's slice.

    ``view``: ``"vit"`` (understanding ViT tokens, clean), ``"vae_clean"`` (clean VAE latent
    tokens, context), ``"vae_noisy"`` (noised VAE latent tokens carrying the flow loss;
    ``loss=True``). A noisy block is followed immediately by its clean copy in interleaved plans
    so that later tokens see the clean image — except the last target of a generation-only plan
    (nothing follows it) and image-free plans (no clean view at all).
    """

    modality: str
    view: ImageView
    loss: bool

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown canonical modality '{self.modality}'; expected one of {MODALITIES}")
        if self.view not in _VIEWS:
            raise ValueError(f"unknown image view '{self.view}'; expected one of {sorted(_VIEWS)}")


Segment = TextSegment | ImageSegment


@dataclass(frozen=True)
class SamplePlan:
    """An ordered plan of one training sample.

    segments: the segments in sequence order.
    task: ``"generation"`` (no tail), ``"impression"``, ``"diagnosis"`` or ``"both"`` (tail Q&A).
    start_modalities: the input modalities (the start set) in sequence order, including inputs
        whose views were all removed by visual dropout.
    targets: generated modalities in generation order (empty for understanding-only).
    understanding_only: images enter as ViT only; no generation.
    thinking: the plan contains thinking segments.
    meta: provenance and dropout record (``slice_id``, ``case_id``, ``shard``, ``row`` when the
        record has them; ``dropped_views``: ``((modality, view), ...)`` of removed input views;
        ``dropped_instructions``: targets whose instruction was removed; ``rescued``: True when
        one input view was kept back after all had been dropped).
    kind: ``"interleaved"``, ``"understanding"`` or ``"self_alignment"``.
    """

    segments: tuple[Segment, ...]
    task: Task
    start_modalities: tuple[str, ...]
    targets: tuple[str, ...]
    understanding_only: bool
    thinking: bool
    meta: Mapping[str, Any] = field(default_factory=dict)
    kind: PlanKind = "interleaved"


# ---------------------------------------------------------------------------------------------
# record normalisation


def _split_names(value: Any) -> list[str]:
    """A "|"-joined string or a sequence of names -> list of stripped non-empty names."""
    if value is None:
        return []
    if isinstance(value, str):
        items: Sequence[Any] = value.split("|")
    else:
        try:
            items = list(value)
        except TypeError:
            return []
    return [str(v).strip() for v in items if str(v).strip()]


def record_modalities(record: Mapping[str, Any], allowed: Sequence[str] = MODALITIES) -> tuple[str, ...]:
    """Present modalities of a record (``"modalities"``: "|"-joined str or list), canonicalised,
    restricted to ``allowed`` and returned in ``allowed`` order."""
    names = {canonical_modality(n) for n in _split_names(record.get("modalities"))}
    return tuple(m for m in allowed if m in names)


def record_diseases(record: Mapping[str, Any]) -> tuple[str, ...]:
    """Disease class names of a record (``"diseases"``: "|"-joined str or list), lower-cased."""
    return tuple(d.lower() for d in _split_names(record.get("diseases")))


def record_findings(record: Mapping[str, Any]) -> dict[str, str]:
    """2D findings per canonical modality from ``findings_2d`` (dict or JSON string)."""
    raw = record.get("findings_2d") or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"findings_2d is not valid JSON ({exc}); re-run `unibrain slice`",
                            _where(record)) from exc
    out: dict[str, str] = {}
    for key, text in dict(raw).items():
        canon = canonical_modality(str(key))
        if canon is not None and text:
            out[canon] = " ".join(str(text).split())
    return out


def record_impression(record: Mapping[str, Any]) -> str:
    """The record's impression text, whitespace-collapsed (``""`` when missing)."""
    value = record.get("impression")
    return " ".join(str(value).split()) if isinstance(value, str) else ""


def _where(record: Mapping[str, Any]) -> str:
    return f"slice {record.get('slice_id', '?')}"


def _meta(record: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key in ("slice_id", "case_id", "shard", "row"):
        value = record.get(key)
        if value is not None:
            meta[key] = value.item() if isinstance(value, np.generic) else value
    return meta


# ---------------------------------------------------------------------------------------------
# random choices


def task_probabilities(cfg: DataConfig) -> dict[str, float]:
    """Task distribution from the config; ``"both"`` takes the remaining mass."""
    probs = {
        "generation": cfg.generation_only_prob,
        "impression": cfg.impression_prob,
        "diagnosis": cfg.diagnosis_prob,
    }
    for name, p in probs.items():
        key = "generation_only_prob" if name == "generation" else f"{name}_prob"
        if not 0.0 <= p <= 1.0:
            raise UserError(f"must be a probability in [0, 1], got {p}", f"data.{key}")
    rest = 1.0 - sum(probs.values())
    if rest < -1e-9:
        raise UserError(
            f"generation_only_prob + impression_prob + diagnosis_prob = {1.0 - rest:.3f} exceeds 1; "
            "lower them (the remaining mass is the 'both' task)", "data")
    probs["both"] = max(rest, 0.0)
    return probs


def _feasible_tasks(n_present: int, has_impression: bool, has_diagnosis: bool,
                    allow_generation: bool) -> list[str]:
    tasks = []
    if allow_generation and n_present >= 2:
        tasks.append("generation")
    if has_impression:
        tasks.append("impression")
    if has_diagnosis:
        tasks.append("diagnosis")
    if has_impression and has_diagnosis:
        tasks.append("both")
    return tasks


def _draw_task(rng: np.random.Generator, cfg: DataConfig, feasible: Sequence[str]) -> str:
    """Draw among ``feasible`` tasks with the config probabilities renormalised
    (uniform over them if they all have zero mass)."""
    probs = task_probabilities(cfg)
    weights = np.array([probs[t] for t in feasible], dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(feasible), 1.0 / len(feasible))
    return str(feasible[int(rng.choice(len(feasible), p=weights))])


def _visual_dropout(
    rng: np.random.Generator, images: Sequence[str], views: Sequence[str], p: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], bool]:
    """Drop each (image, view) independently with ``p``; keep one back if all were dropped.

    Returns (kept, dropped, rescued), each list in (image order, view order).
    """
    pairs = [(m, v) for m in images for v in views]
    drop = rng.random(len(pairs)) < p
    rescued = False
    if pairs and drop.all():
        drop[int(rng.integers(len(pairs)))] = False
        rescued = True
    kept = [pv for pv, d in zip(pairs, drop, strict=True) if not d]
    dropped = [pv for pv, d in zip(pairs, drop, strict=True) if d]
    return kept, dropped, rescued


def _findings_qa(rng: np.random.Generator, cfg: DataConfig, known: Sequence[str],
                 findings: Mapping[str, str]) -> list[Segment]:
    """With probability ``cfg.findings_prob``: one findings question about a known modality and its
    answer ``"<MOD>: <2D finding>"`` (loss) — what ``unibrain report`` asks at inference."""
    candidates = [m for m in known if findings.get(m)]
    if not candidates or rng.random() >= cfg.findings_prob:
        return []
    m = candidates[int(rng.integers(len(candidates)))]
    return [
        TextSegment(templates.findings_question_text(m, rng), loss=False, role="question"),
        TextSegment(templates.findings_answer(m, findings[m]), loss=True, role="answer"),
    ]


def _tail(task: str, rng: np.random.Generator, impression: str, diseases: Sequence[str]) -> list[Segment]:
    if task == "generation":
        return []
    answer = templates.format_answer(task, impression, templates.diagnosis_phrase(diseases))  # type: ignore[arg-type]
    return [
        TextSegment(templates.question_text(task, rng), loss=False, role="question"),  # type: ignore[arg-type]
        TextSegment(answer, loss=True, role="answer"),
    ]


# ---------------------------------------------------------------------------------------------
# plan builders


def build_plan(record: Mapping[str, Any], rng: np.random.Generator, cfg: DataConfig) -> SamplePlan:
    """Build the randomised interleaved plan of one slice record (see the module docstring).

    ``record``: one row of ``index.parquet`` (a dict or pandas Series) with ``modalities``
    (present modalities, "|"-joined or a list), ``findings_2d`` (dict or JSON string),
    ``impression``, ``diseases``; ``slice_id``/``case_id``/``shard``/``row`` are copied to meta.
    Only modalities in ``cfg.modalities`` are used. Raises :class:`UserError` when the record
    supports no task at all (no modality, or one modality without impression and diseases).
    """
    present = record_modalities(record, cfg.modalities)
    if not present:
        raise UserError(f"no usable modality (record lists {record.get('modalities')!r}, "
                        f"recipe knows {list(cfg.modalities)})", _where(record))
    if rng.random() < cfg.understanding_only_prob:
        return understanding_plan(record, rng, cfg)

    impression = record_impression(record)
    diseases = record_diseases(record)
    feasible = _feasible_tasks(len(present), bool(impression), bool(diseases), allow_generation=True)
    if not feasible:
        raise UserError("one modality and no impression or disease: nothing to generate or answer",
                        _where(record))
    task = _draw_task(rng, cfg, feasible)
    thinking = bool(rng.random() < (cfg.generation_thinking_prob if task == "generation" else cfg.thinking_prob))

    n = len(present)
    order = _modality_order(present, rng, cfg)
    if task == "generation":
        n_in = int(rng.integers(1, n))  # 1..n-1
        n_tgt = int(rng.integers(1, n - n_in + 1))  # 1..n-n_in
    else:
        n_in = int(rng.integers(1, n + 1))  # 1..n
        n_tgt = int(rng.integers(0, n - n_in + 1))  # 0..n-n_in
    inputs, targets = order[:n_in], order[n_in : n_in + n_tgt]

    kept, dropped, rescued = _visual_dropout(rng, inputs, ("vae_clean", "vit"), cfg.visual_dropout)
    findings = record_findings(record)

    segments: list[Segment] = [ImageSegment(m, v, loss=False) for m, v in kept]  # type: ignore[arg-type]
    known = list(inputs)
    dropped_instructions: list[str] = []
    for target in targets:
        if rng.random() < cfg.text_dropout:
            dropped_instructions.append(target)
        else:
            segments.append(TextSegment(templates.instruction_text(known, target, rng), False, "instruction"))
        if thinking:
            text = templates.thinking_text(known, target, findings, rng)
            segments.append(TextSegment(text, loss=True, role="thinking"))
        segments += [ImageSegment(target, "vae_noisy", loss=True)] * max(1, cfg.flow_draws)
        segments += [
            ImageSegment(target, "vae_clean", loss=False),
            ImageSegment(target, "vit", loss=False),
        ]
        known.append(target)
    image_free = False
    if task != "generation":
        segments += _findings_qa(rng, cfg, known, findings)
    else:
        # nothing reads the last target's clean views: they would only cost tokens
        segments = segments[:-2]
        if cfg.image_free_prob > 0 and rng.random() < cfg.image_free_prob:
            image_free = True
            segments = [s for s in segments if not (isinstance(s, ImageSegment) and s.view != "vae_noisy")]
    segments += _tail(task, rng, impression, diseases)

    meta = _meta(record) | {
        "dropped_views": tuple(dropped),
        "dropped_instructions": tuple(dropped_instructions),
        "rescued": rescued,
        "image_free": image_free,
    }
    return SamplePlan(
        segments=tuple(segments),
        task=task,  # type: ignore[arg-type]
        start_modalities=tuple(inputs),
        targets=tuple(targets),
        understanding_only=False,
        thinking=thinking and bool(targets),
        meta=meta,
        kind="interleaved",
    )


def draft_pair(present: Sequence[str], rng: np.random.Generator, cfg: DataConfig) -> tuple[tuple[str, ...], str]:
    """One (context modalities, target) pair for the aligned path's draft network, drawn like a
    generation plan's first target: a random order of the ``present`` modalities (>= 2),
    canonical with ``cfg.canonical_order_prob``, ``n_in`` uniform in 1..n-1; the inputs are the
    first ``n_in``, the target the next one. No dropout: the draft learns from full contexts."""
    n = len(present)
    if n < 2:
        raise ValueError(f"a draft pair needs at least 2 modalities, got {list(present)}")
    order = _modality_order(present, rng, cfg)
    n_in = int(rng.integers(1, n))
    return tuple(order[:n_in]), order[n_in]


def _modality_order(present: Sequence[str], rng: np.random.Generator, cfg: DataConfig) -> list[str]:
    """A generation plan's modality order: a random permutation of ``present``, replaced by the
    canonical order (``present`` as listed) with ``cfg.canonical_order_prob`` (one more draw only
    when that probability is > 0)."""
    order = [present[i] for i in rng.permutation(len(present))]
    if cfg.canonical_order_prob > 0 and rng.random() < cfg.canonical_order_prob:
        order = list(present)
    return order


def understanding_plan(record: Mapping[str, Any], rng: np.random.Generator, cfg: DataConfig,
                       all_prob: float = 0.0) -> SamplePlan:
    """Understanding-only plan: a random non-empty subset of the present modalities, in random
    order, as ViT images (visual dropout per image, at least one kept), then question + answer.
    With ``all_prob`` > 0 (one more draw) the subset is every present modality with that
    probability (the ``und`` stage's ``data.understanding_all_prob``).

    The task is drawn among impression/diagnosis/both with the config probabilities
    renormalised. Raises :class:`UserError` when the record has neither impression nor diseases.
    """
    present = record_modalities(record, cfg.modalities)
    if not present:
        raise UserError(f"no usable modality (record lists {record.get('modalities')!r})", _where(record))
    impression = record_impression(record)
    diseases = record_diseases(record)
    feasible = _feasible_tasks(len(present), bool(impression), bool(diseases), allow_generation=False)
    if not feasible:
        raise UserError("no impression and no disease: nothing to answer", _where(record))
    task = _draw_task(rng, cfg, feasible)

    n = len(present)
    order = [present[i] for i in rng.permutation(n)]
    shown = order[: int(rng.integers(1, n + 1))]
    if all_prob > 0 and rng.random() < all_prob:
        shown = order
    kept, dropped, rescued = _visual_dropout(rng, shown, ("vit",), cfg.visual_dropout)

    segments: list[Segment] = [ImageSegment(m, "vit", loss=False) for m, _ in kept]
    segments += _findings_qa(rng, cfg, shown, record_findings(record))
    segments += _tail(task, rng, impression, diseases)
    meta = _meta(record) | {"dropped_views": tuple(dropped), "dropped_instructions": (), "rescued": rescued}
    return SamplePlan(
        segments=tuple(segments),
        task=task,  # type: ignore[arg-type]
        start_modalities=tuple(shown),
        targets=(),
        understanding_only=True,
        thinking=False,
        meta=meta,
        kind="understanding",
    )


_LATERALITY = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_MIRRORED_SIDE = {"left": "right", "right": "left"}


def mirror_text(text: str) -> str:
    """``text`` with the words "left" and "right" swapped, their capitalisation kept ("Left frontal
    lobe" -> "Right frontal lobe", "LEFT" -> "RIGHT"): the report of the left-right mirrored slice."""
    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        out = _MIRRORED_SIDE[word.lower()]
        if word.isupper():
            return out.upper()
        return out.capitalize() if word[0].isupper() else out
    return _LATERALITY.sub(swap, text)


def mirror_plan(plan: SamplePlan) -> SamplePlan:
    """The plan of the left-right mirror of its slice: every text segment through :func:`mirror_text`
    and ``meta["mirrored"] = True``, which tells the stage to flip every image of the sample along its
    columns (the subject's left-right axis, :func:`unibrain_cli.data.slicing.axial_slice`)."""
    segments = tuple(dataclasses.replace(seg, text=mirror_text(seg.text)) if isinstance(seg, TextSegment) else seg
                     for seg in plan.segments)
    return dataclasses.replace(plan, segments=segments, meta={**plan.meta, "mirrored": True})


def self_alignment_plan(modality: str, rng: np.random.Generator | None = None) -> SamplePlan:
    """Self-alignment (SA) plan of one image: ``[vit(m), reconstruction prompt, vae_noisy(m)]``.

    The generation expert reconstructs the image's VAE latent (flow loss) from the ViT dense
    embeddings of the same image and the prompt. ``rng=None`` uses the first prompt phrasing.
    ``modality`` may be an alias; unknown names raise :class:`UserError`.
    """
    m = parse_modality(modality, "modality")
    segments = (
        ImageSegment(m, "vit", loss=False),
        TextSegment(templates.reconstruction_text(m, rng), loss=False, role="prompt"),
        ImageSegment(m, "vae_noisy", loss=True),
    )
    return SamplePlan(
        segments=segments, task="generation", start_modalities=(m,), targets=(m,),
        understanding_only=False, thinking=False, meta={}, kind="self_alignment",
    )


# ---------------------------------------------------------------------------------------------
# checks, counting, packing


def validate_plan(plan: SamplePlan) -> None:
    """Check the structural rules of a plan; raise ``ValueError`` naming the first broken rule.

    Rules: loss on text iff its role is in :data:`LOSS_ROLES`; loss on images iff
    ``vae_noisy``; targets disjoint from inputs; in interleaved plans each noisy block is
    followed by ``vae_clean`` then ``vit`` of the same modality (none after the last target of a
    generation-only plan, none at all in an image-free plan), and no image of a target
    appears before its noisy block; understanding-only plans have no VAE blocks and no
    targets; tasks other than ``"generation"`` end with question + answer; self-alignment
    plans are exactly ``[vit, prompt, vae_noisy]`` of one modality.
    """
    segs = plan.segments
    for i, s in enumerate(segs):
        if isinstance(s, TextSegment) and s.loss != (s.role in LOSS_ROLES):
            raise ValueError(f"segment {i}: text role '{s.role}' must have loss={s.role in LOSS_ROLES}")
        if isinstance(s, ImageSegment) and s.loss != (s.view == "vae_noisy"):
            raise ValueError(f"segment {i}: image view '{s.view}' must have loss={s.view == 'vae_noisy'}")
    if plan.kind == "self_alignment":
        shape = [(type(s).__name__, getattr(s, "view", getattr(s, "role", None))) for s in segs]
        mods = {s.modality for s in segs if isinstance(s, ImageSegment)}
        if shape != [("ImageSegment", "vit"), ("TextSegment", "prompt"), ("ImageSegment", "vae_noisy")] \
                or len(mods) != 1:
            raise ValueError(f"self-alignment plan must be [vit, prompt, vae_noisy] of one modality, got {shape}")
        return
    if set(plan.targets) & set(plan.start_modalities):
        raise ValueError(f"targets {plan.targets} overlap inputs {plan.start_modalities}")
    if plan.understanding_only and (
        plan.targets or any(isinstance(s, ImageSegment) and s.view != "vit" for s in segs)
    ):
        raise ValueError("understanding-only plan has VAE blocks or targets")
    generated: list[str] = []
    for i, s in enumerate(segs):
        if not isinstance(s, ImageSegment):
            continue
        if s.modality in plan.targets and s.modality not in generated:
            if s.view != "vae_noisy":
                raise ValueError(f"segment {i}: target {s.modality} appears before its generation")
            j = i + 1
            while j < len(segs) and segs[j] == s:  # further flow draws of the same target
                j += 1
            nxt = segs[j : j + 2]
            want = [ImageSegment(s.modality, "vae_clean", False), ImageSegment(s.modality, "vit", False)]
            last = plan.task == "generation" and s.modality == plan.targets[-1]
            if list(nxt) != want and not (last or plan.meta.get("image_free")):
                raise ValueError(f"segment {i}: noisy {s.modality} is not followed by vae_clean + vit")
            if (last or plan.meta.get("image_free")) and nxt and isinstance(nxt[0], ImageSegment) \
                    and nxt[0].view != "vae_noisy":
                raise ValueError(f"segment {i}: noisy {s.modality} has clean views nothing may read")
            generated.append(s.modality)
        elif s.view == "vae_noisy":
            if not (i > 0 and segs[i - 1] == s):
                raise ValueError(f"segment {i}: noisy block of {s.modality}, which is not a pending target")
        elif s.modality not in plan.start_modalities and s.modality not in generated:
            raise ValueError(f"segment {i}: image of {s.modality}, neither input nor generated target")
    if generated != list(plan.targets):
        raise ValueError(f"generated {generated} differ from targets {list(plan.targets)}")
    tail = [getattr(s, "role", None) for s in segs[-2:]]
    if plan.task != "generation" and tail != ["question", "answer"]:
        raise ValueError(f"task '{plan.task}' must end with question + answer, got {tail}")


def plan_token_count(
    plan: SamplePlan, text_len_fn: Callable[[str], int], vit_tokens: int, vae_tokens: int
) -> int:
    """Tokens the plan occupies in a packed sequence.

    ``text_len_fn(text)``: tokens of one text segment as materialised (including its bos/eos
    wrappers and truncation); ``vit_tokens`` / ``vae_tokens``: tokens of one ViT / VAE image
    block (clean or noisy), including any image start/end marker tokens.
    """
    total = 0
    for s in plan.segments:
        if isinstance(s, TextSegment):
            total += int(text_len_fn(s.text))
        else:
            total += vit_tokens if s.view == "vit" else vae_tokens
    return total


def pack_plans(plans: Sequence[SamplePlan], budget: int, counts: Sequence[int]) -> list[list[int]]:
    """Greedy first-fit packing of samples into sequences of at most ``budget`` tokens.

    ``counts[i]``: tokens of ``plans[i]`` (see :func:`plan_token_count`). Samples are taken
    in order; each goes into the first open pack with room, else into a new pack. A sample
    longer than ``budget`` goes alone into its own pack and is reported with a warning on
    this module's logger (see :func:`oversized`). Every index appears exactly once; packs are
    returned in creation order, indices inside a pack ascending.
    """
    if len(plans) != len(counts):
        raise ValueError(f"{len(plans)} plans but {len(counts)} counts")
    if budget <= 0:
        raise UserError(f"token budget must be positive, got {budget}", "data.pack_tokens")
    packs: list[list[int]] = []
    room: list[int] = []
    for i, c in enumerate(counts):
        if c > budget:
            packs.append([i])
            room.append(-1)
            continue
        for j, r in enumerate(room):
            if c <= r:
                packs[j].append(i)
                room[j] -= c
                break
        else:
            packs.append([i])
            room.append(budget - c)
    too_long = oversized(counts, budget)
    if too_long:
        logger.warning("%d sample(s) exceed the %d-token budget and were packed alone: %s",
                       len(too_long), budget, too_long)
    return packs


def oversized(counts: Sequence[int], budget: int) -> list[int]:
    """Indices of samples whose token count exceeds ``budget``."""
    return [i for i, c in enumerate(counts) if c > budget]


def describe_plan(plan: SamplePlan) -> str:
    """Compact one-line view for logs, e.g. ``"t1:vae_clean t1:vit | instruction | think* |
    t2:vae_noisy* t2:vae_clean t2:vit | question | answer*"`` (``*`` marks loss)."""
    parts = []
    for s in plan.segments:
        star = "*" if s.loss else ""
        parts.append(f"{s.role}{star}" if isinstance(s, TextSegment) else f"{s.modality}:{s.view}{star}")
    return " ".join(parts)
