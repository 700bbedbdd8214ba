"""`make gpu-check`: the checks that need a CUDA machine, in one script (never part of CI or `make test`).

    python -m unibrain_cli.gpu_check --out gpu-check.json [--only tests attention ...]

Parts (each catches its own failure and records ``error``, so the JSON is always written):

- ``tests``: the ``gpu``-marked tests (``pytest -m gpu`` in a subprocess), pass/fail/skip counts
  from its JUnit XML.
- ``attention``: flash-attn (when importable) and compiled ``flex_attention`` against SDPA on the
  model's packed masks (a BAGEL-geometry pack: 2 samples, text / clean VAE / ViT / noisy VAE
  splits; 28 query / 4 KV heads of dim 128): max abs difference of the outputs and of the q/k/v
  gradients per backend, in bf16 (and flex in fp32).
- ``throughput``: one bf16 training step (forward + backward under autocast, fp32 weights, no
  optimizer) of the ``small`` recipe model and of a BAGEL-width model (recipes/bagel-7b.toml widths,
  2 LLM and 2 ViT layers, random weights): tokens/s and MFU = model FLOPs / step time / the device's
  dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, null for an unknown device). Model FLOPs: the decoder
  (:func:`~unibrain_cli.model.flops.flops_per_token` with the pack's exact mean attended keys) plus
  the LM head on the rows whose logits are computed; the ViT is not counted.
- ``fsdp``: one FSDP2 (``fully_shard``, one unit per layer like the training plugin) step of the
  ``small`` model in a world-size-1 NCCL process group; skipped with a reason without NCCL.
- ``generate_memory``: ``torch.cuda.max_memory_allocated`` while a random ``small`` checkpoint
  imputes one slice (T1 -> T2, 16 thinking tokens).

The JSON also holds the device name, torch/CUDA versions and a UTC timestamp. Without CUDA the
script prints one line and exits 2, writing nothing. Exit 1 when a part failed, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

FORMAT = "unibrain-gpu-check/1"
NO_CUDA = "no CUDA device: gpu-check needs a CUDA machine"
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Dense (no sparsity) bf16 tensor-core peak in TFLOPS, matched as a case-insensitive substring of the
#: CUDA device name, longest key first (so "H100 PCIe" wins over "H100"; H100/H200 are the SXM parts).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
}

#: Relative tolerance of a backend comparison: max |diff| / max |reference| per tensor.
TOLERANCE: dict[str, float] = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}

PARTS: tuple[str, ...] = ("tests", "attention", "throughput", "fsdp", "generate_memory")


# ---------------------------------------------------------------------------------------------
# arithmetic and JSON assembly (CPU-testable)
# ---------------------------------------------------------------------------------------------


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device from :data:`PEAK_BF16_TFLOPS`, None when unknown."""
    name = device_name.lower()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def step_record(tokens: int, seconds: float, flops: float, peak_flops: float | None) -> dict[str, Any]:
    """Throughput of one training step: ``tokens`` in ``seconds`` doing ``flops`` model FLOPs.

    Returns tokens/s, achieved TFLOP/s and MFU (achieved / ``peak_flops``; None without a peak).
    """
    if tokens <= 0 or seconds <= 0 or flops < 0:
        raise ValueError(f"need tokens > 0, seconds > 0 and flops >= 0, got {tokens}, {seconds}, {flops}")
    achieved = flops / seconds
    return {
        "tokens": int(tokens),
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved / 1e12,
        "peak_bf16_tflops": peak_flops / 1e12 if peak_flops else None,
        "mfu": achieved / peak_flops if peak_flops else None,
    }


def mean_attended_keys(info: Any) -> float:
    """Mean number of keys each query of a :class:`~unibrain_cli.model.attention.MaskInfo` sees."""
    from unibrain_cli.model.attention import dense_mask

    seen = sum(int(dense_mask(info, (qs, qe), (ks, ke)).sum()) for qs, qe, ks, ke in info.segments)
    return seen / info.num_queries


def pack_train_flops(cfg: Any, packed: Any) -> dict[str, Any]:
    """Model FLOPs of one training step (forward + backward) on ``packed``: the decoder per token
    with ``T`` = the pack's mean attended keys (:func:`mean_attended_keys`), plus the LM head on the
    ``ce_indexes`` rows only (``logits_at="loss"``); the ViT and the VAE are not counted."""
    from unibrain_cli.model.flops import flops_per_token

    mean_keys = mean_attended_keys(packed.mask_info())
    per_token = flops_per_token(cfg, seq_len=round(mean_keys), training=True, include_lm_head=False)
    logit_rows = int(packed.ce_indexes.numel())
    head = 6 * cfg.llm.hidden_size * cfg.llm.vocab_size * logit_rows
    return {"tokens": int(packed.length), "mean_attended_keys": mean_keys, "logit_rows": logit_rows,
            "flops": per_token * int(packed.length) + head}


