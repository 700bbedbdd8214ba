"""Inference benchmarks and the random-initialised checkpoint they (and the tests) run on.

:func:`bench_impute_cache` times the interleaved protocol on one slice — 3 imputed modalities
with thinking, then the impression/diagnosis answer — with the KV cache against recomputing
the whole context at every query (every Euler step and every generated token). Results are a
dict (``make bench`` collects it); nothing here is asserted on time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unibrain_cli.config.loader import load_recipe, recipe_to_dict
from unibrain_cli.data import templates
from unibrain_cli.data.tokenizer import train_bpe
from unibrain_cli.inference.checkpoint import InferenceBundle, load_for_inference
from unibrain_cli.inference.engine import Engine, impute_chain
from unibrain_cli.modalities import DISEASES, MODALITIES
from unibrain_cli.model.checkpoint import build_model, save_pretrained
from unibrain_cli.model.vae import AutoEncoder


def tokenizer_corpus() -> list[str]:
    """Protocol sentences (instructions, planning, questions, answers) for a small BPE."""
    texts = [templates.both_question(), templates.impression_question(), templates.diagnosis_question()]
    for i, target in enumerate(MODALITIES[1:], start=1):
        texts += [templates.instruction_for(MODALITIES[:i], target), templates.planning_sentence(MODALITIES[:i], target)]
    texts += [templates.format_answer("both", "A lesion in the left frontal lobe with surrounding oedema.",
                                      templates.diagnosis_phrase([d])) for d in DISEASES]
    return texts * 3


def make_random_checkpoint(
    folder: str | Path, recipe: str = "tiny", seed: int = 0, velocity_std: float = 0.05, vocab_size: int | None = None
) -> Path:
    """Save a random-initialised model folder (model + VAE + tokenizer + recipe) for tests and benchmarks.

    ``llm2vae`` is zero at init (no velocity at all); it is drawn from N(0, velocity_std) so
    that sampling does something. The tokenizer is a BPE on :func:`tokenizer_corpus`.
    """
    r = load_recipe(recipe)
    torch.manual_seed(seed)
    model = build_model(r.model)
    torch.nn.init.normal_(model.llm2vae.weight, std=velocity_std)
    vae = AutoEncoder(r.model.vae)
    tok = train_bpe(tokenizer_corpus(), min(vocab_size or r.model.llm.vocab_size, r.model.llm.vocab_size))
    return save_pretrained(model, folder, tokenizer=tok, vae=vae, extra_config={"recipe": recipe_to_dict(r)})


def _time_chain(engine: Engine, image: torch.Tensor, targets: Sequence[str], tokens: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        impute_chain(engine, {"t1": image}, targets, seed=0, thinking_tokens=tokens, answer_tokens=tokens)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_impute_cache(
    bundle: InferenceBundle | None = None,
    targets: Sequence[str] = ("t2", "flair", "t1ce"),
    text_tokens: int = 32,
    repeats: int = 2,
    workdir: str | Path | None = None,
    recipe: str = "tiny",
) -> dict[str, Any]:
    """Seconds per case (one slice, ``targets`` imputed + answer) with and without the KV cache.

    Without ``bundle`` a random checkpoint of ``recipe`` is made in ``workdir`` (a temp folder by
    default). Text is bounded to ``text_tokens`` per segment (greedy decoding of a random model
    rarely stops early, so both runs decode the same number of tokens). Also times the cached
    chain for 1..4 targets (the protocol's cost should grow linearly with the chain).
    """
    import tempfile

    if bundle is None:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            bundle = load_for_inference(make_random_checkpoint(Path(tmp) / "ckpt", recipe))
    size = bundle.image_size
    image = torch.rand(size, size, generator=torch.Generator().manual_seed(0))
    engines = {
        cached: Engine(bundle.model, bundle.vae, bundle.tokenizer, bundle.recipe.flow, size,
                       bundle.recipe.data.max_text_tokens, cached=cached)
        for cached in (True, False)
    }
    cached_s = _time_chain(engines[True], image, targets, text_tokens, repeats)
    full_s = _time_chain(engines[False], image, targets, text_tokens, repeats)
    chain = ("t2", "flair", "t1ce", "dwi")
    per_length = {n: round(_time_chain(engines[True], image, chain[:n], text_tokens, repeats), 4) for n in range(1, 5)}
    return {
        "model_params": sum(p.numel() for p in bundle.model.parameters()),
        "image_size": size,
        "sample_steps": bundle.recipe.flow.sample_steps,
        "targets": list(targets),
        "text_tokens": text_tokens,
        "cached_s_per_case": round(cached_s, 4),
        "recompute_s_per_case": round(full_s, 4),
        "speedup": round(full_s / cached_s, 2),
        "cached_s_by_num_targets": per_length,
    }


def bench_volume(ckpt: str | Path, t1: str | Path, out: str | Path, batch_size: int, thinking_tokens: int,
                 targets: Sequence[str] = ("t2",)) -> dict[str, Any]:
    """Impute ``targets`` for every brain slice of the T1 volume ``t1``: seconds and this process's
    peak resident memory (run it in a fresh process per mode, see ``python -m
    unibrain_cli.inference.bench volume``)."""
    import resource

    from unibrain_cli.inference.impute import impute
    from unibrain_cli.inference.inputs import resolve_inputs

    bundle = load_for_inference(ckpt)
    spec = resolve_inputs(f"t1={t1}", None, None, None)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = impute(spec, list(targets), None, Path(out), slices="all", bundle=bundle, thinking_tokens=thinking_tokens,
                 answer_tokens=0, batch_size=batch_size)
    sec = time.perf_counter() - t0
    return {"batch_size": batch_size, "slices": len(res.slices), "seconds": round(sec, 2),
            "generate_s": res.timings["generate"], "seconds_per_slice": round(sec / max(len(res.slices), 1), 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_load_mb": round(rss_loaded, 1)}


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="one full-volume imputation in this process (for make bench)")
    parser.add_argument("what", choices=["volume"])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--t1", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--thinking", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(bench_volume(args.ckpt, args.t1, args.out, args.batch_size, args.thinking)))


if __name__ == "__main__":
    _main()
