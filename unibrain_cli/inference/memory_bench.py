"""Memory and time of a BAGEL-7B-MoT-width model in each ``--dtype`` / ``--quantize`` / ``--offload`` mode.

A folder in the released / BAGEL layout (``ema.safetensors`` in bf16 with BAGEL's key names and
the two position tables, ``llm_config.json``, ``vit_config.json``, a Qwen2-style tokenizer with
the protocol's special tokens, ``ae.safetensors`` of the FLUX autoencoder) is written with
random weights at the widths of ``recipes/bagel-7b.toml`` (hidden 3584, 28 / 4 heads, MLP 18944,
vocab 152064, ViT 1152) but few layers (:func:`write_bagel_width_folder`; the tensors are
generated and written one at a time, so writing it never holds the model). Each mode then runs in
its own process (``python -m unibrain_cli.inference.memory_bench run``) so that its peak resident
memory is its own: load the folder with the released loader, generate one image with the
released imputation protocol (CFG contexts included), report seconds and memory as JSON.

:func:`projection` turns the measured numbers into the full model's (28 LLM / 26 ViT layers):
it is arithmetic on measured per-layer bytes, a projection and never a measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unibrain_cli.config.components import ModelConfig
from unibrain_cli.config.loader import load_recipe
from unibrain_cli.model.checkpoint import (
    BAGEL_LLM_CONFIG,
    BAGEL_VIT_CONFIG,
    BAGEL_WEIGHTS,
    VAE_FILE,
    bagel_config_jsons,
    build_model,
)
from unibrain_cli.model.memory import MemoryOptions, decoder_layers, module_bytes, tensor_bytes

#: mode name -> (--dtype, --quantize, --offload)
MODES: dict[str, MemoryOptions] = {
    "fp32": MemoryOptions(dtype="fp32"),
    "bf16": MemoryOptions(dtype="bf16"),
    "int8": MemoryOptions(dtype="fp32", quantize="int8"),
    "disk_fp32": MemoryOptions(dtype="fp32", offload="disk"),
    "disk_bf16": MemoryOptions(dtype="bf16", offload="disk"),
}
FULL_LLM_LAYERS = 28
FULL_VIT_LAYERS = 26
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>"]


def bagel_width_config(llm_layers: int = 2, vit_layers: int = 2) -> ModelConfig:
    """The ``bagel-7b`` recipe's model with ``llm_layers`` decoder and ``vit_layers`` ViT layers."""
    cfg = load_recipe("bagel-7b").model
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=llm_layers),
                               vit=dataclasses.replace(cfg.vit, num_layers=vit_layers),
                               activation_checkpointing=False)


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], fill: Any,
                                dtype: torch.dtype = torch.bfloat16) -> int:
    """Write a safetensors file tensor by tensor: ``fill(name, shape)`` returns each tensor (in ``dtype``).

    The format: 8-byte little-endian header length, the JSON header (dtype, shape, data offsets;
    padded with spaces to 8 bytes), then the raw little-endian bytes. Returns the file size.
    """
    code = {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            t = fill(name, shape).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.view(torch.int16 if size == 2 else torch.int32).numpy().data)
    return 8 + len(raw) + offset


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little"))
    if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
        return torch.ones(shape)
    if len(shape) == 1:
        return torch.zeros(shape)
    std = 0.05 if name.startswith("llm2vae") else 0.02
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (1 << 24) // int(np.prod(shape[1:])))
    for r in range(0, shape[0], rows):  # chunks: a 152064 x 3584 table never exists in float32
        chunk = torch.randn((min(rows, shape[0] - r), *shape[1:]), generator=g) * std
        out[r:r + chunk.shape[0]] = chunk.to(torch.bfloat16)
    return out


def write_bagel_width_folder(folder: Path, llm_layers: int = 2, vit_layers: int = 2, seed: int = 0) -> dict[str, Any]:
    """Write a random BAGEL-width model in the released / BAGEL layout (see the module docstring)."""
    return write_bagel_folder(folder, bagel_width_config(llm_layers, vit_layers), seed) | {
        "llm_layers": llm_layers, "vit_layers": vit_layers}


