"""`make bench`: speed and memory numbers as JSON (never in timed tests).

Each benchmark is a function returning a dict; results of one run are measured side by side
on the same machine, so ratios between them are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHES: dict[str, Callable[[], dict[str, Any]]] = {}


def bench(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def deco(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        BENCHES[name] = fn
        return fn

    return deco


def _best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@bench("matmul_throughput")
def matmul_throughput() -> dict[str, Any]:
    """Peak dense matmul throughput of this machine (the reference for model efficiency)."""
    import torch

    out: dict[str, Any] = {}
    for dtype, n in ((torch.float32, 1024), (torch.bfloat16, 512)):
        out[f"{str(dtype).split('.')[-1]}_n"] = n
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        a @ b
        sec = _best_of(lambda a=a, b=b: [a @ b for _ in range(4)]) / 4
        out[f"{str(dtype).split('.')[-1]}_gflops"] = round(2 * n**3 / sec / 1e9, 2)
    return out


def _peak_gflops() -> dict[str, float]:
    if "matmul_throughput" not in _RESULTS:
        _RESULTS["matmul_throughput"] = matmul_throughput()
    r = _RESULTS["matmul_throughput"]
    return {"float32": r["float32_gflops"], "bfloat16": r["bfloat16_gflops"]}


_RESULTS: dict[str, dict[str, Any]] = {}


def _four_modality_pack(recipe_name: str, samples: int = 1, text_tokens: int = 120):
    """A pack shaped like one unified training sample per ``samples``: 3 input images (clean VAE +
    ViT), instruction + thinking text, one noisy target + its clean copy, impression text."""
    import torch

    from unibrain_cli.config import load_recipe
    from unibrain_cli.model.packing import SequenceBuilder

    recipe = load_recipe(recipe_name)
    m = recipe.model
    lat = recipe.data.image_size // m.vae.downsample // m.latent_patch_size
    vit = recipe.data.image_size // m.vit.patch_size
    ldim = m.latent_patch_size**2 * m.vae.z_channels
    pdim = m.vit.patch_size**2 * m.vit.num_channels
    g = torch.Generator().manual_seed(0)
    b = SequenceBuilder(vit_side=m.vit.max_patches_per_side, latent_side=m.max_latent_size, image_markers=(1, 2))

    def ids(n: int) -> list[int]:
        return torch.randint(5, m.llm.vocab_size, (n,), generator=g).tolist()

    for _ in range(samples):
        b.add_text(ids(8))
        for _ in range(3):
            b.add_vae_image((lat, lat), latents=torch.randn(lat * lat, ldim, generator=g))
            b.add_vit_image((vit, vit), patches=torch.randn(vit * vit, pdim, generator=g))
        b.add_text(ids(text_tokens // 2), loss=True)
        b.add_vae_image((lat, lat), noisy=True, timestep=0.5, latents=torch.randn(lat * lat, ldim, generator=g))
        b.add_vae_image((lat, lat), latents=torch.randn(lat * lat, ldim, generator=g))
        b.add_vit_image((vit, vit), patches=torch.randn(vit * vit, pdim, generator=g))
        b.add_text(ids(text_tokens // 2), loss=True)
        b.next_sample()
    return recipe, b.build()


@bench("model_train_step_small")
def model_train_step_small() -> dict[str, Any]:
    """Forward+backward of the `small` model on one 4-modality sample, vs the matmul peak; fp32 and
    under CPU bf16 autocast, side by side."""
    import torch

    from unibrain_cli.model.checkpoint import build_model
    from unibrain_cli.model.flops import count_parameters, flops_per_token

    recipe, packed = _four_modality_pack("small")
    model = build_model(recipe.model)
    model.train()

    def step(bf16: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(packed, logits_at="loss", velocity_at="noisy")
            loss = out.logits.float().logsumexp(-1).mean() + out.velocity.float().pow(2).mean()
        loss.backward()

    step()
    sec = _best_of(step, repeats=3)
    step(True)
    sec_bf16 = _best_of(lambda: step(True), repeats=3)
    n = packed.length
    flops = flops_per_token(recipe.model, seq_len=n // 2) * n
    achieved = flops / sec / 1e9
    peak = _peak_gflops()
    return {
        "params_M": round(count_parameters(model) / 1e6, 2),
        "tokens": n,
        "step_s": round(sec, 4),
        "tokens_per_s": round(n / sec, 1),
        "achieved_gflops": round(achieved, 2),
        "fraction_of_fp32_matmul_peak": round(achieved / peak["float32"], 3),
        "fraction_of_bf16_matmul_peak": round(achieved / peak["bfloat16"], 3),
        "bf16_autocast_step_s": round(sec_bf16, 4),
        "bf16_autocast_speedup": round(sec / sec_bf16, 2),
        "note": ("step_s: fp32 (train.mixed_precision = 'no', the CPU recipes); bf16_autocast_step_s: the same "
                 f"step under CPU bf16 autocast ('bf16'); bf16 matmul peak / fp32 here "
                 f"{peak['bfloat16'] / peak['float32']:.2f}x (matmul_throughput)"),
    }


@bench("packed_attention")
def packed_attention() -> dict[str, Any]:
    """Per-sample masked SDPA vs one dense mask over the whole pack (forward+backward)."""
    import torch

    from unibrain_cli.model.attention import MaskInfo, attend

    out: dict[str, Any] = {}
    total, heads, dim = 2048, 6, 64
    for samples in (1, 2, 4, 8):
        per = total // samples
        lens, modes, owners = [], [], []
        for s in range(samples):
            for n, mode in ((per // 4, "causal"), (per // 4, "full"), (per // 4, "noise"), (per - 3 * (per // 4), "causal")):
                lens.append(n)
                modes.append(mode)
                owners.append(s)
        info = MaskInfo.from_splits(lens, modes, owners)
        q = torch.randn(total, heads, dim, requires_grad=True)
        k = torch.randn(total, 2, dim, requires_grad=True)
        v = torch.randn(total, 2, dim, requires_grad=True)
        times = {}
        for backend in ("sdpa", "dense"):
            def run(backend: str = backend, q=q, k=k, v=v, info=info) -> None:
                attend(q, k, v, info, backend=backend).sum().backward()
            run()
            times[backend] = _best_of(run, repeats=3)
        out[f"samples_{samples}"] = {"sdpa_ms": round(times["sdpa"] * 1e3, 1), "dense_ms": round(times["dense"] * 1e3, 1),
                                     "speedup": round(times["dense"] / times["sdpa"], 2)}
    return out


@bench("impute_kv_cache")
def impute_kv_cache() -> dict[str, Any]:
    """`small` imputing T2, FLAIR, T1ce of one slice + the impression: KV cache vs full recompute,
    and cached cost for 1..4 imputed modalities (linear, not quadratic)."""
    from unibrain_cli.inference.bench import bench_impute_cache

    return bench_impute_cache(recipe="small", text_tokens=16, repeats=1)


@bench("impute_full_volume")
def impute_full_volume() -> dict[str, Any]:
    """`small` (random weights) imputing T2 for every brain slice of nilearn's MNI152 T1 (2 mm,
    157 slices on the 1 mm grid): one slice at a time vs batched (``--batch-size``), each in a
    fresh process (its own peak resident memory), at two bounds on the thinking text (a random
    model never stops early: 16 tokens, and 48 ~ what the demo model writes per target); the
    batched volume must equal the one-by-one volume."""
    import subprocess
    import sys
    import tempfile

    import nibabel as nib
    import numpy as np
    from nilearn.datasets import load_mni152_template

    from unibrain_cli.inference.bench import make_random_checkpoint
    from unibrain_cli.inference.impute import DEFAULT_BATCH

    out: dict[str, Any] = {"volume": "MNI152 T1 2 mm (nilearn)", "batch_size": DEFAULT_BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        t1 = Path(tmp) / "mni_t1.nii.gz"
        nib.save(load_mni152_template(resolution=2), t1)
        ckpt = make_random_checkpoint(Path(tmp) / "ckpt", "small")
        for thinking in (16, 48):
            runs = {}
            for bs in (1, DEFAULT_BATCH):
                dest = Path(tmp) / f"out_{thinking}_{bs}"
                cmd = [sys.executable, "-m", "unibrain_cli.inference.bench", "volume", "--ckpt", str(ckpt),
                       "--t1", str(t1), "--out", str(dest), "--batch-size", str(bs), "--thinking", str(thinking)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs[bs] = json.loads(done.stdout.strip().splitlines()[-1])
                runs[bs]["volume"] = nib.load(str(dest / "t2_imputed.nii.gz")).get_fdata()
            one, many = runs[1], runs[DEFAULT_BATCH]
            diff = float(np.abs(one.pop("volume") - many.pop("volume")).max())
            out[f"thinking_{thinking}"] = {
                "one_by_one": one, "batched": many, "speedup": round(one["generate_s"] / many["generate_s"], 2),
                "max_abs_diff": diff,
            }
    return out


@bench("evaluate_batch")
def evaluate_batch() -> dict[str, Any]:
    """`evaluate` (every scenario, the chains, answers; `small`, random weights) on the test split of
    a small phantom (40 cases at 2 mm, prepared with ``--spacing 2``, 64-px slices): one slice at a
    time vs ``--batch-size`` 16, side by side; the two must give the same tables. A random model
    never stops its text early, so every thinking and answer runs to its bound (48 / 96 tokens)."""
    import tempfile

    import pandas as pd

    from unibrain_cli.data.phantom import synthesize
    from unibrain_cli.data.prepare import prepare
    from unibrain_cli.data.slicing import make_slices
    from unibrain_cli.evaluation.runner import DEFAULT_BATCH_SIZE
    from unibrain_cli.evaluation.runner import evaluate as run_evaluate
    from unibrain_cli.inference.bench import make_random_checkpoint

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "ph", cases=40, seed=0, resolution=2, workers=2)
        prepare(root / "ph" / "radgenome", root / "prep", images=[root / "ph" / "images"], workers=2, spacing=2.0)
        make_slices(root / "prep", root / "slices", size=64, per_case=1, workers=2)
        ckpt = make_random_checkpoint(root / "ckpt", "small")
        frames = {}
        for bs in (1, DEFAULT_BATCH_SIZE):
            t0 = time.perf_counter()
            res = run_evaluate(ckpt, root / "slices", root / f"eval{bs}", split="test", scenarios="all", chain=True,
                               baselines="none", batch_size=bs)
            out[f"batch_{bs}_s"] = round(time.perf_counter() - t0, 2)
            frames[bs] = [pd.read_csv(root / f"eval{bs}" / f"table{t}_cases.csv") for t in (1, 2)]
            out["cases"] = res.summary["cases"]
        (one1, one2), (many1, many2) = frames[1], frames[DEFAULT_BATCH_SIZE]
        out["table1_rows"] = len(one1)
        out["same_answers_and_classes"] = bool(one1["answer"].fillna("").equals(many1["answer"].fillna(""))
                                               and one1["pred_closed"].equals(many1["pred_closed"]))
        out["table2_psnr_max_abs_diff"] = float((one2["psnr"] - many2["psnr"]).abs().max())
        out["speedup"] = round(out["batch_1_s"] / out[f"batch_{DEFAULT_BATCH_SIZE}_s"], 2)
    return out


@bench("train_stages_small")
def train_stages_small() -> dict[str, Any]:
    """Tokens/s of `unified` and `dhs` (10 rollout steps) steps of `small` on one 4-modality sample."""
    from unibrain_cli.training.bench import bench_stages

    return bench_stages(recipe_name="small", repeats=2, rollout_steps=10)


@bench("flow_signal_small")
def flow_signal_small() -> dict[str, Any]:
    """Flow-loss target tokens per `unified` micro-batch and per second: `small` before issue 13 vs today."""
    from unibrain_cli.training.bench import SMALL_BEFORE, bench_flow_signal

    before = bench_flow_signal("small", SMALL_BEFORE)
    after = bench_flow_signal("small")
    return {"before": before, "after": after,
            "flow_tokens_per_step_ratio": round(after["flow_tokens"] / before["flow_tokens"], 2),
            "flow_tokens_per_s_ratio": round(after["flow_tokens_per_s"] / before["flow_tokens_per_s"], 2),
            "note": "random plans of one 4-modality record, fresh models; 'before' = small.toml of 2026-11-29"}


@bench("draft_step")
def draft_step() -> dict[str, Any]:
    """The `small` draft network (aligned.AlignedDraft, width 192, latent resolution): forward + backward
    + AdamW on 64 pairs, its fine-grid convolutions contiguous vs channels-last, side by side."""
    import torch

    from unibrain_cli.config import load_recipe
    from unibrain_cli.model import aligned
    from unibrain_cli.model.checkpoint import build_model

    recipe = load_recipe("small")
    m = recipe.model
    draft = build_model(m).aligned_context.draft  # the demo model's own draft network
    side = recipe.data.image_size // (2 ** (len(m.vae.ch_mult) - 1) * m.latent_patch_size)  # token grid
    s, d = draft.num_slots, draft.latent_dim
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    stack = torch.randn(64, side * side, s * (d + 1), generator=g)
    slots = torch.randint(0, s, (64,), generator=g)

    def step() -> None:
        opt.zero_grad()
        draft(stack, (side, side), slots).pow(2).mean().backward()
        opt.step()

    out: dict[str, Any] = {}
    saved = aligned.DRAFT_MEMORY_FORMAT
    try:
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            aligned.DRAFT_MEMORY_FORMAT = fmt
            step()
            out[f"{name}_step_s"] = round(_best_of(lambda: [step() for _ in range(10)], repeats=5) / 10, 4)
    finally:
        aligned.DRAFT_MEMORY_FORMAT = saved
    out["speedup"] = round(out["contiguous_step_s"] / out["channels_last_step_s"], 2)
    out["shipped"] = "channels_last" if saved == torch.channels_last else "contiguous"
    return out


@bench("synth_prepare")
def synth_prepare() -> dict[str, Any]:
    """Phantom generation (20 cases at 2 mm) and `prepare` throughput (cases/s, 2 workers), to the
    default 1 mm grid and with ``--spacing 2`` (the demo's choice), side by side."""
    import tempfile

    from unibrain_cli.data.phantom import synthesize
    from unibrain_cli.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synthesize(Path(tmp) / "ph", cases=20, seed=0, resolution=2)
        synth_s = time.perf_counter() - t0
        seconds, results = {}, {}
        for spacing in (1.0, 2.0):
            t0 = time.perf_counter()
            results[spacing] = prepare(Path(tmp) / "ph" / "radgenome", Path(tmp) / f"prep{spacing:g}",
                                       images=[Path(tmp) / "ph" / "images"], workers=2, spacing=spacing)
            seconds[spacing] = time.perf_counter() - t0
    res, prep_s = results[1.0], seconds[1.0]
    return {"synth_20_cases_2mm_s": round(synth_s, 2), "prepare_cases": res.n_prepared,
            "prepare_s": round(prep_s, 2), "prepare_cases_per_s": round(res.n_prepared / prep_s, 3),
            "prepare_spacing2_s": round(seconds[2.0], 2),
            "prepare_spacing2_cases_per_s": round(results[2.0].n_prepared / seconds[2.0], 3),
            "prepare_speedup_spacing2": round(prep_s / seconds[2.0], 2),
            "note": "2 mm phantom volumes resampled to 1 mm by prepare (default) vs kept at 2 mm (--spacing 2)"}


@bench("malloc_data_steps")
def malloc_data_steps() -> dict[str, Any]:
    """`prepare` (to 1 mm) then `slice` of 12 phantom cases at 2 mm through the CLI (2 workers), with
    the CLI's malloc settings (``unibrain_cli.io.allocator``) and with glibc's defaults
    (``UNIBRAIN_TUNE_MALLOC=0``), alternated twice side by side; wall seconds and minor page faults."""
    import resource
    import subprocess
    import sys
    import tempfile

    from unibrain_cli.data.phantom import synthesize

    def run(args: list[str], env: dict[str, str]) -> tuple[float, int]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "unibrain_cli", "--quiet", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "ph", cases=12, seed=0, resolution=2)
        for rep in range(2):
            for mode, extra in (("tuned", {}), ("glibc_default", {"UNIBRAIN_TUNE_MALLOC": "0"})):
                env = {**os.environ, **extra}
                prep, sl = root / f"prep_{mode}_{rep}", root / f"slices_{mode}_{rep}"
                p_s, p_f = run(["prepare", str(root / "ph" / "radgenome"), "--images", str(root / "ph" / "images"),
                                "--out", str(prep), "--workers", "2"], env)
                s_s, s_f = run(["slice", str(prep), "--out", str(sl), "--size", "64", "--per-case", "6",
                                "--workers", "2"], env)
                row = out.setdefault(mode, {"prepare_s": [], "slice_s": [], "prepare_minflt": [], "slice_minflt": []})
                row["prepare_s"].append(round(p_s, 2))
                row["slice_s"].append(round(s_s, 2))
                row["prepare_minflt"].append(p_f)
                row["slice_minflt"].append(s_f)
    best = {m: min(a + b for a, b in zip(out[m]["prepare_s"], out[m]["slice_s"])) for m in out}
    out["speedup_best_of_2"] = round(best["glibc_default"] / best["tuned"], 2)
    out["note"] = "12 cases (1 mm output), process start included; minflt of the whole process tree"
    return out


