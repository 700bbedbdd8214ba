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
and zeroed outside the slice's own INPUT mask as evaluation does (its conditional mean, the best a
single image can score on PSNR; comparable with Table 2's full-field PSNR). The mask is
:func:`~unibrain_cli.data.slicing.slice_brain_mask` of the slice's own input image, the same in all
three contexts (so they differ only in what the model is given) and never derived from the target.
``psnr_own`` well above ``psnr_other`` means the image it would generate depends on the input it
was given: ``conditioning_gap_db = psnr_own - psnr_other``.

The one-step estimate is the model's conditional MEAN latent, decoded; the autoencoder scores a
decoded mean latent lower than the mean of decoded images (README, seventh session). So the probe
also samples one image per context the way ``impute`` does (:func:`~unibrain_cli.inference.engine.
generate_modality`: the recipe's sampler, no thinking, the same noise in all three contexts, zeroed
outside the input mask): ``psnr_sampled_<context>`` and ``sampled_gap_db`` (own - other).

:func:`probe_slices` runs it on an already-loaded engine and in-memory slices (``unibrain
evaluate`` reports it under Table 2); :func:`conditioning_probe` loads a checkpoint and a slices
folder.

Used to diagnose the demo model (README); run it as

    python -m unibrain_cli.evaluation.probe RUN SLICES [--split test] [--input t1] [--target t2]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unibrain_cli.data import templates
from unibrain_cli.data.slices_data import SliceDataset
from unibrain_cli.data.slicing import slice_brain_mask
from unibrain_cli.evaluation.metrics import psnr
from unibrain_cli.inference.checkpoint import load_for_inference
from unibrain_cli.inference.diagnose import engine_for
from unibrain_cli.inference.engine import Engine, generate_modality
from unibrain_cli.modalities import MODALITIES, parse_modality

CONTEXTS: tuple[str, ...] = ("own", "other", "none")
#: Flow times of the velocity errors.
TIMES: tuple[float, ...] = (0.3, 0.6, 0.9)
#: Default cap on the probed slices (cost: 3 contexts x (len(TIMES) + 1) velocity forwards each).
MAX_SLICES = 12


@torch.no_grad()
def probe_slices(
    engine: Engine,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    source: str = "t1",
    target: str = "t2",
    times: Sequence[float] = TIMES,
    seed: int = 0,
) -> dict[str, float | int]:
    """The probe on in-memory slices with an already-loaded engine.

    ``pairs``: per slice (input image of ``source``, image of ``target``), each float [S, S] in
    [0, 1]; the ``other`` context of slice i is the input of slice i + 1 (cyclically), so at least 2
    are needed (ValueError otherwise). Returns the mean velocity MSE per context (``own``,
    ``other``, ``none``), the mean one-step PSNR per context (``psnr_own`` ..., dB),
    ``conditioning_gap_db`` (``psnr_own - psnr_other``), the PSNR of one sampled image per context
    (``psnr_sampled_own`` ...; the same noise in every context) and ``sampled_gap_db``, and ``n``.
    Deterministic for a ``seed``
    (noise from CPU generators, whatever the engine's device).
    """
    src, tgt = parse_modality(source), parse_modality(target)
    n = len(pairs)
    if n < 2:
        raise ValueError(f"{n} slice(s) with {src} and {tgt}; need at least 2")
    instruction = templates.instruction_for([src], tgt)
    g = torch.Generator().manual_seed(seed)
    g_pure = torch.Generator().manual_seed(seed + 1)
    errors: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    scores: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    sampled: dict[str, list[float]] = {c: [] for c in CONTEXTS}
    for i, (own_src, own_tgt) in enumerate(pairs):
        x0 = engine.encode(torch.from_numpy(np.asarray(own_tgt, np.float32))[None], [tgt])[0].vae_tokens.float().cpu()
        noise = [torch.randn(x0.shape, generator=g) for _ in times]
        pure = torch.randn(x0.shape, generator=g_pure)
        mask = torch.from_numpy(slice_brain_mask(np.asarray(own_src)[None]).astype(np.float32))
        images = {"own": own_src, "other": pairs[(i + 1) % n][0], "none": None}
        for name in CONTEXTS:
            encoded = ([] if images[name] is None
                       else engine.encode(torch.from_numpy(np.asarray(images[name], np.float32))[None], [src]))
            ctx = engine.new_context()
            if encoded:
                engine.add_images(ctx, encoded)
            engine.add_text(ctx, instruction)
            for t, eps in zip(times, noise, strict=True):
                v = engine.velocity(ctx, (1 - t) * x0 + t * eps, t, tgt).cpu()
                errors[name].append(float(((v - (eps - x0)) ** 2).mean()))
            est = pure - engine.velocity(ctx, pure, 1.0, tgt).cpu()
            mean = engine.decode([est], engine.latent_grid)[0].float().cpu() * mask
            scores[name].append(psnr(mean.clamp(0, 1).numpy(), np.asarray(own_tgt)))
            image, _ = generate_modality(engine, engine.start(encoded), [src], tgt, torch.Generator().manual_seed(seed + 2 + i), 0,
                                         brain=mask)
            sampled[name].append(psnr(image.clamp(0, 1).numpy(), np.asarray(own_tgt)))
    out: dict[str, float | int] = {**{c: sum(v) / len(v) for c, v in errors.items()},
                                   **{f"psnr_{c}": sum(v) / len(v) for c, v in scores.items()},
                                   **{f"psnr_sampled_{c}": sum(v) / len(v) for c, v in sampled.items()}}
    out["conditioning_gap_db"] = float(out["psnr_own"]) - float(out["psnr_other"])
    out["sampled_gap_db"] = float(out["psnr_sampled_own"]) - float(out["psnr_sampled_other"])
    out["n"] = n
    return out


def conditioning_probe(
    ckpt: str | Path,
    slices: str | Path,
    split: str = "test",
    source: str = "t1",
    target: str = "t2",
    times: Sequence[float] = TIMES,
    max_slices: int = MAX_SLICES,
    seed: int = 0,
) -> dict[str, float | int]:
    """:func:`probe_slices` of a checkpoint on the evaluation slices (``is_eval``) of ``split`` that
    hold both modalities, at most ``max_slices`` (index order); needs at least 2."""
    src, tgt = parse_modality(source), parse_modality(target)
    engine = engine_for(load_for_inference(ckpt))
    ds = SliceDataset(slices, split=split, is_eval=True, require=(src, tgt))
    n = min(len(ds), max_slices)
    if n < 2:
        raise ValueError(f"the {split} split has {n} evaluation slice(s) with {src} and {tgt}; need at least 2")
    si, ti = MODALITIES.index(src), MODALITIES.index(tgt)
    pairs = [(img[si], img[ti]) for img in (ds.arrays(i)["images"] for i in range(n))]
    return probe_slices(engine, pairs, src, tgt, times, seed)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m unibrain_cli.evaluation.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("slices")
    ap.add_argument("--split", default="test")
    ap.add_argument("--input", default="t1")
    ap.add_argument("--target", default="t2")
    ap.add_argument("--max-slices", type=int, default=MAX_SLICES)
    a = ap.parse_args(argv)
    res = conditioning_probe(a.ckpt, a.slices, a.split, a.input, a.target, max_slices=a.max_slices)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
