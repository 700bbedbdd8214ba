"""Step-time benchmark of the unified and dhs training steps (``make bench``).

One interleaved sample with four modalities (one input, three generated targets, thinking before
each, impression + diagnosis tail) on a freshly initialised model of a recipe (``small`` by
default), random smooth images, no dataset needed. A *step* is the training module's forward
(for dhs: the no-grad KV-cache rollout with ``stage.dhs_rollout_steps`` Euler steps per target,
then the packed forward) plus the backward; the optimizer update is excluded (the same for both).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch

from unibrain_cli.config import load_recipe
from unibrain_cli.config.components import Recipe
from unibrain_cli.data.dataflow import SamplePlan, build_plan
from unibrain_cli.data.tokenizer import train_bpe
from unibrain_cli.flow.sampler import timestep_schedule
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.training.materialize import (
    ImageGeometry,
    ImageItem,
    TextIds,
    TrainBatch,
    build_batch,
    plan_items,
)
from unibrain_cli.training.model_init import fresh_model, template_corpus
from unibrain_cli.training.stages.dhs import DHSTrainModule
from unibrain_cli.training.stages.unified import UnifiedTrainModule

BENCH_MODALITIES: tuple[str, ...] = ("t1", "t2", "flair", "t1ce")
BENCH_RECORD: dict[str, Any] = {
    "slice_id": "bench:0", "modalities": "|".join(BENCH_MODALITIES), "diseases": "glioma",
    "impression": "An enhancing mass in the left frontal lobe with surrounding oedema, consistent with glioma.",
    "findings_2d": json.dumps({m: f"{m.upper()} shows a 24 * 19 mm lesion in the left frontal lobe with mass effect."
                               for m in BENCH_MODALITIES}),
}


def four_modality_plan(recipe: Recipe, seed: int = 0) -> SamplePlan:
    """The first plan of the bench record with one input and three targets, thinking and task "both"."""
    cfg = dataclasses.replace(recipe.data, understanding_only_prob=0.0, thinking_prob=1.0, generation_only_prob=0.0,
                              impression_prob=0.0, diagnosis_prob=0.0, visual_dropout=0.0, text_dropout=0.0,
                              modalities=BENCH_MODALITIES)
    for s in range(seed, seed + 10_000):
        plan = build_plan(BENCH_RECORD, np.random.default_rng(s), cfg)
        if len(plan.targets) == 3:
            return plan
    raise RuntimeError("no four-modality plan found")


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """[n, size, size] smooth random images in [0, 1] (blurred noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, size // 4, size // 4), generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return (x - x.amin()) / (x.amax() - x.amin())


def bench_batch(recipe: Recipe, rollout_steps: int = 10, seed: int = 0) -> tuple[TrainBatch, Any]:
    """(micro-batch of the one bench sample, tokenizer) for ``recipe``; flow times at random exit steps."""
    tok = train_bpe([*template_corpus(), BENCH_RECORD["impression"], *json.loads(BENCH_RECORD["findings_2d"]).values()],
                    recipe.model.llm.vocab_size)
    geom = ImageGeometry.from_config(recipe.model, recipe.data.image_size)
    plan = four_modality_plan(recipe, seed)
    items, n_slots = plan_items(plan, BENCH_MODALITIES.index, TextIds(tok, recipe.data.max_text_tokens), 0)
    g = torch.Generator().manual_seed(seed)
    exit_steps = torch.randint(0, rollout_steps, (n_slots,), generator=g)
    times = timestep_schedule(rollout_steps, recipe.flow.sample_timestep_shift)[exit_steps]
    noise = torch.randn((n_slots, geom.vae_image_tokens, geom.latent_dim), generator=g)
    batch = build_batch([items], smooth_images(len(BENCH_MODALITIES), recipe.data.image_size, seed), geom,
                        (tok.image_start_id, tok.image_end_id), times, noise, exit_steps)
    return batch, tok


def _time_step(module: torch.nn.Module, batch: TrainBatch, repeats: int) -> float:
    """Median seconds of forward + backward."""
    times = []
    for i in range(repeats + 1):
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        module(batch)["loss"].backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_stages(recipe_name: str = "small", repeats: int = 3, rollout_steps: int = 10) -> dict[str, float]:
    """Tokens/s and seconds per step of the unified and dhs steps on one 4-modality sample.

    Returns a flat dict: ``unified_s``, ``dhs_s``, ``unified_tokens_per_s``, ``dhs_tokens_per_s``,
    ``dhs_over_unified`` (step-time ratio; target <= 3 with 10 rollout steps), ``tokens`` (pack
    length), ``targets`` (generated images) and ``rollout_steps``.
    """
    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    batch, _ = bench_batch(recipe, rollout_steps)
    geom = ImageGeometry.from_config(recipe.model, recipe.data.image_size)
    model = fresh_model(recipe.model, 0)
    with torch.no_grad():  # a non-zero velocity head, as after training
        torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    vae = AutoEncoder(recipe.model.vae).eval().requires_grad_(False)
    unified = UnifiedTrainModule(model, vae, geom).train()
    dhs = DHSTrainModule(model, vae, geom, rollout_steps=rollout_steps,
                         sample_shift=recipe.flow.sample_timestep_shift).train()
    vae.eval()
    t_uni = _time_step(unified, batch, repeats)
    t_dhs = _time_step(dhs, batch, repeats)
    n = batch.packed.length
    targets = sum(1 for it in batch.samples[0] if isinstance(it, ImageItem) and it.noisy)
    return {"unified_s": t_uni, "dhs_s": t_dhs, "unified_tokens_per_s": n / t_uni, "dhs_tokens_per_s": n / t_dhs,
            "dhs_over_unified": t_dhs / t_uni, "tokens": float(n), "targets": float(targets),
            "rollout_steps": float(rollout_steps)}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_stages(), indent=1))


