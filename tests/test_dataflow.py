"""Tests of the interleaved data-flow builder and its phrasings (data side, no model)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from unibrain_cli.config.components import DataConfig
from unibrain_cli.data import templates as T
from unibrain_cli.data.dataflow import (
    LOSS_ROLES,
    ImageSegment,
    SamplePlan,
    TextSegment,
    build_plan,
    describe_plan,
    mirror_plan,
    mirror_text,
    oversized,
    pack_plans,
    plan_token_count,
    record_findings,
    record_modalities,
    self_alignment_plan,
    task_probabilities,
    understanding_plan,
    validate_plan,
)
from unibrain_cli.errors import UserError
from unibrain_cli.modalities import MODALITIES

FIND = {m: f"finding-{m}-token{i}" for i, m in enumerate(MODALITIES)}

BRATS = {
    "slice_id": "BraTS-GLI-00012-000:77", "case_id": "BraTS-GLI-00012-000", "shard": "shard-00000.safetensors",
    "row": np.int64(3), "modalities": "t1|t2|flair|t1ce", "diseases": "glioma",
    "findings_2d": {m: FIND[m] for m in ("t1", "t2", "flair", "t1ce")},
    "impression": "Space-occupying lesion in the left frontal lobe,\nconsidering glioma.",
}
ISLES = {
    "slice_id": "sub-strokecase0001:40", "modalities": ["dwi", "adc", "flair"], "diseases": "stroke",
    "findings_2d": json.dumps({"DWI": FIND["dwi"], "ADC": FIND["adc"], "flair": FIND["flair"]}),
    "impression": "Acute infarct in the right MCA territory.",
}
WMH = {
    "slice_id": "Singapore_69:50", "modalities": "t1|flair", "diseases": "wmh|stroke",
    "findings_2d": {"t1": FIND["t1"], "flair": FIND["flair"]}, "impression": "Periventricular WMH.",
}
SINGLE = {"slice_id": "x:1", "modalities": "t2", "diseases": "meningioma",
          "findings_2d": {"t2": FIND["t2"]}, "impression": "Extra-axial mass."}
RECORDS = [BRATS, ISLES, WMH, SINGLE]


def _plans(record, n, cfg=None, seed=0):
    cfg = cfg or DataConfig()
    rng = np.random.default_rng(seed)
    return [build_plan(record, rng, cfg) for _ in range(n)]


def _images(plan):
    return [s for s in plan.segments if isinstance(s, ImageSegment)]


def _texts(plan, role):
    return [s for s in plan.segments if isinstance(s, TextSegment) and s.role == role]


# ------------------------------------------------------------------ templates


def test_template_families_have_enough_distinct_phrasings():
    families = [T.INSTRUCTION_TEMPLATES, T.PLANNING_TEMPLATES, T.IMPRESSION_QUESTIONS,
                T.DIAGNOSIS_QUESTIONS, T.BOTH_QUESTIONS, T.RECONSTRUCTION_PROMPTS]
    for fam in families:
        assert len(fam) >= 8 and len(set(fam)) == len(fam)
    for m in MODALITIES:
        for tpl in (*T.INSTRUCTION_TEMPLATES, *T.PLANNING_TEMPLATES):
            text = tpl.format(inputs=T.inputs_phrase(["t1", "flair"]), target=T.target_phrase(m))
            assert "{" not in text and T.target_phrase(m) in text and "T1 and FLAIR images" in text
        assert len({T.reconstruction_text(m, np.random.default_rng(s)) for s in range(60)}) >= 8


def test_deterministic_protocol_phrasings():
    assert T.instruction_for(["t1", "flair"], "t2") == \
        "Translate the given T1 and FLAIR images into the corresponding T2-weighted MRI."
    assert T.planning_sentence(["t1", "flair"], "t2") == \
        "I need to translate the given T1 and FLAIR images into the corresponding T2-weighted MRI."
    assert T.instruction_for(["t1"], "t2") == "Translate the given T1 image into the corresponding T2-weighted MRI."
    assert T.planning_sentence(["t1", "t2", "flair"], "t1ce").startswith(
        "I need to translate the given T1, T2 and FLAIR images into")
    assert T.impression_question() == T.IMPRESSION_QUESTIONS[0] == T.question_text("impression")
    assert T.diagnosis_question() == T.DIAGNOSIS_QUESTIONS[0]
    assert T.both_question() == T.BOTH_QUESTIONS[0]
    assert T.reconstruction_prompt("flair") == "Reconstruct the FLAIR image shown above."
    with pytest.raises(ValueError, match="unknown canonical modality"):
        T.instruction_for(["t1n"], "t2")


def test_diagnosis_phrase():
    assert T.diagnosis_phrase(["glioma"]) == "glioma"
    assert T.diagnosis_phrase(["wmh"]) == "white matter hyperintensities"
    assert T.diagnosis_phrase(["glioma", "WMH"]) == "glioma and white matter hyperintensities"
    assert T.diagnosis_phrase(["stroke", "wmh", "metastasis", "stroke"]) == \
        "stroke, white matter hyperintensities and metastasis"
    assert T.diagnosis_phrase([]) == T.NO_DISEASE_PHRASE
    assert T.diagnosis_phrase(["small  vessel disease"]) == "small vessel disease"


@pytest.mark.parametrize("task", ["impression", "diagnosis", "both"])
def test_answer_round_trip(task):
    text = T.format_answer(task, "Lesion in the left\nfrontal lobe.  Oedema.", "glioma and stroke")
    ans = T.parse_answer(text)
    assert ans.impression == (None if task == "diagnosis" else "Lesion in the left frontal lobe. Oedema.")
    assert ans.diagnosis == (None if task == "impression" else "glioma and stroke")
    assert text.count("\n") == (1 if task == "both" else 0)


def test_parse_answer_tolerates_case_and_order():
    ans = T.parse_answer("final diagnosis: meningioma\nIMPRESSION: dural-based mass")
    assert ans == T.Answer(impression="dural-based mass", diagnosis="meningioma")
    assert T.parse_answer("no markers here") == T.Answer(None, None)


# ------------------------------------------------------------------ plan rules


@pytest.mark.parametrize("record", RECORDS, ids=["brats", "isles", "wmh", "single"])
def test_every_plan_obeys_the_rules(record):
    present = set(record_modalities(record))
    findings = record_findings(record)
    for plan in _plans(record, 400, seed=1):
        validate_plan(plan)
        segs = plan.segments
        inputs, targets = set(plan.start_modalities), plan.targets
        assert inputs and inputs <= present and set(targets) <= present and not inputs & set(targets)
        assert len(set(targets)) == len(targets)
        for i, s in enumerate(segs):
            # loss masks: exactly thinking/answer text and noisy VAE blocks
            if isinstance(s, TextSegment):
                assert s.loss == (s.role in ("thinking", "answer"))
                assert s.role in ("instruction", "thinking", "question", "answer")
            else:
                assert s.loss == (s.view == "vae_noisy")
                if s.view == "vae_noisy" and plan.task == "generation" and s.modality == targets[-1]:
                    assert i == len(segs) - 1  # nothing follows the last generated target
                elif s.view == "vae_noisy":
                    assert segs[i + 1] == ImageSegment(s.modality, "vae_clean", False)
                    assert segs[i + 2] == ImageSegment(s.modality, "vit", False)
        # no target appears before its generation; targets generated in order
        first_seen = {}
        for s in _images(plan):
            first_seen.setdefault(s.modality, s.view)
        assert all(first_seen[t] == "vae_noisy" for t in targets)
        assert [s.modality for s in segs if isinstance(s, ImageSegment) and s.view == "vae_noisy"] == list(targets)
        if plan.understanding_only:
            assert plan.kind == "understanding" and not targets and not plan.thinking
            assert all(s.view == "vit" for s in _images(plan))
        if plan.task == "generation":
            assert targets and not _texts(plan, "question") and not _texts(plan, "answer")
        else:
            q, a = segs[-2:]
            assert (q.role, a.role) == ("question", "answer") and q.text in T.QUESTIONS[plan.task]
            assert a.text == T.format_answer(plan.task, record["impression"],
                                             T.diagnosis_phrase(record["diseases"].split("|")))
        # instruction/thinking name exactly the modalities known at that point
        known = list(plan.start_modalities)
        k = 0
        for s in segs:
            if isinstance(s, ImageSegment) and s.view == "vae_noisy":
                known.append(s.modality)
                k += 1
            elif isinstance(s, TextSegment) and s.role in ("instruction", "thinking"):
                fam = T.INSTRUCTION_TEMPLATES if s.role == "instruction" else T.PLANNING_TEMPLATES
                opts = {tpl.format(inputs=T.inputs_phrase(known), target=T.target_phrase(targets[k]))
                        for tpl in fam}
                if s.role == "instruction":
                    assert s.text in opts
                else:
                    assert any(s.text.startswith(o) for o in opts)
                    # findings only of known modalities, all of them, in known order
                    assert s.text.endswith(T.findings_text(findings, known))
                    for m in MODALITIES:
                        assert (FIND[m] in s.text) == (m in known and m in findings)
        assert plan.thinking == bool(_texts(plan, "thinking"))
        if plan.thinking:
            assert len(_texts(plan, "thinking")) == len(targets)


def test_single_modality_records_never_generate_and_textless_ones_fail():
    assert all(not p.targets and p.task != "generation" for p in _plans(SINGLE, 200))
    no_imp = dict(WMH, impression="")
    assert all(p.task in ("generation", "diagnosis") for p in _plans(no_imp, 200))
    with pytest.raises(UserError, match="nothing to generate or answer") as err:
        build_plan(dict(SINGLE, impression="", diseases=""), np.random.default_rng(0),
                   DataConfig(understanding_only_prob=0.0))
    assert err.value.where == "slice x:1"
    with pytest.raises(UserError, match="no usable modality"):
        build_plan(dict(BRATS, modalities="dwi"), np.random.default_rng(0), DataConfig(modalities=("t1", "t2")))


def test_record_normalisation_and_pandas_rows():
    assert record_modalities({"modalities": ["T1n", "t2w", "FLAIR"]}) == ("t1", "t2", "flair")
    assert record_modalities({"modalities": "t1|t2|flair|t1ce"}, ("t2", "t1")) == ("t2", "t1")
    assert record_findings(ISLES) == {"dwi": FIND["dwi"], "adc": FIND["adc"], "flair": FIND["flair"]}
    with pytest.raises(UserError, match="findings_2d is not valid JSON"):
        record_findings({"slice_id": "a:1", "findings_2d": "{oops"})
    row = pd.DataFrame([dict(BRATS, findings_2d=json.dumps(BRATS["findings_2d"]))]).iloc[0]
    a = build_plan(row, np.random.default_rng(5), DataConfig())
    b = build_plan(BRATS, np.random.default_rng(5), DataConfig())
    assert a.segments == b.segments and a.meta == b.meta
    assert a.meta["row"] == 3 and type(a.meta["row"]) is int and a.meta["shard"] == BRATS["shard"]
    # the recipe's modality list restricts what a plan uses
    for p in _plans(BRATS, 100, DataConfig(modalities=("t1", "t2"))):
        assert {s.modality for s in _images(p)} <= {"t1", "t2"}


def test_determinism_for_a_seed():
    cfg = DataConfig()
    first = [_plans(r, 50, cfg, seed=7) for r in RECORDS]
    again = [_plans(r, 50, cfg, seed=7) for r in RECORDS]
    other = [_plans(r, 50, cfg, seed=8) for r in RECORDS]
    assert first == again
    assert first != other


# ------------------------------------------------------------------ rates


def _binom_ok(hits, n, p, sigmas=4.0):
    return abs(hits / n - p) <= sigmas * np.sqrt(p * (1 - p) / n) + 1e-9


def test_task_thinking_and_understanding_rates_match_config():
    cfg = DataConfig(understanding_only_prob=0.0)
    plans = _plans(BRATS, 4000, cfg, seed=2)
    probs = task_probabilities(cfg)
    for task, p in probs.items():
        assert _binom_ok(sum(pl.task == task for pl in plans), len(plans), p), task
    with_targets = [pl for pl in plans if pl.targets]
    assert _binom_ok(sum(pl.thinking for pl in with_targets), len(with_targets), cfg.thinking_prob)

    plans = _plans(BRATS, 4000, DataConfig(), seed=3)
    assert _binom_ok(sum(pl.understanding_only for pl in plans), len(plans), DataConfig().understanding_only_prob)
    und = [pl for pl in plans if pl.understanding_only]
    assert {pl.task for pl in und} == {"impression", "diagnosis", "both"}


def test_text_and_visual_dropout_rates_match_config():
    cfg = DataConfig(understanding_only_prob=0.0, text_dropout=0.1, visual_dropout=0.3)
    plans = _plans(BRATS, 4000, cfg, seed=4)
    # text dropout: instruction slots (one per target) dropped with p = 0.1
    slots = sum(len(p.targets) for p in plans)
    dropped = sum(len(p.meta["dropped_instructions"]) for p in plans)
    assert dropped == slots - sum(len(_texts(p, "instruction")) for p in plans)
    assert _binom_ok(dropped, slots, cfg.text_dropout)
    # visual dropout per input view, p = 0.3, with the documented keep-one rescue
    views = sum(2 * len(p.start_modalities) for p in plans)
    v_dropped = sum(len(p.meta["dropped_views"]) for p in plans)
    p = cfg.visual_dropout
    expected = sum(2 * len(pl.start_modalities) * p - p ** (2 * len(pl.start_modalities)) for pl in plans) / views
    assert _binom_ok(v_dropped, views, expected)
    assert abs(v_dropped / views - p) < 0.03
    single = [pl for pl in plans if len(pl.start_modalities) == 1]
    assert _binom_ok(sum(len(pl.meta["dropped_views"]) for pl in single), 2 * len(single), p - p**2 / 2)
    for pl in plans:
        inputs_shown = [s for s in _images(pl) if s.modality in pl.start_modalities]
        assert len(inputs_shown) == 2 * len(pl.start_modalities) - len(pl.meta["dropped_views"]) >= 1
        # generated targets keep noisy + clean copies whatever the dropout
        # (the last target of a generation-only plan has no clean copy: nothing would read it)
        trailing = 2 if pl.task == "generation" else 0
        assert sum(s.modality in pl.targets for s in _images(pl)) == 3 * len(pl.targets) - trailing


def test_full_visual_dropout_keeps_exactly_one_input_view():
    cfg = DataConfig(visual_dropout=1.0, understanding_only_prob=0.5)
    for pl in _plans(BRATS, 300, cfg, seed=6):
        validate_plan(pl)
        shown = [s for s in _images(pl) if s.modality in pl.start_modalities]
        assert len(shown) == 1 and pl.meta["rescued"]
    plans = _plans(BRATS, 300, DataConfig(visual_dropout=0.0, text_dropout=0.0), seed=6)
    assert not any(pl.meta["dropped_views"] or pl.meta["dropped_instructions"] or pl.meta["rescued"]
                   for pl in plans)


def test_task_probabilities_validation():
    assert task_probabilities(DataConfig()) == pytest.approx(
        {"generation": 0.25, "impression": 0.25, "diagnosis": 0.25, "both": 0.25})
    with pytest.raises(UserError, match="exceeds 1") as err:
        task_probabilities(DataConfig(generation_only_prob=0.6, impression_prob=0.5))
    assert err.value.where == "data"
    with pytest.raises(UserError) as err:
        task_probabilities(DataConfig(diagnosis_prob=-0.1))
    assert err.value.where == "data.diagnosis_prob"


# ------------------------------------------------------------------ understanding-only and SA


def test_understanding_plan_shape():
    rng = np.random.default_rng(9)
    for _ in range(200):
        pl = understanding_plan(ISLES, rng, DataConfig())
        validate_plan(pl)
        imgs = _images(pl)
        assert imgs and all(s.view == "vit" and not s.loss for s in imgs)
        assert [s.modality for s in imgs] == [m for m in pl.start_modalities
                                              if (m, "vit") not in pl.meta["dropped_views"]]
        roles = [s.role for s in pl.segments[len(imgs):]]
        assert roles in (["question", "answer"], ["question", "answer", "question", "answer"])
        if len(roles) == 4:  # a findings Q&A about a shown modality comes first
            label, _, finding = pl.segments[len(imgs) + 1].text.partition(": ")
            shown = {T.DISPLAY_NAMES[s.modality] for s in imgs} | {T.DISPLAY_NAMES[m] for m in pl.start_modalities}
            assert label in shown and finding
        assert pl.kind == "understanding" and pl.understanding_only and pl.task != "generation"


def test_understanding_all_prob_shows_every_present_modality():
    plans = [understanding_plan(BRATS, np.random.default_rng(i), DataConfig(), 1.0) for i in range(40)]
    assert all(sorted(p.start_modalities) == sorted(record_modalities(BRATS)) for p in plans)
    assert len({p.start_modalities for p in plans}) > 1  # still in random order
    # 0 draws nothing more: the plans of the default call
    assert [understanding_plan(BRATS, np.random.default_rng(i), DataConfig(), 0.0) for i in range(40)] == \
        [understanding_plan(BRATS, np.random.default_rng(i), DataConfig()) for i in range(40)]
    some = [understanding_plan(BRATS, np.random.default_rng(i), DataConfig()) for i in range(40)]
    assert any(len(p.start_modalities) < len(record_modalities(BRATS)) for p in some)


def test_mirror_text_swaps_laterality_and_keeps_case():
    assert mirror_text("Left frontal lobe mass; the right parietal lobe and LEFT side. Bright, leftover.") == \
        "Right frontal lobe mass; the left parietal lobe and RIGHT side. Bright, leftover."
    assert mirror_text("Final Diagnosis: glioma") == "Final Diagnosis: glioma"


def test_mirror_plan_mirrors_every_text_and_marks_the_images():
    rng = np.random.default_rng(3)
    plan = understanding_plan(BRATS, rng, replace(DataConfig(), findings_prob=0.0, diagnosis_prob=0.0,
                                                  generation_only_prob=0.0, impression_prob=1.0))
    mirrored = mirror_plan(plan)
    assert mirrored.meta["mirrored"] and "mirrored" not in plan.meta
    answer = [s.text for s in mirrored.segments if isinstance(s, TextSegment) and s.role == "answer"]
    assert answer == ["Impression: Space-occupying lesion in the right frontal lobe, considering glioma."]
    assert [s for s in mirrored.segments if isinstance(s, ImageSegment)] == \
        [s for s in plan.segments if isinstance(s, ImageSegment)]
    assert mirror_plan(mirrored).segments == plan.segments  # an involution on the text
    validate_plan(mirrored)


def test_self_alignment_plan_shape():
    pl = self_alignment_plan("T2w")
    assert pl.segments == (
        ImageSegment("t2", "vit", False),
        TextSegment("Reconstruct the T2 image shown above.", False, "prompt"),
        ImageSegment("t2", "vae_noisy", True),
    )
    assert pl.kind == "self_alignment" and pl.targets == pl.start_modalities == ("t2",)
    validate_plan(pl)
    prompt = self_alignment_plan("adc", np.random.default_rng(1)).segments[1].text
    assert prompt in {t.format(image="ADC image") for t in T.RECONSTRUCTION_PROMPTS}
    with pytest.raises(UserError, match="unknown modality 'pd'"):
        self_alignment_plan("pd")


def test_validate_plan_rejects_broken_plans():
    good = self_alignment_plan("t1")
    base = dict(task="generation", start_modalities=("t1",), targets=("t2",), understanding_only=False,
                thinking=False)
    no_clean = SamplePlan(segments=(ImageSegment("t1", "vae_clean", False), ImageSegment("t2", "vae_noisy", True),
                                    ImageSegment("t2", "vit", False)), **base)
    with pytest.raises(ValueError, match="not followed by vae_clean|nothing may read"):
        validate_plan(no_clean)
    early = SamplePlan(segments=(ImageSegment("t2", "vit", False),), **base)
    with pytest.raises(ValueError, match="before its generation"):
        validate_plan(early)
    lossy = replace(good, segments=(good.segments[0], TextSegment("x", True, "prompt"), good.segments[2]))
    with pytest.raises(ValueError, match="must have loss=False"):
        validate_plan(lossy)
    assert {"thinking", "answer"} == LOSS_ROLES


# ------------------------------------------------------------------ counting and packing


def test_plan_token_count_golden():
    plan = SamplePlan(
        segments=(ImageSegment("t1", "vae_clean", False), ImageSegment("t1", "vit", False),
                  TextSegment("one two three", False, "instruction"), TextSegment("a b", True, "thinking"),
                  ImageSegment("t2", "vae_noisy", True), ImageSegment("t2", "vae_clean", False),
                  ImageSegment("t2", "vit", False), TextSegment("q", False, "question"),
                  TextSegment("Final Diagnosis: glioma", True, "answer")),
        task="diagnosis", start_modalities=("t1",), targets=("t2",), understanding_only=False, thinking=True)
    validate_plan(plan)
    n = plan_token_count(plan, lambda s: len(s.split()) + 2, vit_tokens=66, vae_tokens=18)
    assert n == (5 + 4 + 3 + 5) + 2 * 66 + 3 * 18
    assert describe_plan(plan) == ("t1:vae_clean t1:vit instruction thinking* t2:vae_noisy* t2:vae_clean "
                                   "t2:vit question answer*")


def test_pack_plans_first_fit(caplog):
    rng = np.random.default_rng(0)
    counts = [int(c) for c in rng.integers(50, 700, size=300)] + [1500, 90]
    plans = [self_alignment_plan("t1")] * len(counts)
    budget = 1024
    with caplog.at_level(logging.WARNING, logger="unibrain_cli.data.dataflow"):
        packs = pack_plans(plans, budget, counts)
    assert sorted(i for p in packs for i in p) == list(range(len(counts)))
    for p in packs:
        assert p == sorted(p)
        assert sum(counts[i] for i in p) <= budget or (len(p) == 1 and counts[p[0]] > budget)
    assert [len(counts) - 2] in packs and oversized(counts, budget) == [len(counts) - 2]
    assert "exceed the 1024-token budget" in caplog.text
    # first fit: no sample could have gone into an earlier pack that had room when it arrived
    for k, p in enumerate(packs):
        for i in p:
            if counts[i] > budget:
                continue
            for earlier in packs[:k]:
                used = sum(counts[j] for j in earlier if j < i)
                assert used + counts[i] > budget, (i, k, earlier)
    fill = sum(min(c, budget) for c in counts) / (budget * len(packs))
    assert fill > 0.85
    with pytest.raises(ValueError, match="2 plans but 1 counts"):
        pack_plans(plans[:2], budget, counts[:1])
    with pytest.raises(UserError):
        pack_plans([], 0, [])


def test_findings_questions_are_asked_about_known_modalities_only():
    rng = np.random.default_rng(3)
    cfg = DataConfig(findings_prob=1.0, understanding_only_prob=0.0)
    seen = 0
    for _ in range(300):
        pl = build_plan(BRATS, rng, cfg)
        validate_plan(pl)
        texts = list(pl.segments)
        for i, seg in enumerate(texts):
            if isinstance(seg, TextSegment) and seg.role == "answer" and not seg.text.startswith("Impression") \
                    and not seg.text.startswith("Final Diagnosis"):
                seen += 1
                assert seg.loss and texts[i - 1].role == "question" and not texts[i - 1].loss
                label = seg.text.split(":", 1)[0]
                known = {T.DISPLAY_NAMES[m] for m in (*pl.start_modalities, *pl.targets)}
                assert label in known
    assert seen > 100


def test_image_free_plans_hold_no_clean_image_and_generation_thinking_has_its_own_rate():
    cfg = DataConfig(image_free_prob=0.5, generation_only_prob=1.0, impression_prob=0.0, diagnosis_prob=0.0,
                     understanding_only_prob=0.0, generation_thinking_prob=0.0)
    rng = np.random.default_rng(0)
    plans = [build_plan(RECORDS[0], rng, cfg) for _ in range(200)]
    free = [p for p in plans if p.meta["image_free"]]
    assert 60 < len(free) < 140  # about half
    for p in free:
        validate_plan(p)
        assert all(s.view == "vae_noisy" for s in _images(p))
        assert [s.modality for s in _images(p)] == list(p.targets)
    for p in plans:
        assert not p.thinking and not _texts(p, "thinking")
        assert p.meta["image_free"] or any(s.view != "vae_noisy" for s in _images(p))


def test_flow_draws_repeat_each_noisy_target_and_change_no_other_draw():
    """flow_draws = 3: each target gets three noisy blocks in a row (then its clean views); the
    plans are otherwise the plans of flow_draws = 1 (no extra RNG draw); they validate."""
    base = DataConfig(understanding_only_prob=0.0)
    many = DataConfig(understanding_only_prob=0.0, flow_draws=3)
    r1, r3 = np.random.default_rng(5), np.random.default_rng(5)
    checked = 0
    for _ in range(100):
        p1, p3 = build_plan(RECORDS[0], r1, base), build_plan(RECORDS[0], r3, many)
        validate_plan(p3)
        assert p1.targets == p3.targets and p1.task == p3.task
        collapsed = []
        for s in p3.segments:
            if not (collapsed and isinstance(s, ImageSegment) and s.view == "vae_noisy" and collapsed[-1] == s):
                collapsed.append(s)
        assert tuple(collapsed) == p1.segments
        noisy = [s for s in p3.segments if isinstance(s, ImageSegment) and s.view == "vae_noisy"]
        assert len(noisy) == 3 * len(p3.targets)
        checked += bool(p3.targets)
    assert checked > 30
    bad = build_plan(RECORDS[0], np.random.default_rng(1), many)
    segs = list(bad.segments)
    i = next(i for i, s in enumerate(segs) if isinstance(s, ImageSegment) and s.view == "vae_noisy")
    segs.insert(i + 4, segs[i])  # a noisy copy after the clean views: not allowed
    with pytest.raises(ValueError):
        validate_plan(replace(bad, segments=tuple(segs)))


def test_canonical_order_keeps_modalities_order_and_leaves_zero_unchanged():
    """canonical_order_prob = 1: inputs are a prefix of the canonical order and targets follow it;
    0 (the default) draws exactly the plans it drew before the option existed (no extra draw);
    0.5 mixes both."""
    rank = {m: i for i, m in enumerate(MODALITIES)}
    always = DataConfig(understanding_only_prob=0.0, canonical_order_prob=1.0)
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(200):
        p = build_plan(RECORDS[0], rng, always)
        validate_plan(p)
        order = list(p.start_modalities) + list(p.targets)
        assert order == sorted(order, key=rank.__getitem__)
        assert list(p.start_modalities) == [m for m in MODALITIES if m in RECORDS[0]["modalities"]][: len(p.start_modalities)]
        seen.add((p.start_modalities, p.targets))
    assert len(seen) >= 5  # prefixes of several lengths, targets of several lengths
    r0, rd = np.random.default_rng(9), np.random.default_rng(9)
    zero = DataConfig(understanding_only_prob=0.0, canonical_order_prob=0.0)
    for _ in range(50):
        assert build_plan(RECORDS[0], r0, zero) == build_plan(RECORDS[0], rd, DataConfig(understanding_only_prob=0.0))
    half = DataConfig(understanding_only_prob=0.0, canonical_order_prob=0.5)
    rng = np.random.default_rng(4)
    canonical = [list(p.start_modalities) + list(p.targets) for p in (build_plan(RECORDS[0], rng, half) for _ in range(300))]
    share = np.mean([o == sorted(o, key=rank.__getitem__) for o in canonical])
    assert 0.5 < share < 0.8  # half canonical by choice, plus random permutations that happen to be sorted


def test_draft_pairs_follow_the_generation_orders():
    """data flow's first-target rule for the draft network's pairs: canonical order -> the inputs are a
    prefix of the present modalities and the target the next one; random order -> any target, never in
    its own context; every n_in in 1..n-1 occurs."""
    from unibrain_cli.data.dataflow import draft_pair

    present = ("t1", "t2", "flair", "t1ce")
    rng = np.random.default_rng(0)
    canon = [draft_pair(present, rng, DataConfig(canonical_order_prob=1.0)) for _ in range(200)]
    assert all(ctx == present[:len(ctx)] and tgt == present[len(ctx)] for ctx, tgt in canon)
    assert {len(ctx) for ctx, _ in canon} == {1, 2, 3}
    mixed = [draft_pair(present, rng, DataConfig(canonical_order_prob=0.0)) for _ in range(400)]
    assert all(tgt not in ctx and len(set(ctx)) == len(ctx) for ctx, tgt in mixed)
    assert {tgt for _, tgt in mixed} == set(present)
    with pytest.raises(ValueError, match="at least 2"):
        draft_pair(("t1",), rng, DataConfig())
