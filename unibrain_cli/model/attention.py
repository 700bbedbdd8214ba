"""Attention over packed sequences with split/mode masks, behind one function: :func:`attend`.

Layout: every tensor is *packed* — tokens of all samples concatenated along dim 0, no batch
dimension, no padding: ``q [Nq, Hq, D]``, ``k, v [Nk, Hkv, D]`` (GQA: ``Hq % Hkv == 0``).

Who may see whom is described by a :class:`MaskInfo`: for every query and every key its
sample id, split id, split mode and absolute index in the key sequence. The rule (BAGEL):

- tokens of different samples never see each other;
- a key in an EARLIER split is visible unless that split has mode ``noise``;
- inside one split: ``causal`` -> key index <= query index; ``full`` / ``noise`` -> all keys.

So a ``noise`` split (a noisy VAE target) sees the past and itself, and no later token sees
it. Every query sees at least itself, so no softmax row is empty.

Backends (``backend=``):

- ``"sdpa"``: PyTorch SDPA, one call per sample (contiguous segment) with that sample's own
  small dense boolean mask: cost sum_i n_i^2 instead of N^2 for a pack. The CPU training path
  (flex_attention has no backward on CPU).
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` from the same rule as a
  ``mask_mod`` (compiled on CUDA, eager on CPU — forward only there).
- ``"flash"``: ``flash_attn_varlen_func`` when the ``flash-attn`` package is importable (CUDA,
  fp16/bf16). Each split becomes one varlen segment whose keys are gathered (visible earlier
  tokens of its sample, then the split itself); causal and full splits go in two calls.
- ``"dense"``: one dense mask over the whole pack — the reference implementation (slow).
- ``"auto"``: flash on CUDA when installed, else sdpa.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MODE_CAUSAL = 0
MODE_FULL = 1
MODE_NOISE = 2
MODE_CODES: dict[str, int] = {"causal": MODE_CAUSAL, "full": MODE_FULL, "noise": MODE_NOISE}

BACKENDS = ("auto", "sdpa", "flex", "flash", "dense")

try:  # optional GPU extra, never required
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - depends on the environment
    _flash_varlen = None


def flash_available() -> bool:
    """True when the ``flash-attn`` package could be imported."""
    return _flash_varlen is not None


def flex_available() -> bool:
    """True when ``torch.nn.attention.flex_attention`` can be imported."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class MaskInfo:
    """Per-token metadata of queries and keys that defines the attention mask.

    All tensors are long and on the device of q/k/v.

    Attributes:
        q_sample, q_split, q_mode, q_index: [Nq] sample id, split id, mode code
            (:data:`MODE_CODES`) and absolute index (position in the KEY sequence) per query.
        kv_sample, kv_split, kv_mode, kv_index: [Nk] the same per key.
        segments: per sample, ``(q_start, q_end, kv_start, kv_end)``: the sample's queries
            and keys are contiguous ranges (used by the sdpa backend).
        q_split_ranges: per query split ``(q_start, q_end, split_id, sample_id, mode)``
            (used by the flash backend).
    """

    q_sample: Tensor
    q_split: Tensor
    q_mode: Tensor
    q_index: Tensor
    kv_sample: Tensor
    kv_split: Tensor
    kv_mode: Tensor
    kv_index: Tensor
    segments: list[tuple[int, int, int, int]]
    q_split_ranges: list[tuple[int, int, int, int, int]]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_queries(self) -> int:
        return int(self.q_sample.numel())

    @property
    def num_keys(self) -> int:
        return int(self.kv_sample.numel())

    def to(self, device: torch.device | str) -> MaskInfo:
        """A copy with all tensors on ``device`` (cached block masks dropped)."""
        names = ("q_sample", "q_split", "q_mode", "q_index", "kv_sample", "kv_split", "kv_mode", "kv_index")
        moved = {n: getattr(self, n).to(device) for n in names}
        return MaskInfo(**moved, segments=self.segments, q_split_ranges=self.q_split_ranges)

    @staticmethod
    def from_splits(
        split_lens: list[int],
        split_modes: list[str],
        split_samples: list[int],
        prefix_len: int = 0,
        device: torch.device | str | None = None,
    ) -> MaskInfo:
        """Mask of a packed sequence of splits, optionally after a visible prefix (a KV cache).

        Args:
            split_lens: token count of each split, in sequence order.
            split_modes: ``"causal" | "full" | "noise"`` per split.
            split_samples: sample id per split (non-decreasing; samples are contiguous).
            prefix_len: number of already cached keys before the first split. They are all
                visible to every query (a cache never holds noise tokens) and belong to the
                first sample; only valid with a single sample.
            device: device of the tensors.

        Returns:
            MaskInfo with queries = the splits' tokens, keys = prefix + the splits' tokens.
        """
        if not (len(split_lens) == len(split_modes) == len(split_samples)):
            raise ValueError("split_lens, split_modes and split_samples must have the same length")
        if any(n <= 0 for n in split_lens):
            raise ValueError(f"every split needs at least one token, got lengths {split_lens}")
        if any(b < a for a, b in zip(split_samples, split_samples[1:], strict=False)):
            raise ValueError("samples must be contiguous: split_samples must be non-decreasing")
        unknown = sorted(set(split_modes) - set(MODE_CODES))
        if unknown:
            raise ValueError(f"unknown split mode(s) {unknown}; expected one of {sorted(MODE_CODES)}")
        if prefix_len and len(set(split_samples)) > 1:
            raise ValueError("a cached prefix is only supported for a single sample")
        lens = torch.tensor(split_lens, dtype=torch.long)
        q_split = torch.repeat_interleave(torch.arange(len(split_lens)), lens)
        q_sample = torch.repeat_interleave(torch.tensor(split_samples, dtype=torch.long), lens)
        q_mode = torch.repeat_interleave(torch.tensor([MODE_CODES[m] for m in split_modes]), lens)
        n = int(lens.sum())
        q_index = torch.arange(prefix_len, prefix_len + n)
        first_sample = split_samples[0] if split_samples else 0
        kv_sample = torch.cat([torch.full((prefix_len,), first_sample), q_sample])
        kv_split = torch.cat([torch.full((prefix_len,), -1), q_split])
        kv_mode = torch.cat([torch.full((prefix_len,), MODE_FULL), q_mode])
        kv_index = torch.arange(prefix_len + n)
        segments: list[tuple[int, int, int, int]] = []
        ranges: list[tuple[int, int, int, int, int]] = []
        pos = 0
        for i, (length, mode, sample) in enumerate(zip(split_lens, split_modes, split_samples, strict=True)):
            ranges.append((pos, pos + length, i, sample, MODE_CODES[mode]))
            if segments and split_samples[i - 1] == sample:
                qs, _, ks, _ = segments[-1]
                segments[-1] = (qs, pos + length, ks, prefix_len + pos + length)
            else:
                ks = 0 if (prefix_len and not segments) else prefix_len + pos
                segments.append((pos, pos + length, ks, prefix_len + pos + length))
            pos += length
        info = MaskInfo(q_sample, q_split, q_mode, q_index, kv_sample, kv_split, kv_mode, kv_index, segments, ranges)
        return info.to(device) if device is not None else info