#: The ``small`` recipe's data flow and model before the 2026-11-30 change (issue 13), as
#: overrides of today's ``small``: the "before" of :func:`bench_flow_signal`.
SMALL_BEFORE: tuple[str, ...] = (
    "data.pack_tokens=1280", "data.generation_only_prob=0.25", "data.impression_prob=0.25",
    "data.diagnosis_prob=0.25", "data.thinking_prob=0.7", "data.generation_thinking_prob=0.7",
    "data.image_free_prob=0.0", "model.aligned_context=off", "model.aligned_draft=0", "data.draft_pairs=0", "model.draft_residual=false",
    "data.draft_flip_prob=0.0", "train.stages.0.recon_loss=l1", "train.stages.0.steps=500", "train.stages.0.batch_size=16",
    "model.llm.hidden_size=384", "model.llm.intermediate_size=1024", "model.llm.num_layers=6",
    "model.llm.num_heads=6", "model.llm.num_kv_heads=2", "model.llm.head_dim=64", "model.vit.patch_size=8",
)


def bench_flow_signal(recipe_name: str = "small", overrides: tuple[str, ...] = (), packs: int = 6,
                      repeats: int = 1, seed: int = 0) -> dict[str, float]:
    """Generation signal per training step: flow-loss target tokens per ``unified`` micro-batch and per second.

    Micro-batches are drawn as the ``unified`` stage draws them (random plans of the 4-modality
    bench record under the recipe's data flow, first-fit packed to ``data.pack_tokens``), each
    timed for forward + backward on a fresh model (random smooth images; no dataset). Returns the
    mean ``tokens`` and ``flow_tokens`` per micro-batch, ``step_s`` (median), ``flow_tokens_per_s``,
    ``samples`` per micro-batch and ``params_m`` (unified model, millions).
    """
    from unibrain_cli.data.dataflow import pack_plans, plan_token_count

    recipe = load_recipe(recipe_name, overrides)
    geom = ImageGeometry.from_config(recipe.model, recipe.data.image_size)
    tok = train_bpe([*template_corpus(), BENCH_RECORD["impression"], *json.loads(BENCH_RECORD["findings_2d"]).values()],
                    recipe.model.llm.vocab_size)
    text = TextIds(tok, recipe.data.max_text_tokens)
    cfg = dataclasses.replace(recipe.data, modalities=BENCH_MODALITIES)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = fresh_model(recipe.model, 0)
    with torch.no_grad():
        torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    vae = AutoEncoder(recipe.model.vae).eval().requires_grad_(False)
    module = UnifiedTrainModule(model, vae, geom).train()
    pixels = smooth_images(len(BENCH_MODALITIES), recipe.data.image_size, seed)
    tokens, flow, secs, samples = [], [], [], []
    for i in range(packs + 1):  # the first pack only warms up (allocator, kernel selection)
        cands, counts = [], []
        while sum(counts) < recipe.data.pack_tokens:
            cands.append(build_plan(BENCH_RECORD, rng, cfg))
            counts.append(plan_token_count(cands[-1], text.length, geom.vit_block_tokens, geom.vae_block_tokens))
        chosen = [cands[i] for i in pack_plans(cands, recipe.data.pack_tokens, counts)[0]]
        items, slot = [], 0
        for plan in chosen:
            its, slot = plan_items(plan, BENCH_MODALITIES.index, text, slot)
            items.append(its)
        times = torch.rand(slot, generator=g)
        noise = torch.randn((slot, geom.vae_image_tokens, geom.latent_dim), generator=g)
        batch = build_batch(items, pixels, geom, (tok.image_start_id, tok.image_end_id), times, noise)
        if i == 0:
            module(batch)["loss"].backward()
            continue
        counts_b = batch.loss_counts()
        tokens.append(batch.packed.length)
        flow.append(counts_b["flow"] + counts_b["sa"])
        samples.append(len(chosen))
        secs.append(_time_step(module, batch, repeats))
    step_s = float(np.median(secs))
    return {"tokens": float(np.mean(tokens)), "flow_tokens": float(np.mean(flow)), "samples": float(np.mean(samples)),
            "step_s": step_s, "flow_tokens_per_s": float(np.sum(flow) / np.sum(secs)),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