def write_bagel_folder(folder: Path, cfg: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """Write a random model of ``cfg`` (BAGEL conventions: q/k norm, untied head, latent patch 2,
    latent table 64) as a complete released / BAGEL folder, one tensor at a time: ``ema.safetensors``
    in bf16 (linear weights N(0, 0.02), ``llm2vae`` N(0, 0.05), unit norms, zero biases, the sin-cos
    position tables), the two json configs, a Qwen2-style tokenizer with the protocol's special
    tokens (after a byte-level BPE of at most 300 ids) and a random ``ae.safetensors`` of ``cfg.vae``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from unibrain_cli.model.embeddings import PositionEmbedding
    from unibrain_cli.model.vae import AutoEncoder
    from unibrain_cli.released.folder import QWEN2_PRETOKENIZE_REGEX

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    tables = {"latent_pos_embed.pos_embed": PositionEmbedding(cfg.max_latent_size, cfg.llm.hidden_size).pos_embed,
              "vit_pos_embed.pos_embed": PositionEmbedding(cfg.vit_max_num_patch_per_side, cfg.llm.hidden_size).pos_embed}
    shapes.update({k: tuple(v.shape) for k, v in tables.items()})
    nbytes = write_safetensors_streaming(
        folder / BAGEL_WEIGHTS, shapes, lambda n, s: tables[n] if n in tables else _random_tensor(n, s, seed))
    llm_json, vit_json = bagel_config_jsons(cfg)
    (folder / BAGEL_LLM_CONFIG).write_text(json.dumps(llm_json, indent=2) + "\n")
    (folder / BAGEL_VIT_CONFIG).write_text(json.dumps(vit_json, indent=2) + "\n")
    torch.manual_seed(seed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in AutoEncoder(cfg.vae).state_dict().items()}, str(folder / VAE_FILE))
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["Translate the attached MRI into its T2-FLAIR image.", "t2w t1c t2f T1 T2"] * 4,
                            trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    return {"folder": str(folder), "ema_safetensors_bytes": nbytes}


def _status_mb() -> dict[str, float]:
    """VmHWM (peak resident), VmRSS, RssAnon, RssFile of this process, MiB (Linux /proc)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        out["VmHWM"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def run_mode(folder: str | Path, mode: str, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Load ``folder`` in ``mode`` (:data:`MODES`) and generate one image; seconds and memory (this process)."""
    from unibrain_cli.released.engine import ReleasedEngine, run_generation
    from unibrain_cli.released.folder import resolve_released
    from unibrain_cli.released.impute import load_bundle

    opts = MODES[mode]
    base = _status_mb()
    t0 = time.perf_counter()
    bundle = load_bundle(resolve_released(folder), "cpu", opts)
    load_s = time.perf_counter() - t0
    after_load = _status_mb()
    model = bundle.model
    layers = decoder_layers(model)
    layer_bytes = module_bytes(layers[0])
    resident_total = module_bytes(model)
    vit_layers = model.vit_model.vision_model.encoder.layers
    rgb = np.zeros((256, 256, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:256, :256]
    rgb[((yy - 128) ** 2 + (xx - 128) ** 2) < 90**2] = 180  # a disc: something for the VAE to encode
    engine = ReleasedEngine(model, bundle.vae, bundle.tokenizer)
    t0 = time.perf_counter()
    result = run_generation(engine, [rgb], "t2", [torch.Generator().manual_seed(seed)], steps=steps)
    gen_s = time.perf_counter() - t0
    image = result.image
    streamer = getattr(model, "layer_streamer", None)
    return {
        "mode": mode, "options": opts.to_dict(), "euler_steps": steps,
        "load_s": round(load_s, 2), "generate_s_per_image": round(gen_s, 2),
        "rss_before_load_mb": base, "rss_after_load_mb": after_load, "rss_end_mb": _status_mb(),
        "peak_rss_mb": _status_mb().get("VmHWM"),
        "resident_weight_bytes": {"total": resident_total, "decoder_layer_0": layer_bytes,
                                  "vit_layer_0": module_bytes(vit_layers[0]),
                                  "autoencoder": module_bytes(bundle.vae),
                                  "embed_tokens": tensor_bytes(model.language_model.model.embed_tokens.weight),
                                  "lm_head": tensor_bytes(model.language_model.lm_head.weight)},
        "streamed_layer_loads": streamer.loads if streamer is not None else 0,
        "image_sha256": hashlib.sha256(image.tobytes()).hexdigest()[:16],
        "image_mean": float(image.mean()),
    }


def projection(measured: dict[str, Any], llm_layers: int, vit_layers: int, file_layer_bytes: int,
               full_llm: int = FULL_LLM_LAYERS, full_vit: int = FULL_VIT_LAYERS) -> dict[str, Any]:
    """Peak memory of the full model (``full_llm`` decoder / ``full_vit`` ViT layers) projected from a
    run with fewer layers: measured peak + the missing layers' resident bytes (0 for streamed
    decoder layers) + their share of the KV cache. Arithmetic, not a measurement."""
    w = measured["resident_weight_bytes"]
    streamed = measured["options"]["offload"] != "none"
    layer = 0 if streamed else w["decoder_layer_0"]
    extra_layers = (full_llm - llm_layers) * layer + (full_vit - vit_layers) * w["vit_layer_0"]
    # KV cache of one generated image (3 CFG contexts of ~610 tokens, 4 kv heads x 128, K and V)
    elt = 2 if measured["options"]["dtype"] == "bf16" else 4
    kv = (full_llm - llm_layers) * 3 * 610 * 2 * 4 * 128 * elt
    gib = 1024**3
    peak = measured["peak_rss_mb"] * 1024**2 + extra_layers + kv
    return {
        "projected_peak_gib": round(peak / gib, 2),
        "decoder_layers_resident_gib": round(full_llm * layer / gib, 2),
        "per_decoder_layer_gib": round(w["decoder_layer_0"] / gib, 3),
        "streamed_layer_file_gib": round(file_layer_bytes / gib, 3) if streamed else None,
        "method": f"measured peak with {llm_layers} LLM / {vit_layers} ViT layers + {full_llm - llm_layers} x "
                  f"resident bytes of one decoder layer + {full_vit - vit_layers} x one ViT layer + KV cache of "
                  "the extra layers (3 x 610 tokens); a projection, not a measurement",
    }


def full_model_weight_bytes(cfg: ModelConfig | None = None) -> dict[str, dict[str, float]]:
    """Bytes of the weights of the full ``bagel-7b`` model by part and mode, from parameter counts.

    Modes: ``bf16``, ``fp32``; ``int8`` (torchao weight-only: 1 byte per decoder linear weight + a
    float32 scale and an int8 zero point per output row; the rest bf16); ``nf4`` (bitsandbytes:
    half a byte per decoder linear weight + a float32 absmax per block of 64; the rest bf16);
    ``bf16_offload`` (what stays on the device when the decoder layers are offloaded: all but the
    layers, plus one layer in flight). GiB; arithmetic on counts, not a measurement.
    """
    cfg = cfg or load_recipe("bagel-7b").model
    model = build_model(cfg, device="meta")
    layers = decoder_layers(model)
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    rows = sum(m.weight.shape[0] for m in layers.modules() if isinstance(m, torch.nn.Linear))
    layer_all = sum(p.numel() for p in layers.parameters())
    other_layer = layer_all - linear  # biases and norms
    rest = sum(p.numel() for p in model.parameters()) - layer_all
    tables = model.latent_pos_embed.pos_embed.numel() + model.vit_pos_embed.pos_embed.numel()
    from unibrain_cli.model.vae import AutoEncoder

    with torch.device("meta"):
        vae = sum(p.numel() for p in AutoEncoder(cfg.vae).parameters())
    gib = 1024**3
    n_layers = cfg.llm.num_layers
    out: dict[str, dict[str, float]] = {}
    for mode, layer_bytes, elt in [
        ("fp32", 4 * layer_all, 4), ("bf16", 2 * layer_all, 2),
        ("int8", linear + 5 * rows + 2 * other_layer, 2), ("nf4", 0.5 * linear + 4 * linear / 64 + 2 * other_layer, 2),
        ("bf16_offload", 2 * layer_all / n_layers, 2),
    ]:
        out[mode] = {"decoder_layers_gib": round(layer_bytes / gib, 2), "rest_gib": round(elt * (rest + tables) / gib, 2),
                     "autoencoder_gib": round(elt * vae / gib, 2),
                     "total_gib": round((layer_bytes + elt * (rest + tables + vae)) / gib, 2)}
    return out


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="one memory-bench mode in this process (for make bench)")
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("write")
    w.add_argument("--folder", required=True)
    w.add_argument("--llm-layers", type=int, default=2)
    w.add_argument("--vit-layers", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("--folder", required=True)
    r.add_argument("--mode", choices=sorted(MODES), required=True)
    r.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what == "write":
        print(json.dumps(write_bagel_width_folder(Path(args.folder), args.llm_layers, args.vit_layers)))
    else:
        print(json.dumps(run_mode(args.folder, args.mode, args.steps)))


if __name__ == "__main__":
    _main()
