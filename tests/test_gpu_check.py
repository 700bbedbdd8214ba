"""`make gpu-check` on a CPU machine: the no-CUDA exit, the arithmetic and JSON assembly with golden
numbers, and the backend comparison (SDPA vs the dense reference; flex has no CPU backward)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from unibrain_cli import gpu_check as G
from unibrain_cli.model.attention import MaskInfo, attend

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path needs a machine without CUDA")


@no_cuda
def test_without_cuda_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "unibrain_cli.gpu_check", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "no CUDA device: gpu-check needs a CUDA machine" and proc.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


@no_cuda
def test_main_without_cuda_returns_2(tmp_path, capsys):
    assert G.main(["--out", str(tmp_path / "x.json"), "--only", "attention"]) == 2
    assert capsys.readouterr().err == G.NO_CUDA + "\n" and not (tmp_path / "x.json").exists()


def test_peak_table_lookup():
    assert G.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert G.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert G.peak_bf16_flops("NVIDIA H200") == 989e12
    assert G.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert G.peak_bf16_flops("NVIDIA L40S") == 362e12
    assert G.peak_bf16_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert G.peak_bf16_flops("NVIDIA L40") is None and G.peak_bf16_flops("Tesla T4") is None


def test_step_record_golden():
    rec = G.step_record(tokens=8192, seconds=0.5, flops=4.945e13, peak_flops=989e12)
    assert rec["tokens_per_s"] == 16384.0
    assert rec["achieved_tflops"] == pytest.approx(98.9, rel=1e-12)
    assert rec["model_tflop_per_step"] == pytest.approx(49.45, rel=1e-12)
    assert rec["mfu"] == pytest.approx(0.1, rel=1e-12) and rec["peak_bf16_tflops"] == 989.0
    unknown = G.step_record(tokens=100, seconds=2.0, flops=1e12, peak_flops=None)
    assert unknown["mfu"] is None and unknown["tokens_per_s"] == 50.0 and unknown["achieved_tflops"] == 0.5
    with pytest.raises(ValueError):
        G.step_record(tokens=0, seconds=1.0, flops=1.0, peak_flops=None)


def hand_mask() -> MaskInfo:
    """Sample 0: causal 3, full 2, noise 2, causal 2 tokens; sample 1: causal 2."""
    return MaskInfo.from_splits([3, 2, 2, 2, 2], ["causal", "full", "noise", "causal", "causal"], [0, 0, 0, 0, 1])


def test_mean_attended_keys_golden():
    # causal 1+2+3; full 2 x (3+2); noise 2 x (5+2); causal after the noise (invisible) 2 x 5 + 1+2;
    # the second sample 1+2: 46 keys over 11 queries
    assert G.mean_attended_keys(hand_mask()) == pytest.approx(46 / 11, abs=1e-15)
    one = MaskInfo.from_splits([3, 2, 2, 2], ["causal", "full", "noise", "causal"], [0, 0, 0, 0])
    assert G.mean_attended_keys(one) == pytest.approx(43 / 9, abs=1e-15)


def test_pack_train_flops_golden():
    """Hidden 8, MLP 16, 2 layers, 2 x 4 query / 1 x 4 KV dims, vocab 10 on the 9-token mask:
    active 2 x (8 x 16 + 8 x 8 + 3 x 8 x 16) = 1152; T = round(43 / 9) = 5;
    per token 3 x (2 x 1152 + 4 x 2 x 2 x 4 x 5) = 7872; x 9 = 70848; LM head 6 x 8 x 10 x 3 rows = 1440."""
    llm = SimpleNamespace(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                          head_dim=4, vocab_size=10)
    info = MaskInfo.from_splits([3, 2, 2, 2], ["causal", "full", "noise", "causal"], [0, 0, 0, 0])
    packed = SimpleNamespace(mask_info=lambda: info, length=9, ce_indexes=torch.tensor([0, 1, 7]))
    rec = G.pack_train_flops(SimpleNamespace(llm=llm), packed)
    assert rec == {"tokens": 9, "mean_attended_keys": pytest.approx(43 / 9), "logit_rows": 3, "flops": 72288}


def test_run_part_and_assemble_golden():
    ok = G.run_part(lambda x: {"value": x}, 3)
    assert ok["ok"] is True and ok["value"] == 3 and ok["seconds"] >= 0

    def boom() -> dict:
        raise ValueError("boom")

    bad = G.run_part(boom)
    assert bad["ok"] is False and bad["error"] == "ValueError: boom" and "ValueError: boom" in bad["traceback"][-1]
    said_no = G.run_part(lambda: {"ok": False, "why": "2 tests failed"})
    assert said_no["ok"] is False and "error" not in said_no
    skipped = G.run_part(lambda: {"skipped": "NCCL is not available in this torch build"})
    doc = G.assemble({"device": "NVIDIA H200", "torch": "2.13.0"},
                     {"tests": {"ok": True, "passed": 1}, "fsdp": skipped, "attention": {"ok": False, "x": math.nan}})
    assert doc == {"format": "unibrain-gpu-check/1", "device": "NVIDIA H200", "torch": "2.13.0", "ok": False,
                   "failed": ["attention"],
                   "parts": {"tests": {"ok": True, "passed": 1}, "fsdp": skipped, "attention": {"ok": False, "x": None}}}
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert G.assemble({}, {"a": {"ok": True}})["ok"] is True


def test_parse_junit_golden():
    xml = ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
           'skipped="3" tests="10" time="1.0"></testsuite></testsuites>')
    assert G.parse_junit(xml) == {"tests": 10, "passed": 4, "failed": 2, "errors": 1, "skipped": 3}
    assert G.parse_junit('<testsuite tests="1" failures="0" errors="0" skipped="0"/>')["passed"] == 1


def test_compare_backends_sdpa_vs_dense_on_cpu():
    """The comparison code on CPU: dense (the reference implementation) against SDPA on a packed
    model mask agrees to float32 rounding, the reported differences are the ones computed here by
    hand, and a backend that cannot run (flex: no CPU backward) records its error."""
    from unibrain_cli.bench import _four_modality_pack

    _, packed = _four_modality_pack("tiny", samples=2)
    info = packed.mask_info()
    res = G.compare_backends(info, ["dense", "flex"], reference="sdpa", heads=4, kv_heads=2, head_dim=16, seed=3)
    dense = res["dense"]
    assert dense["ok"] is True and dense["dtype"] == "float32" and dense["tolerance"] == 1e-4
    assert dense["max_rel_diff"] < 1e-5 and dense["out_max_abs_ref"] > 0.1

    q0, k0, v0, w = G.random_qkvw(info, 4, 2, 16, seed=3)

    def grads(backend: str) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = attend(q, k, v, info, backend=backend)
        (out * w).sum().backward()
        return [out.detach(), q.grad, k.grad, v.grad]

    for label, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), grads("dense"), grads("sdpa"), strict=True):
        assert dense[f"{label}_max_abs_diff"] == float((a - b).abs().max())
        assert dense[f"{label}_max_abs_ref"] == float(b.abs().max())
    assert res["flex"]["ok"] is False and "no backward on CPU" in res["flex"]["error"]


def test_compare_backends_verdict_follows_the_tolerance(monkeypatch):
    """Differences above the dtype's tolerance are reported as not ok (here: a negative tolerance that no
    comparison meets), the per-tensor numbers stay the same."""
    info = hand_mask()
    loose = G.compare_backends(info, ["dense"], heads=2, kv_heads=1, head_dim=8)["dense"]
    monkeypatch.setitem(G.TOLERANCE, "float32", -1.0)
    strict = G.compare_backends(info, ["dense"], heads=2, kv_heads=1, head_dim=8)["dense"]
    assert loose["ok"] is True and loose["max_rel_diff"] < 1e-5
    assert strict["ok"] is False and strict["tolerance"] == -1.0
    assert {k: v for k, v in strict.items() if k not in ("ok", "tolerance")} == \
        {k: v for k, v in loose.items() if k not in ("ok", "tolerance")}