def run_part(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn(*args, **kwargs)`` as a record: its dict with ``ok`` (True unless it says otherwise) and
    ``seconds``; an exception becomes ``ok: False`` with ``error`` ("Type: message") and the
    traceback's last lines."""
    t0 = time.perf_counter()
    try:
        rec: dict[str, Any] = {"ok": True, **fn(*args, **kwargs)}
    except Exception as exc:  # every part records its own failure; the JSON is still written
        rec = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc().strip().splitlines()[-6:]}
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def assemble(env: Mapping[str, Any], parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The gpu-check.json document: format, the environment, ``ok`` (every part ok), ``failed``
    (names of the parts that are not) and the parts. Non-finite floats become None (strict JSON)."""
    failed = [name for name, rec in parts.items() if not rec.get("ok", False)]
    return _json_safe({"format": FORMAT, **env, "ok": not failed, "failed": failed, "parts": dict(parts)})


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def parse_junit(text: str) -> dict[str, int]:
    """Counts of a pytest JUnit XML report: tests, passed, failed, errors, skipped."""
    root = ET.fromstring(text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"]}


# ---------------------------------------------------------------------------------------------
# attention backends
# ---------------------------------------------------------------------------------------------


def random_qkvw(info: Any, heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded CPU float32 q [Nq, heads, D], k, v [Nk, kv_heads, D] and a loss weight w like q."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = info.num_queries, info.num_keys
    return (torch.randn(nq, heads, head_dim, generator=g), torch.randn(nk, kv_heads, head_dim, generator=g),
            torch.randn(nk, kv_heads, head_dim, generator=g), torch.randn(nq, heads, head_dim, generator=g))


def compare_backends(
    info: Any,
    backends: Sequence[str],
    reference: str = "sdpa",
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Each of ``backends`` against ``reference`` on the mask ``info`` (:func:`attend`).

    The same seeded q, k, v (:func:`random_qkvw`, cast to ``dtype`` on ``device``) go through every
    backend; the loss ``sum(out * w)`` is backpropagated. Per backend: ``out_max_abs_diff`` and
    ``grad_{q,k,v}_max_abs_diff`` against the reference, the reference's max magnitudes
    (``*_max_abs_ref``), the relative worst case ``max_rel_diff`` and ``ok`` (within
    :data:`TOLERANCE` of ``dtype``). A backend that fails records ``error`` instead (``ok`` False);
    a failing reference raises.
    """
    from unibrain_cli.model.attention import attend

    q0, k0, v0, w0 = random_qkvw(info, heads, kv_heads, head_dim, seed)
    dev = torch.device(device)
    info = info.to(dev)
    w = w0.to(dev)

    def run(name: str) -> tuple[torch.Tensor, ...]:
        q, k, v = (t.to(device=dev, dtype=dtype).clone().requires_grad_() for t in (q0, k0, v0))
        out = attend(q, k, v, info, backend=name)
        (out.float() * w).sum().backward()
        return tuple(t.detach().float() for t in (out, q.grad, k.grad, v.grad))  # type: ignore[union-attr]

    ref = run(reference)
    tol = TOLERANCE.get(str(dtype).removeprefix("torch."), 1e-4)
    results: dict[str, dict[str, Any]] = {}
    for name in backends:
        try:
            got = run(name)
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            continue
        rec: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "reference": reference}
        rel = 0.0
        for label, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), got, ref, strict=True):
            diff, mag = float((a - b).abs().max()), float(b.abs().max())
            rec[f"{label}_max_abs_diff"], rec[f"{label}_max_abs_ref"] = diff, mag
            rel = max(rel, diff / mag if mag > 0 else diff)
        rec.update(max_rel_diff=rel, tolerance=tol, ok=bool(rel <= tol))
        results[name] = rec
    return results


def part_attention(device: torch.device, samples: int = 2) -> dict[str, Any]:
    """flash (when importable) and flex vs SDPA on a BAGEL-geometry pack's mask (module docstring)."""
    from unibrain_cli.bench import _four_modality_pack
    from unibrain_cli.model.attention import flash_available, flex_available

    recipe, packed = _four_modality_pack("bagel-7b", samples=samples)
    llm = recipe.model.llm
    info = packed.mask_info()
    geometry = {"heads": llm.num_heads, "kv_heads": llm.num_kv_heads, "head_dim": llm.head_dim}
    out: dict[str, Any] = {"tokens": info.num_queries, "samples": samples, **geometry}
    bf16 = [b for b, have in (("flash", flash_available()), ("flex", flex_available())) if have]
    out["bfloat16"] = compare_backends(info, bf16, dtype=torch.bfloat16, device=device, **geometry) if bf16 else {}
    out["float32"] = compare_backends(info, ["flex"], device=device, **geometry) if flex_available() else {}
    if not flash_available():
        out["bfloat16"]["flash"] = {"skipped": "flash-attn is not installed (pip install unibrain[gpu])"}
    results = [r for part in ("bfloat16", "float32") for r in out[part].values() if "skipped" not in r]
    out["ok"] = all(r.get("ok", False) for r in results)
    return out


