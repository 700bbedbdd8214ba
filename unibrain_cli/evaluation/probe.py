"""Conditioning probe: does the generation expert use its input image?

For each slice holding both the input and the target modality, the target's clean latent tokens
``x0`` are noised at fixed flow times (``x_t = (1 - t) x0 + t eps``, same ``eps`` for every
context) and the model's velocity is compared with ``eps - x0`` (the training objective) under
three contexts, each followed by the evaluation instruction:

- ``own``: the slice's own input image (clean VAE + ViT views);
- ``other``: the input image of another slice of the split (the next one, cyclically);
- ``none``: no image at all.

A model that uses its conditioning has ``own < other`` (and ``own < none``); a model that only
learned an unconditional prior of the targets has all three about equal.

The same question in image terms: ``psnr_<context>`` is the PSNR (dB, full field, [0, 1]) of the
model's one-step estimate of the clean target from pure noise, ``x0 = eps - v(eps, t=1)`` decoded
and zeroed outside the brain as imputation does (its conditional mean, the best a single image
can score on PSNR; comparable with Table 2's full-field PSNR). ``psnr_own`` well above
``psnr_other`` means the image it would generate depends on the input it was given.

Used to diagnose the demo model (README); run it as

    python -m unibrain_cli.evaluation.probe RUN SLICES [--split test] [--input t1] [--target t2]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from unibrain_cli.data import templates
from unibrain_cli.evaluation.metrics import psnr
from unibrain_cli.evaluation.slices_data import SliceDataset
from unibrain_cli.inference.checkpoint import load_for_inference
from unibrain_cli.inference.diagnose import engine_for
from unibrain_cli.modalities import MODALITIES, parse_modality

CONTEXTS: tuple[str, ...] = ("own", "other", "none")


@torch.no_grad()
def conditioning_probe(
    ckpt: str | Path,
    slices: str | Path,
    split: str = "test",
    source: str = "t1",
    target: str = "t2",
    times: Sequence[float] = (0.3, 0.6, 0.9),
    max_slices: int = 12,
    seed: int = 0,
) -> dict[str, float | int]:
    """Mean velocity MSE of ``target`` per context, the mean one-step PSNR per context
    (``psnr_own`` ...; see the module docstring) and ``n`` slices.

    Evaluation slices (``is_eval``) of ``split`` that hold both modalities, at most ``max_slices``;
    needs at least 2 (the ``other`` context). Deterministic for a given ``seed``.
    """
    src, tgt = parse_modality(source), parse_modality(target)
    engine = engine_for(load_for_inference(ckpt))
    ds = SliceDataset(slices, split=split, is_eval=True, require=(src, tgt))
    n = min(len(ds), max_slices)
    if n < 2:
        raise ValueError(f"the {split} split has {n} evaluation slice(s) with {src} and {tgt}; need at least 2")
    si, ti = MODALITIES.index(src), MODALITIES.index(tgt)
    instruction = templates.instruction_for([src], tgt)
    g = torch.Generator().manual_seed(seed)
    g_pure = torch.Generator().manual_seed(seed + 1)
    errors: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    scores: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    for i in range(n):
        item, other = ds[i], ds[(i + 1) % n]
        x0 = engine.encode(torch.from_numpy(item["images"][ti])[None], [tgt])[0].vae_tokens
        noise = [torch.randn(x0.shape, generator=g) for _ in times]
        pure = torch.randn(x0.shape, generator=g_pure)
        brain = torch.from_numpy(item["brain"].astype("float32"))
        images = {"own": item["images"][si], "other": other["images"][si], "none": None}
        for name in CONTEXTS:
            ctx = engine.new_context()
            if images[name] is not None:
                engine.add_images(ctx, engine.encode(torch.from_numpy(images[name])[None], [src]))
            engine.add_text(ctx, instruction)
            for t, eps in zip(times, noise, strict=True):
                v = engine.velocity(ctx, (1 - t) * x0 + t * eps, t, tgt)
                errors[name].append(float(((v - (eps - x0)) ** 2).mean()))
            mean = engine.decode([pure - engine.velocity(ctx, pure, 1.0, tgt)], engine.latent_grid)[0].float() * brain
            scores[name].append(psnr(mean.clamp(0, 1).numpy(), item["images"][ti]))
    return {**{c: sum(v) / len(v) for c, v in errors.items()},
            **{f"psnr_{c}": sum(v) / len(v) for c, v in scores.items()}, "n": n}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m unibrain_cli.evaluation.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("slices")
    ap.add_argument("--split", default="test")
    ap.add_argument("--input", default="t1")
    ap.add_argument("--target", default="t2")
    ap.add_argument("--max-slices", type=int, default=12)
    a = ap.parse_args(argv)
    res = conditioning_probe(a.ckpt, a.slices, a.split, a.input, a.target, max_slices=a.max_slices)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
