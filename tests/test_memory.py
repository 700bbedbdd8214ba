"""Memory: weights memory-mapped into a meta-built model (read once, never copied when the dtype
matches), and the ``--dtype`` / ``--quantize`` / ``--offload`` options of impute / diagnose / report:
each loads and generates; streamed layers give the in-memory outputs bit for bit; int8 stays close
to fp32 and is smaller; bad flags are one-line exit-2 errors naming the flag, with nothing written."""

from __future__ import annotations

import gc
import json
import shutil
import struct
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_released import TINY
from typer.testing import CliRunner

from unibrain_cli.cli.app import app
from unibrain_cli.errors import UserError
from unibrain_cli.inference.bench import make_random_checkpoint
from unibrain_cli.inference.checkpoint import load_for_inference
from unibrain_cli.inference.diagnose import engine_for
from unibrain_cli.inference.engine import impute_chain
from unibrain_cli.inference.memory_bench import projection, write_bagel_folder
from unibrain_cli.model import checkpoint
from unibrain_cli.model.checkpoint import SafetensorsWeights, from_pretrained
from unibrain_cli.model.memory import (
    MemoryOptions,
    check_memory_options,
    decoder_layers,
    layer_index,
    memory_options,
    module_bytes,
)
from unibrain_cli.released.engine import ReleasedEngine, generation_contexts, run_generation
from unibrain_cli.released.folder import resolve_released
from unibrain_cli.released.impute import load_bundle

runner = CliRunner()
#: int8 weight-only (one scale per output row: each weight off by at most 1/254 of its row's max) against
#: fp32 on the tiny random models: generated slices (values in [0, 1]) within INT8_TOL absolute, released
#: velocities within INT8_TOL x their max (measured: 1.4e-4 and 1.0e-4: the random layers add little to
#: the residual stream), one quantised linear's output within LINEAR_INT8_TOL x its max (measured ~0.5 %)
INT8_TOL = 0.01
LINEAR_INT8_TOL = 0.02
#: bf16 against fp32, same measures (measured: 0.020 and 0.005)
BF16_TOL = 0.05

# A BAGEL-convention model at tiny widths, written in the released / BAGEL folder layout.
TINY_BAGEL = TINY


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("memckpt") / "model")


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("memreleased") / "BAGEL"
    write_bagel_folder(folder, TINY_BAGEL, seed=1)
    return folder