def visibility(
    q_sample: Tensor, q_split: Tensor, q_mode: Tensor, q_index: Tensor,
    kv_sample: Tensor, kv_split: Tensor, kv_mode: Tensor, kv_index: Tensor,
) -> Tensor:
    """The mask rule, elementwise with broadcasting: True where the query may see the key."""
    same_sample = q_sample == kv_sample
    earlier = (kv_split < q_split) & (kv_mode != MODE_NOISE)
    same_split = (kv_split == q_split) & ((q_mode != MODE_CAUSAL) | (kv_index <= q_index))
    return same_sample & (earlier | same_split)


def dense_mask(info: MaskInfo, q_range: tuple[int, int] | None = None, kv_range: tuple[int, int] | None = None) -> Tensor:
    """Boolean mask [nq, nk] (True = visible) for a query range x key range (default: all)."""
    qs, qe = q_range if q_range is not None else (0, info.num_queries)
    ks, ke = kv_range if kv_range is not None else (0, info.num_keys)
    return visibility(
        info.q_sample[qs:qe, None], info.q_split[qs:qe, None], info.q_mode[qs:qe, None], info.q_index[qs:qe, None],
        info.kv_sample[None, ks:ke], info.kv_split[None, ks:ke], info.kv_mode[None, ks:ke], info.kv_index[None, ks:ke],
    )


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, info: MaskInfo) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [Nq,Hq,D], k/v [Nk,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} not divisible by key/value heads {k.shape[1]}")
    if q.shape[0] != info.num_queries or k.shape[0] != info.num_keys:
        raise ValueError(
            f"mask describes {info.num_queries} queries / {info.num_keys} keys, got {q.shape[0]} / {k.shape[0]}"
        )


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """q [n, Hq, D], k/v [m, Hkv, D], mask [n, m] -> [n, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


def attend_dense(q: Tensor, k: Tensor, v: Tensor, info: MaskInfo, scale: float | None = None) -> Tensor:
    """Reference: one SDPA call with a dense [Nq, Nk] mask over the whole pack."""
    return _sdpa(q, k, v, dense_mask(info), scale)


def attend_sdpa(q: Tensor, k: Tensor, v: Tensor, info: MaskInfo, scale: float | None = None) -> Tensor:
    """SDPA per sample, each with its own small dense mask (sum n_i^2 memory and compute)."""
    outs = []
    for qs, qe, ks, ke in info.segments:
        mask = dense_mask(info, (qs, qe), (ks, ke))
        outs.append(_sdpa(q[qs:qe], k[ks:ke], v[ks:ke], mask, scale))
    return torch.cat(outs, dim=0) if len(outs) != 1 else outs[0]


def _flex_fn() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


_COMPILED_FLEX: Callable[..., Tensor] | None = None


def flex_block_mask(info: MaskInfo, device: torch.device) -> Any:
    """The flex ``BlockMask`` of ``info`` (built once per MaskInfo and device, then cached)."""
    key = f"flex_block_mask:{device}"
    if key in info._cache:
        return info._cache[key]
    from torch.nn.attention.flex_attention import create_block_mask

    qs, qp, qm, qi = info.q_sample, info.q_split, info.q_mode, info.q_index
    ks, kp, km, ki = info.kv_sample, info.kv_split, info.kv_mode, info.kv_index

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return visibility(qs[q_idx], qp[q_idx], qm[q_idx], qi[q_idx], ks[kv_idx], kp[kv_idx], km[kv_idx], ki[kv_idx])

    block_mask = create_block_mask(mask_mod, None, None, info.num_queries, info.num_keys, device=str(device))
    info._cache[key] = block_mask
    return block_mask


def attend_flex(q: Tensor, k: Tensor, v: Tensor, info: MaskInfo, scale: float | None = None) -> Tensor:
    """flex_attention with a BlockMask from the mask rule (compiled on CUDA, eager on CPU)."""
    global _COMPILED_FLEX
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and not q.is_cuda:
        raise RuntimeError(
            "attention backend 'flex' has no backward on CPU in this torch; train on CPU with 'sdpa' "
            "(or run flex under torch.no_grad() for inference)"
        )
    if not q.is_cuda and not needs_grad:  # flex refuses CPU inputs that merely carry requires_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    block_mask = flex_block_mask(info, q.device)
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(_flex_fn(), dynamic=True)
        fn = _COMPILED_FLEX
    else:
        fn = _flex_fn()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    return out.squeeze(0).transpose(0, 1)


@dataclass
class VarlenGroup:
    """One flash varlen call: gathered query/key rows and their cumulative lengths."""

    q_rows: Tensor  # long [total_q] query rows, grouped by split
    kv_rows: Tensor  # long [total_k] key rows per split: visible earlier keys, then the split itself
    cu_q: Tensor  # int32 [S+1]
    cu_k: Tensor  # int32 [S+1]
    max_q: int
    max_k: int
    causal: bool


def varlen_plan(info: MaskInfo) -> list[VarlenGroup]:
    """Split the mask into at most two varlen groups (causal splits, full/noise splits).

    Each query split becomes one segment; its keys are the visible keys of earlier splits of
    its sample (noise splits removed) followed by the split's own keys, so flash's
    bottom-right-aligned causal mask is exactly the causal-split rule.
    """
    if "varlen_plan" in info._cache:
        return info._cache["varlen_plan"]
    groups: list[VarlenGroup] = []
    for causal in (True, False):
        q_rows, kv_rows, lq, lk = [], [], [], []
        for qs, qe, split, sample, mode in info.q_split_ranges:
            if (mode == MODE_CAUSAL) != causal:
                continue
            visible_earlier = (info.kv_sample == sample) & (info.kv_split < split) & (info.kv_mode != MODE_NOISE)
            own = (info.kv_sample == sample) & (info.kv_split == split)
            rows = torch.cat([visible_earlier.nonzero().flatten(), own.nonzero().flatten()])
            q_rows.append(torch.arange(qs, qe, device=info.q_sample.device))
            kv_rows.append(rows)
            lq.append(qe - qs)
            lk.append(int(rows.numel()))
        if not q_rows:
            continue
        dev = info.q_sample.device
        groups.append(
            VarlenGroup(
                q_rows=torch.cat(q_rows),
                kv_rows=torch.cat(kv_rows),
                cu_q=torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=dev),
                cu_k=torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=dev),
                max_q=max(lq),
                max_k=max(lk),
                causal=causal,
            )
        )
    info._cache["varlen_plan"] = groups
    return groups


def attend_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    info: MaskInfo,
    scale: float | None = None,
    varlen_fn: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Varlen attention (flash-attn's ``flash_attn_varlen_func`` signature) over :func:`varlen_plan`.

    ``varlen_fn`` defaults to flash-attn; tests pass a reference implementation.
    """
    fn = varlen_fn or _flash_varlen
    if fn is None:
        raise RuntimeError("attention backend 'flash' needs the flash-attn package (pip install unibrain[gpu])")
    out = q.new_empty(q.shape)
    for g in varlen_plan(info):
        o = fn(
            q[g.q_rows], k[g.kv_rows], v[g.kv_rows], g.cu_q, g.cu_k, g.max_q, g.max_k,
            softmax_scale=scale, causal=g.causal,
        )
        out = out.index_copy(0, g.q_rows, o.to(q.dtype))
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend: flash on CUDA when installed, else sdpa."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "flash" if (device.type == "cuda" and flash_available()) else "sdpa"
    return backend


def attend(q: Tensor, k: Tensor, v: Tensor, info: MaskInfo, backend: str = "auto", scale: float | None = None) -> Tensor:
    """Masked attention over a packed sequence.

    Args:
        q: [Nq, Hq, D] queries; k, v: [Nk, Hkv, D] keys/values (Hq divisible by Hkv).
        info: who sees whom (:class:`MaskInfo`).
        backend: ``"auto" | "sdpa" | "flex" | "flash" | "dense"`` (see the module docstring).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        [Nq, Hq, D].
    """
    _check_shapes(q, k, v, info)
    name = resolve_backend(backend, q.device)
    if name == "sdpa":
        return attend_sdpa(q, k, v, info, scale)
    if name == "flex":
        return attend_flex(q, k, v, info, scale)
    if name == "flash":
        return attend_varlen(q, k, v, info, scale)
    return attend_dense(q, k, v, info, scale)