# ---------------------------------------------------------------------------------------------
# throughput, FSDP, memory
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _loss(out: Any) -> torch.Tensor:
    """A loss touching both heads (as in bench.py): text logits and velocities."""
    return out.logits.float().logsumexp(-1).mean() + out.velocity.float().pow(2).mean()


def bagel_two_layer_config() -> Any:
    """recipes/bagel-7b.toml's model with 2 LLM and 2 ViT layers (every width unchanged)."""
    from unibrain_cli.config import load_recipe

    m = load_recipe("bagel-7b").model
    return dataclasses.replace(m, llm=dataclasses.replace(m.llm, num_layers=2),
                               vit=dataclasses.replace(m.vit, num_layers=2))


def train_step_throughput(cfg: Any, packed: Any, device: torch.device, peak_flops: float | None,
                          repeats: int = 3) -> dict[str, Any]:
    """bf16 (autocast, fp32 weights) forward + backward of ``cfg``'s random model on ``packed``:
    the best of ``repeats`` timed steps after one warm-up, as :func:`step_record` plus peak memory."""
    from unibrain_cli.model.attention import resolve_backend
    from unibrain_cli.model.checkpoint import build_model
    from unibrain_cli.model.flops import count_parameters

    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    model.train()
    packed = packed.to(device)
    backend = resolve_backend("auto", device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(packed, logits_at="loss", velocity_at="noisy", backend=backend)
        _loss(out).backward()
        model.zero_grad(set_to_none=True)

    _reset_peak(device)
    step()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    flops = pack_train_flops(cfg, packed)
    rec = step_record(flops["tokens"], best, flops["flops"], peak_flops)
    rec.update(params_M=count_parameters(model) / 1e6, backend=backend, mean_attended_keys=flops["mean_attended_keys"],
               logit_rows=flops["logit_rows"], peak_allocated_mb=_peak_mb(device),
               step="forward + backward, bf16 autocast, fp32 weights, no optimizer; best of "
                    f"{repeats} after 1 warm-up")
    return rec


def part_throughput(device: torch.device, peak_flops: float | None) -> dict[str, Any]:
    """:func:`train_step_throughput` of ``small`` (8 samples) and of :func:`bagel_two_layer_config`
    (4 samples of the BAGEL geometry); each model records its own error."""
    from unibrain_cli.bench import _four_modality_pack

    small, small_pack = _four_modality_pack("small", samples=8)
    _, bagel_pack = _four_modality_pack("bagel-7b", samples=4)
    out = {"small": run_part(train_step_throughput, small.model, small_pack, device, peak_flops)}
    _release(device)  # the small model is gone with its call
    out["bagel_width_2_layers"] = run_part(train_step_throughput, bagel_two_layer_config(), bagel_pack, device,
                                           peak_flops)
    return {**out, "ok": all(r["ok"] for r in out.values())}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fsdp_step(device: torch.device, backend: str = "nccl", recipe: str = "small") -> dict[str, Any]:
    """One FSDP2 training step (AdamW, grad clip 1.0) of ``recipe``'s random model in a world-size-1
    ``backend`` process group: every layer of each ``layers`` list is a unit, then the whole model
    (the training plugin's wrap policy); bf16 parameters, fp32 gradient reduction on CUDA."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from unibrain_cli.bench import _four_modality_pack
    from unibrain_cli.model.checkpoint import build_model
    from unibrain_cli.training.parallel import layer_lists

    if dist.is_initialized():
        return {"skipped": "a process group is already initialised in this process"}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kwargs)
    try:
        r, packed = _four_modality_pack(recipe)
        torch.manual_seed(0)
        model = build_model(r.model, device=device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        units = 0
        for _, layers in layer_lists(model):
            for layer in layers:
                fully_shard(layer, mp_policy=mp)
                units += 1
        fully_shard(model, mp_policy=mp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = _loss(model(packed.to(device), logits_at="loss", velocity_at="noisy"))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _sync(device)
        seconds = time.perf_counter() - t0
        norm_value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        changed = sum(int(not torch.equal(before[n], p.detach().full_tensor())) for n, p in model.named_parameters())
        loss_value = float(loss.detach())
        ok = math.isfinite(loss_value) and math.isfinite(norm_value) and changed > 0
        return {"ok": ok, "backend": backend, "world_size": dist.get_world_size(), "recipe": recipe,
                "fsdp_units": units, "loss": loss_value, "grad_norm": norm_value,
                "parameters_changed": changed, "parameters": len(before), "step_s": seconds,
                "peak_allocated_mb": _peak_mb(device)}
    finally:
        dist.destroy_process_group()
        _release(device)


def part_fsdp(device: torch.device) -> dict[str, Any]:
    """:func:`fsdp_step` over NCCL, or skipped with the reason NCCL cannot be used."""
    import torch.distributed as dist

    if not dist.is_available():
        return {"skipped": "torch.distributed is not available in this torch build"}
    if not dist.is_nccl_available():
        return {"skipped": "NCCL is not available in this torch build"}
    return fsdp_step(device, "nccl")


def part_generate_memory(device: torch.device, recipe: str = "small", thinking_tokens: int = 16) -> dict[str, Any]:
    """Peak allocated memory while a random ``recipe`` checkpoint imputes one T1 -> T2 slice."""
    from unibrain_cli.inference.bench import make_random_checkpoint
    from unibrain_cli.inference.checkpoint import load_for_inference
    from unibrain_cli.inference.diagnose import engine_for
    from unibrain_cli.inference.engine import impute_chain

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_for_inference(make_random_checkpoint(Path(tmp) / "ckpt", recipe), str(device))
        engine = engine_for(bundle)
        size = bundle.image_size
        image = torch.rand(size, size, generator=torch.Generator().manual_seed(0))
        _sync(device)
        loaded = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        _reset_peak(device)
        t0 = time.perf_counter()
        res = impute_chain(engine, {"t1": image}, ["t2"], seed=0, thinking_tokens=thinking_tokens)
        _sync(device)
        seconds = time.perf_counter() - t0
        peak = _peak_mb(device)
        finite = bool(torch.isfinite(res.images["t2"]).all())
        dtype = str(next(bundle.model.parameters()).dtype).removeprefix("torch.")
        del engine, bundle, res
    _release(device)
    return {"ok": finite, "recipe": recipe, "image_size": size, "dtype": dtype, "thinking_tokens": thinking_tokens,
            "allocated_after_load_mb": loaded, "peak_allocated_mb": peak,
            "generation_extra_mb": peak - loaded if peak is not None and loaded is not None else None,
            "generate_s": seconds}


def part_tests(root: Path = REPO_ROOT, timeout_s: int = 1800) -> dict[str, Any]:
    """``pytest -m gpu`` in ``root`` (a subprocess), counted from its JUnit XML."""
    if not (root / "tests").is_dir():
        return {"ok": False, "error": f"no tests/ folder under {root} (run from a source checkout)"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests"]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False)
        counts = parse_junit(report.read_text()) if report.is_file() else {}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    ok = proc.returncode in (0, 5) and bool(counts) and counts["failed"] == 0 and counts["errors"] == 0
    return {"ok": ok, "command": "python -m pytest -q -m gpu tests", "returncode": proc.returncode, **counts, "output_tail": tail}


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and properties, torch / CUDA / cuDNN / flash-attn versions and a UTC timestamp."""
    props = torch.cuda.get_device_properties(device)
    try:
        import flash_attn  # type: ignore[import-not-found]

        flash = str(getattr(flash_attn, "__version__", "installed"))
    except Exception:
        flash = None
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(name)
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gb": round(props.total_memory / 2**30, 2),
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "flash_attn": flash,
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unibrain_cli.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="JSON report (gpu-check.json)")
    parser.add_argument("--only", nargs="*", choices=PARTS, help="run only these parts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from unibrain_cli.io.atomic import write_text

    device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    peak = peak_bf16_flops(env["device"])
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "tests": lambda: run_part(part_tests),
        "attention": lambda: run_part(part_attention, device),
        "throughput": lambda: run_part(part_throughput, device, peak),
        "fsdp": lambda: run_part(part_fsdp, device),
        "generate_memory": lambda: run_part(part_generate_memory, device),
    }
    parts: dict[str, dict[str, Any]] = {}
    for name, fn in runs.items():
        if args.only and name not in args.only:
            continue
        parts[name] = fn()
        _release(device)
        status = "ok" if parts[name]["ok"] else f"FAILED ({parts[name].get('error', 'see the JSON')})"
        print(f"{name}: {status} [{parts[name]['seconds']:.1f} s]", flush=True)
    doc = assemble(env, parts)
    write_text(args.out, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out} ({'all parts ok' if doc['ok'] else 'failed: ' + ', '.join(doc['failed'])})")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