@pytest.fixture(scope="module")
def t1(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("memscans")
    idx = np.indices((30, 34, 6)).astype(np.float32)
    r = ((idx[0] - 14.5) / 12) ** 2 + ((idx[1] - 16.5) / 14) ** 2
    brain = np.where(r < 1, 50 + 30 * np.sin(idx[0] / 2) + idx[2], 0).astype(np.float32)
    path = d / "t1.nii.gz"
    nib.save(nib.Nifti1Image(brain, np.diag([-1.0, -1.0, 1.2, 1.0])), str(path))
    return path


def _slice(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2).float() * 0.8


def _chain(bundle, seed: int = 0):
    engine = engine_for(bundle)
    return impute_chain(engine, {"t1": _slice(bundle.image_size)}, ["t2"], seed, thinking_tokens=4, answer_tokens=4)


def _velocity(bundle) -> torch.Tensor:
    """Conditional velocity of the released imputation contexts of one image at t = 0.7."""
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    rgb = np.zeros((256, 256, 3), dtype=np.uint8)
    rgb[64:192, 80:176] = 200
    cond, _, _ = generation_contexts(engine, [rgb], "t2", torch.Generator().manual_seed(0))
    x = torch.randn(256, bundle.model.latent_dim, generator=torch.Generator().manual_seed(1))
    return engine.velocity(cond, x, 0.7, (16, 16))


def _mapped(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (/proc/self/maps)."""
    target = str(path.resolve())
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            out.append((lo, hi))
    return out


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------


def test_flags_parse_and_refuse_what_cannot_run() -> None:
    assert memory_options().is_default and memory_options("auto", "none", "none") == MemoryOptions()
    assert memory_options("BF16", "Int8", "none") == MemoryOptions("bf16", "int8", "none")
    for args, flag in [(("fp16", "none", "none"), "--dtype"), (("auto", "int4", "none"), "--quantize"),
                       (("auto", "none", "gpu"), "--offload"), (("auto", "int8", "disk"), "--offload")]:
        with pytest.raises(UserError) as err:
            memory_options(*args)
        assert flag in str(err.value)
    with pytest.raises(UserError) as err:
        check_memory_options(MemoryOptions(quantize="nf4"), "cpu")
    assert str(err.value).startswith("--quantize nf4 needs a CUDA device (bitsandbytes)")
    with pytest.raises(UserError) as err:
        check_memory_options(MemoryOptions(offload="cpu"), "cpu")
    assert str(err.value).startswith("--offload: ")
    for ok in (MemoryOptions(), MemoryOptions("bf16"), MemoryOptions(quantize="int8"), MemoryOptions(offload="disk")):
        check_memory_options(ok, "cpu")
    assert MemoryOptions().torch_dtype(torch.float32) == torch.float32
    assert MemoryOptions("bf16").torch_dtype(torch.float32) == torch.bfloat16
    assert MemoryOptions("fp32").torch_dtype(torch.bfloat16) == torch.float32


# ---------------------------------------------------------------------------------------------
# loading: meta device + memory map, every tensor read once
# ---------------------------------------------------------------------------------------------


def test_load_builds_on_meta_and_reads_every_tensor_once_one_layer_at_a_time(native, monkeypatch) -> None:
    built, groups = [], []
    real_build, real_load = checkpoint.build_model, SafetensorsWeights.load

    def spy_build(cfg, device="cpu", dtype=None):
        built.append(str(device))
        return real_build(cfg, device, dtype)

    def spy_load(self, names, *args, **kwargs):
        names = list(names)
        groups.append(names)
        return real_load(self, names, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "build_model", spy_build)
    monkeypatch.setattr(SafetensorsWeights, "load", spy_load)
    model = from_pretrained(native, dtype=torch.bfloat16, load_autoencoder=False).model
    assert built == ["meta"]
    counts = Counter(name for g in groups for name in g)
    assert set(counts) == set(model.state_dict()) and set(counts.values()) == {1}
    layers = [{layer_index(n) for n in g} for g in groups]
    n_rest = sum(1 for g in layers if g == {None})
    assert all(len(g) == 1 for g in groups[:n_rest])  # embeddings, head, ViT, bridges: one tensor per read
    assert layers[n_rest:] == [{i} for i in range(len(layers) - n_rest)]  # then one decoder layer per read
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())


def test_parameters_are_the_mapped_file_pages_unless_converted(native, tmp_path) -> None:
    folder = shutil.copytree(native, tmp_path / "copy")
    weights = folder / checkpoint.MODEL_FILE
    model = from_pretrained(folder, load_autoencoder=False).model  # fp32 file -> fp32: no copy at all
    ranges = _mapped(weights)
    assert ranges, "the weights file is not memory-mapped"
    params = list(model.parameters())
    inside = [any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in params]
    assert all(inside), f"{inside.count(False)} of {len(params)} parameters were copied out of the mapping"
    del model, params
    gc.collect()
    assert _mapped(weights) == []  # the mapping goes with the model
    converted = from_pretrained(folder, dtype=torch.bfloat16, load_autoencoder=False).model
    gc.collect()
    assert _mapped(weights) == []  # converted groups are copies: no mapping (no file page) is left behind
    assert all(p.dtype == torch.bfloat16 for p in converted.parameters())


def test_a_weights_file_larger_than_ram_and_swap_is_read_tensor_by_tensor(tmp_path) -> None:
    """``safetensors.safe_open`` maps the whole file privately as it opens it (refused by the kernel's
    default overcommit check when the file exceeds RAM + swap, as BAGEL-7B's 29 GB file on a 24 GiB
    machine); ours maps one tensor's bytes at a time. The file is sparse: it takes no disk."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    ram_swap = sum(int(meminfo[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    part = 2**30  # bf16 elements per part: 2 GiB each
    parts = ram_swap // (2 * part) + 1
    header, offset = {}, 0
    for i in range(parts):
        header[f"part{i}"] = {"dtype": "BF16", "shape": [part // 4096, 4096], "data_offsets": [offset, offset + 2 * part]}
        offset += 2 * part
    header["small"] = {"dtype": "F32", "shape": [3, 2], "data_offsets": [offset, offset + 24]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.seek(8 + len(raw) + offset)
        f.write(struct.pack("<6f", 1, 2, 3, 4, 5, 6))
    assert path.stat().st_size > ram_swap
    weights = SafetensorsWeights(path)
    assert len(weights.shapes) == parts + 1
    assert torch.equal(weights.load(["small"])["small"], torch.arange(1.0, 7.0).reshape(3, 2))
    for i in range(parts):  # every part mapped (and released) in turn
        assert not weights.load_raw([f"part{i}"])[f"part{i}"][-1].any()


def test_default_load_is_bit_identical_to_a_plain_state_dict_load(native) -> None:
    from safetensors.torch import load_file

    model = from_pretrained(native, load_autoencoder=False).model
    state = load_file(str(native / checkpoint.MODEL_FILE))
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# modes on our own checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(native):
    bundle = load_for_inference(native)
    return bundle, _chain(bundle)


def test_disk_streaming_equals_in_memory_bit_for_bit(native, reference) -> None:
    ref_bundle, ref = reference
    bundle = load_for_inference(native, memory=MemoryOptions(offload="disk"))
    layers = decoder_layers(bundle.model)
    assert module_bytes(layers) == 0 and all(p.is_meta for p in layers.parameters())
    out = _chain(bundle)
    assert torch.equal(out.images["t2"], ref.images["t2"])
    assert out.thinking == ref.thinking and out.answer == ref.answer
    streamer = bundle.model.layer_streamer
    assert streamer.loads > 0 and streamer.loads % len(layers) == 0
    assert all(p.is_meta for p in layers.parameters())  # nothing held after the run


def test_converted_streaming_reuses_one_layer_of_buffers_and_matches_in_memory(native) -> None:
    """fp32 file streamed as bf16: every layer load converts; the buffers of one layer are reused."""
    memory = load_for_inference(native, memory=MemoryOptions(dtype="bf16"))
    streamed = load_for_inference(native, memory=MemoryOptions(dtype="bf16", offload="disk"))
    a, b = _chain(memory), _chain(streamed)
    assert torch.equal(a.images["t2"], b.images["t2"]) and a.thinking == b.thinking
    streamer = streamed.model.layer_streamer
    pool = streamer.release.__self__
    per_layer = len(list(decoder_layers(streamed.model)[0].parameters()))
    assert streamer.loads > 2 * per_layer and len(pool._owned) == per_layer


def test_cpu_offload_path_matches_in_memory(native, reference) -> None:
    """``--offload cpu`` is CUDA-only at the CLI; the library path (layers held in CPU memory, moved to
    the device per forward) runs here with the CPU as the device and must give the same outputs."""
    from unibrain_cli.model.checkpoint import from_pretrained

    pre = from_pretrained(native, memory=MemoryOptions(offload="cpu"))
    assert all(p.is_meta for p in decoder_layers(pre.model).parameters())
    ref_bundle, ref = reference
    bundle = ref_bundle._replace(model=pre.model)
    assert torch.equal(_chain(bundle).images["t2"], ref.images["t2"])


def test_int8_quantises_only_the_decoder_layers_and_stays_close(native, reference) -> None:
    ref_bundle, ref = reference
    bundle = load_for_inference(native, memory=MemoryOptions(quantize="int8"))
    q_layers, f_layers = decoder_layers(bundle.model), decoder_layers(ref_bundle.model)
    assert module_bytes(q_layers) < 0.5 * module_bytes(f_layers)
    assert type(q_layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    x = torch.randn(16, q_layers[0].mlp.up_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        yq, yf = q_layers[0].mlp.up_proj(x), f_layers[0].mlp.up_proj(x)
    assert not torch.equal(yq, yf) and (yq - yf).abs().max() <= LINEAR_INT8_TOL * yf.abs().max()
    for name in ("vae2llm", "llm2vae"):  # the bridges, embeddings, head and ViT are untouched
        assert torch.equal(getattr(bundle.model, name).weight, getattr(ref_bundle.model, name).weight)
    assert torch.equal(bundle.model.language_model.lm_head.weight, ref_bundle.model.language_model.lm_head.weight)
    out = _chain(bundle)
    a, b = out.images["t2"], ref.images["t2"]
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert (a - b).abs().max() <= INT8_TOL, float((a - b).abs().max())


def test_bf16_loads_and_generates(native, reference) -> None:
    bundle = load_for_inference(native, memory=MemoryOptions(dtype="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in bundle.model.parameters())
    out = _chain(bundle)
    a, b = out.images["t2"], reference[1].images["t2"]
    assert torch.isfinite(a).all() and (a - b).abs().max() <= BF16_TOL, float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------
# modes on a released / BAGEL folder
# ---------------------------------------------------------------------------------------------


def test_released_folder_modes(released) -> None:
    files = resolve_released(released)
    ref = load_bundle(files, "cpu")
    v_ref = _velocity(ref)
    assert v_ref.abs().max() > 0
    disk = load_bundle(files, "cpu", MemoryOptions(offload="disk"))
    assert module_bytes(decoder_layers(disk.model)) == 0
    assert torch.equal(_velocity(disk), v_ref)
    assert torch.equal(disk.model.vit_pos_embed.pos_embed, ref.model.vit_pos_embed.pos_embed)  # stored tables loaded
    rgb = np.zeros((256, 256, 3), dtype=np.uint8)
    rgb[40:200, 60:180] = 150
    images = [run_generation(ReleasedEngine(b.model, b.vae, b.tokenizer), [rgb], "t2",
                             [torch.Generator().manual_seed(3)], steps=1).image for b in (ref, disk)]
    assert np.array_equal(images[0], images[1])
    int8 = load_bundle(files, "cpu", MemoryOptions(quantize="int8"))
    v8 = _velocity(int8)
    assert not torch.equal(v8, v_ref)
    assert (v8 - v_ref).abs().max() <= INT8_TOL * v_ref.abs().max()
    bf16 = load_bundle(files, "cpu", MemoryOptions(dtype="bf16"))
    assert bf16.model.dtype == torch.bfloat16
    vb = _velocity(bf16)
    assert (vb - v_ref).abs().max() <= BF16_TOL * v_ref.abs().max()


def test_projection_is_arithmetic_on_measured_bytes() -> None:
    measured = {"options": {"dtype": "bf16", "quantize": "none", "offload": "none"}, "peak_rss_mb": 1024.0,
                "resident_weight_bytes": {"decoder_layer_0": 2**30, "vit_layer_0": 0}}
    p = projection(measured, llm_layers=2, vit_layers=26, file_layer_bytes=2**30)
    kv = 26 * 3 * 610 * 2 * 4 * 128 * 2
    assert p["projected_peak_gib"] == round((2**30 + 26 * 2**30 + kv) / 2**30, 2)
    streamed = projection(measured | {"options": {"dtype": "bf16", "quantize": "none", "offload": "disk"}}, 2, 26,
                          2**30)
    assert streamed["decoder_layers_resident_gib"] == 0 and streamed["projected_peak_gib"] < p["projected_peak_gib"]


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize("flags,needles", [
    (["--quantize", "nf4"], ["--quantize nf4 needs a CUDA device (bitsandbytes)"]),
    (["--quantize", "int4"], ["--quantize", "int4"]),
    (["--dtype", "fp16"], ["--dtype", "fp16"]),
    (["--offload", "gpu"], ["--offload", "gpu"]),
    (["--offload", "cpu"], ["--offload", "--device cpu"]),
    (["--quantize", "int8", "--offload", "disk"], ["--offload", "cannot be combined"]),
])
@pytest.mark.parametrize("command", ["impute", "diagnose", "report"])
def test_bad_memory_flags_are_one_line_errors_and_write_nothing(native, t1, tmp_path, command, flags, needles) -> None:
    out = tmp_path / "out"
    args = [command, "--have", f"t1={t1}", "--ckpt", str(native), *flags]
    if command == "impute":
        args += ["--want", "t2", "--out", str(out)]
    res = runner.invoke(app, args)
    _one_line_error(res, *needles)
    assert list(tmp_path.iterdir()) == []


def test_cli_diagnose_and_released_report_take_the_memory_flags(native, released, t1) -> None:
    base = ["diagnose", "--have", f"t1={t1}", "--ckpt", str(native), "--no-impute", "--json"]
    plain, streamed = runner.invoke(app, base), runner.invoke(app, [*base, "--offload", "disk"])
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.output + streamed.output
    assert plain.stdout == streamed.stdout
    res = runner.invoke(app, ["report", "--have", f"t1={t1}", "--ckpt", str(released), "--format", "json",
                              "--quantize", "int8", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert '"protocol": "released"' in res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("memory", [MemoryOptions(quantize="int8"), MemoryOptions(quantize="nf4"),
                                    MemoryOptions(offload="cpu"), MemoryOptions(offload="disk")])
def test_cuda_modes_load_and_generate(native, reference, memory) -> None:  # pragma: no cover - GPU only
    bundle = load_for_inference(native, "cuda", memory)
    ref = load_for_inference(native, "cuda")
    a, b = _chain(bundle).images["t2"], _chain(ref).images["t2"]
    assert torch.isfinite(a).all()
    if memory.offload != "none":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() <= 0.05


def test_cli_impute_streaming_and_int8(native, t1, tmp_path) -> None:
    vols = {}
    for name, flags in [("default", []), ("disk", ["--offload", "disk"]), ("int8", ["--quantize", "int8"])]:
        out = tmp_path / name
        res = runner.invoke(app, ["-q", "impute", "--have", f"t1={t1}", "--want", "t2", "--ckpt", str(native),
                                  "--out", str(out), "--slices", "2", "--batch-size", "2", *flags])
        assert res.exit_code == 0, res.output
        vols[name] = nib.load(str(out / "t2_imputed.nii.gz")).get_fdata()
        record = json.loads((out / "impute.json").read_text())
        assert record["memory"] == {"dtype": "auto", "quantize": "int8" if name == "int8" else "none",
                                    "offload": "disk" if name == "disk" else "none"}
    assert np.array_equal(vols["disk"], vols["default"])  # batched rows, KV cache, text: all identical
    assert np.isfinite(vols["int8"]).all()
    assert np.abs(vols["int8"] - vols["default"]).max() <= INT8_TOL
