"""Attention backends and the split/mode mask rule."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from unibrain_cli.model.attention import (
    MaskInfo,
    attend,
    attend_varlen,
    dense_mask,
    flex_available,
    resolve_backend,
    varlen_plan,
)


def _info() -> MaskInfo:
    # sample 0: text(3) full(2) text(2) noise(2) full(2) text(1); sample 1: text(2) full(3)
    return MaskInfo.from_splits(
        [3, 2, 2, 2, 2, 1, 2, 3],
        ["causal", "full", "causal", "noise", "full", "causal", "causal", "full"],
        [0, 0, 0, 0, 0, 0, 1, 1],
    )


def test_causal_text_rule() -> None:
    m = dense_mask(MaskInfo.from_splits([4], ["causal"], [0]))
    assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril())


def test_full_split_is_bidirectional_and_sees_the_past() -> None:
    m = dense_mask(_info())
    assert m[3:5, 3:5].all()  # full split, both directions
    assert m[3:5, 0:3].all()  # sees earlier text
    assert not m[0:3, 3:5].any()  # earlier text never sees it


def test_noise_split_is_invisible_to_later_tokens() -> None:
    m = dense_mask(_info())
    noise = slice(7, 9)
    assert m[noise, noise].all() and m[noise, 0:7].all()  # sees past and itself
    assert not m[9:12, noise].any()  # later clean image and text never see it
    assert m[9:12, 0:7].all()


def test_samples_are_isolated() -> None:
    m = dense_mask(_info())
    assert not m[12:, :12].any() and not m[:12, 12:].any()
    assert torch.equal(m[12:14, 12:14], torch.ones(2, 2, dtype=torch.bool).tril())


def test_prefix_is_visible_to_a_cached_block() -> None:
    info = MaskInfo.from_splits([2, 3], ["causal", "noise"], [0, 0], prefix_len=4)
    m = dense_mask(info)
    assert m.shape == (5, 9)
    assert m[:, :4].all()
    assert torch.equal(m[:2, 4:6], torch.ones(2, 2, dtype=torch.bool).tril())
    assert info.segments == [(0, 5, 0, 9)]


def test_invalid_splits_raise() -> None:
    with pytest.raises(ValueError, match="unknown split mode"):
        MaskInfo.from_splits([1], ["diag"], [0])
    with pytest.raises(ValueError, match="non-decreasing"):
        MaskInfo.from_splits([1, 1], ["causal", "causal"], [1, 0])
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("magic", torch.device("cpu"))


def _qkv(info: MaskInfo, hq: int = 4, hkv: int = 2, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(info.num_queries, hq, d, generator=g),
        torch.randn(info.num_keys, hkv, d, generator=g),
        torch.randn(info.num_keys, hkv, d, generator=g),
    )


def _backends() -> list[str]:
    return ["sdpa", "dense"] + (["flex"] if flex_available() else [])


@pytest.mark.parametrize("prefix", [0, 5])
def test_backends_agree(prefix: int) -> None:
    info = _info() if prefix == 0 else MaskInfo.from_splits([3, 2, 4], ["causal", "noise", "full"], [0, 0, 0], prefix)
    q, k, v = _qkv(info)
    ref = attend(q, k, v, info, backend="dense")
    for backend in _backends():
        out = attend(q, k, v, info, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=backend)
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):  # noqa: ANN001
    """flash_attn_varlen_func semantics (bottom-right causal alignment) on SDPA."""
    outs = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        n, m = qi.shape[0], ki.shape[0]
        mask = torch.ones(n, m, dtype=torch.bool)
        if causal:
            mask = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), attn_mask=mask, scale=softmax_scale,
            enable_gqa=True,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("prefix", [0, 3])
def test_flash_varlen_plan_matches_the_mask(prefix: int) -> None:
    info = _info() if prefix == 0 else MaskInfo.from_splits([2, 2, 3], ["causal", "noise", "full"], [0, 0, 0], prefix)
    q, k, v = _qkv(info)
    out = attend_varlen(q, k, v, info, varlen_fn=_reference_varlen)
    torch.testing.assert_close(out, attend(q, k, v, info, backend="dense"), atol=1e-5, rtol=1e-5)
    assert {g.causal for g in varlen_plan(info)} == {True, False}


def test_flex_backward_on_cpu_is_refused_clearly() -> None:
    if not flex_available():
        pytest.skip("flex_attention not importable")
    info = MaskInfo.from_splits([3], ["causal"], [0])
    q, k, v = (t.requires_grad_() for t in _qkv(info))
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        attend(q, k, v, info, backend="flex")
    with torch.no_grad():
        assert attend(q, k, v, info, backend="flex").shape == q.shape


def test_flash_backend_without_package_says_how_to_install() -> None:
    from unibrain_cli.model import attention

    if attention.flash_available():
        pytest.skip("flash-attn installed")
    info = MaskInfo.from_splits([2], ["causal"], [0])
    with pytest.raises(RuntimeError, match="flash-attn"):
        attend(*_qkv(info), info, backend="flash")


def test_packed_equals_samples_one_by_one() -> None:
    info = _info()
    q, k, v = _qkv(info)
    packed = attend(q, k, v, info, backend="sdpa")
    alone = MaskInfo.from_splits([2, 3], ["causal", "full"], [0, 0])
    out1 = attend(q[12:], k[12:], v[12:], alone, backend="sdpa")
    torch.testing.assert_close(packed[12:], out1)


def test_gradients_flow_through_sdpa_backend() -> None:
    info = _info()
    q, k, v = (t.requires_grad_() for t in _qkv(info))
    attend(q, k, v, info, backend="sdpa").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and k.grad is not None


def test_per_sample_sdpa_beats_one_dense_mask() -> None:
    n_samples, n = 8, 192
    splits = [n // 2, n // 4, n // 4] * n_samples
    modes = ["causal", "full", "causal"] * n_samples
    samples = [i for i in range(n_samples) for _ in range(3)]
    info = MaskInfo.from_splits(splits, modes, samples)
    q, k, v = _qkv(info, hq=4, hkv=2, d=32)

    def best(backend: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            attend(q, k, v, info, backend=backend)
            times.append(time.perf_counter() - t0)
        return min(times)

    assert best("sdpa") * 1.5 < best("dense")