@bench("resample")
def resample() -> dict[str, Any]:
    """One 2-mm volume (nilearn's MNI152 T1) resampled to 1 mm, what `prepare` does 4-5 times per
    phantom case: SimpleITK's linear interpolation (the general path) vs the torch path that
    ``resample_to`` takes on axis-aligned grids, side by side, one and two threads each."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from nilearn.datasets import load_mni152_template

    from unibrain_cli.io import volume as vm

    t1 = load_mni152_template(resolution=2)
    vol = vm.Volume(np.asarray(t1.dataobj, dtype=np.float32), np.asarray(t1.affine, dtype=np.float64))
    fine = vm.resample_spacing(vol, (1.0, 1.0, 1.0))
    out: dict[str, Any] = {"source_shape": list(vol.shape), "shape": list(fine.shape),
                           "torch_path": vm._axis_aligned_scales(vol.affine, vol.shape, fine.shape, fine.affine)
                           is not None}
    itk_threads, torch_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads()
    try:
        for n in (1, 2):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
            torch.set_num_threads(n)
            out[f"sitk_{n}thread_s"] = round(_best_of(lambda: vm._resample_sitk(vol, fine.shape, fine.affine)), 4)
            out[f"torch_{n}thread_s"] = round(_best_of(lambda: vm.resample_to(vol, fine.shape, fine.affine)), 4)
            out[f"speedup_{n}thread"] = round(out[f"sitk_{n}thread_s"] / out[f"torch_{n}thread_s"], 2)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
        torch.set_num_threads(torch_threads)
    ref = vm._resample_sitk(vol, fine.shape, fine.affine).array
    out["voxels_differing"] = int((ref != fine.array).sum())
    out["max_abs_diff"] = float(np.abs(ref - fine.array).max())
    out["note"] = "best of 3; torch interpolates in float64 like ITK, then rounds to float32"
    return out


@bench("nifti_gzip")
def nifti_gzip() -> dict[str, Any]:
    """Writing and reading one 1-mm skull-stripped float volume as ``.nii.gz`` (what `prepare`
    writes and `slice` reads, 7 per case): ISA-L (python-isal) vs the standard library's zlib,
    side by side; the two files hold the same data."""
    import tempfile

    import numpy as np
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    from unibrain_cli.io import volume as vm

    t1 = load_mni152_template(resolution=1)
    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    arr = np.where(mask, np.asarray(t1.dataobj, dtype=np.float32), 0.0).astype(np.float32)
    vol = vm.Volume(arr / arr.max(), t1.affine)
    saved = vm._igzip, vm._isal_zlib
    out: dict[str, Any] = {"shape": list(arr.shape), "brain_fraction": round(float(mask.mean()), 3)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, mods in (("isal", saved), ("zlib", (None, None))):
                if name == "isal" and saved[0] is None:
                    continue
                vm._igzip, vm._isal_zlib = mods
                path = Path(tmp) / f"{name}.nii.gz"
                out[f"{name}_write_s"] = round(_best_of(lambda p=path: vm.save_volume(vol, p)), 4)
                out[f"{name}_read_s"] = round(_best_of(lambda p=path: vm.load_volume(p)), 4)
                out[f"{name}_mb"] = round(path.stat().st_size / 1e6, 2)
            import nibabel as nib

            out["nibabel_load_s"] = round(_best_of(lambda: np.asarray(nib.load(str(path)).dataobj)), 4)
        finally:
            vm._igzip, vm._isal_zlib = saved
    if "isal_write_s" in out:
        out["write_speedup"] = round(out["zlib_write_s"] / out["isal_write_s"], 2)
        out["read_speedup"] = round(out["zlib_read_s"] / out["isal_read_s"], 2)
    out["note"] = ("MNI152 T1 1 mm inside its brain mask, [0, 1] float32; best of 3; read = load_volume (one-call "
                   "inflate), nibabel_load_s = nib.load of the zlib file (nibabel's streaming reader, used before)")
    return out


@bench("memory_bagel_width")
def memory_bagel_width() -> dict[str, Any]:
    """Peak resident memory and seconds per generated image of a model with BAGEL-7B-MoT's widths
    (hidden 3584, 28 / 4 heads, MLP 18944, vocab 152064, ViT 1152; random bf16 weights in the released
    folder layout) but 2 LLM and 2 ViT layers, in each --dtype / --quantize / --offload mode that runs on
    this CPU, each mode in a fresh process (its own peak RSS), one image by the released imputation
    protocol (CFG contexts) with 2 Euler updates; plus the full model (28 LLM / 26 ViT layers)
    PROJECTED from the measured per-layer bytes, and its weight bytes per mode from parameter counts
    (projections, not measurements)."""
    import subprocess
    import sys
    import tempfile

    from unibrain_cli.inference.memory_bench import (
        MODES,
        full_model_weight_bytes,
        projection,
        write_bagel_width_folder,
    )
    from unibrain_cli.model.checkpoint import BAGEL_WEIGHTS, SafetensorsWeights

    llm_layers, vit_layers, steps = 2, 2, 2
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bagel-width"
        written = write_bagel_width_folder(folder, llm_layers, vit_layers)
        shapes = SafetensorsWeights(folder / BAGEL_WEIGHTS).shapes
        layer_file_bytes = 2 * sum(
            int(_numel(s)) for k, s in shapes.items() if k.startswith("language_model.model.layers.0."))
        for mode in MODES:
            cmd = [sys.executable, "-m", "unibrain_cli.inference.memory_bench", "run", "--folder", str(folder),
                   "--mode", mode, "--steps", str(steps)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["projection_full_model"] = projection(run, llm_layers, vit_layers, layer_file_bytes)
            runs[mode] = run
    gib = 1024**3
    summary = {
        mode: {"peak_rss_gib_measured": round(r["peak_rss_mb"] / 1024, 2),
               "rss_after_load_gib_measured": round(r["rss_after_load_mb"]["VmRSS"] / 1024, 2),
               "load_s": r["load_s"], "s_per_image_measured": r["generate_s_per_image"],
               "peak_gib_full_model_projected": r["projection_full_model"]["projected_peak_gib"]}
        for mode, r in runs.items()
    }
    return {
        "model": {"hidden": 3584, "heads": "28/4", "mlp": 18944, "vocab": 152064, "llm_layers": llm_layers,
                  "vit_layers": vit_layers, "weights_file_gib": round(written["ema_safetensors_bytes"] / gib, 2),
                  "decoder_layer_file_gib": round(layer_file_bytes / gib, 3), "euler_steps": steps,
                  "image": "256 x 256, released imputation protocol (text + image CFG)"},
        "summary": summary,
        "streaming_output_equals_in_memory": {
            "fp32": runs["disk_fp32"]["image_sha256"] == runs["fp32"]["image_sha256"],
            "bf16": runs["disk_bf16"]["image_sha256"] == runs["bf16"]["image_sha256"]},
        "int8_vs_fp32_image_mean_abs_diff": round(abs(runs["int8"]["image_mean"] - runs["fp32"]["image_mean"]), 4),
        "full_model_weight_gib_by_mode_projected": full_model_weight_bytes(),
        "modes": runs,
        "note": "measured = this process on this CPU with 2 LLM layers; *_projected = arithmetic (measured peak + "
                "the missing layers' resident bytes + their KV cache; or parameter counts x bytes), not measured. "
                "GPU figures (int8/nf4 on CUDA, offload cpu) are projections: no GPU here.",
    }


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--only", nargs="*", help="benchmark names to run")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    results: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    for name, fn in BENCHES.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        results[name] = _RESULTS[name] = _RESULTS.get(name) or fn()
        results[name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    from unibrain_cli.io.atomic import write_text

    write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
