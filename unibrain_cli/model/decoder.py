"""Qwen2-style Mixture-of-Transformer-Experts decoder (BAGEL's ``Qwen2MoT``).

Two experts share one attention softmax over the packed sequence:

- *understanding* (``q_proj``, ``mlp``, ``input_layernorm`` ...): text tokens (markers included)
  and ViT tokens;
- *generation* (``q_proj_moe_gen``, ``mlp_moe_gen``, ``input_layernorm_moe_gen`` ...): VAE latent
  tokens, noisy or clean.

Routing is hard, by token type (a :class:`Routing` of index tensors), no gate. Each layer
computes q/k/v per expert on its own rows, scatters them back into sequence order, runs ONE
masked attention (:func:`unibrain_cli.model.attention.attend`) and applies o_proj, the
post-attention norm and the SwiGLU MLP per expert again. Token embedding, LM head and rotary
embedding are shared; the final norm is per expert (``norm`` / ``norm_moe_gen``).

Module names equal BAGEL's so state dicts map one to one under ``language_model.``:
``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj[_moe_gen]``,
``model.layers.N.self_attn.{q,k}_norm[_moe_gen]``, ``model.layers.N.mlp[_moe_gen].{gate,up,down}_proj``,
``model.layers.N.{input,post_attention}_layernorm[_moe_gen]``, ``model.norm[_moe_gen]``, ``lm_head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unibrain_cli.config.components import LLMConfig
from unibrain_cli.config.validate import validate_llm_config
from unibrain_cli.model.attention import MaskInfo, attend

KV = tuple[Tensor, Tensor]


class BatchedPast(Protocol):
    """The past of one layer in a batched forward (:class:`unibrain_cli.model.batch_cache.BatchLayer`):
    it stores the new rows' keys/values itself and runs the attention."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


Past = KV | BatchedPast


@dataclass(frozen=True)
class Routing:
    """Which packed rows go to which expert.

    Attributes:
        und: long [N_und] rows of the understanding expert (text + ViT), sorted.
        gen: long [N_gen] rows of the generation expert (VAE), sorted.
        length: N = N_und + N_gen.
    """

    und: Tensor
    gen: Tensor
    length: int

    @staticmethod
    def all_und(n: int, device: torch.device | str = "cpu") -> Routing:
        return Routing(torch.arange(n, device=device), torch.empty(0, dtype=torch.long, device=device), n)

    @staticmethod
    def all_gen(n: int, device: torch.device | str = "cpu") -> Routing:
        return Routing(torch.empty(0, dtype=torch.long, device=device), torch.arange(n, device=device), n)

    def apply(self, x: Tensor, f_und: Callable[[Tensor], Tensor], f_gen: Callable[[Tensor], Tensor]) -> Tensor:
        """Apply ``f_und`` to the understanding rows and ``f_gen`` to the generation rows of x [N, ...]."""
        if self.gen.numel() == 0:
            return f_und(x)
        if self.und.numel() == 0:
            return f_gen(x)
        a = f_und(x[self.und])
        b = f_gen(x[self.gen])
        out = a.new_empty((self.length, *a.shape[1:]))
        out[self.und] = a
        out[self.gen] = b.to(a.dtype)
        return out


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm over the last dim: ``w * x / sqrt(mean(x^2) + eps)``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """1D RoPE (Qwen2 / rotate-half layout). ``inv_freq`` is a non-persistent buffer."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute ``inv_freq = theta ** (-2i / head_dim)`` (no-op on the meta device)."""
        if self.inv_freq.is_meta:
            return
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.inv_freq.device) / self.head_dim
        self.inv_freq.copy_(1.0 / (self.theta**exps))

    def forward(self, position_ids: Tensor, dtype: torch.dtype, grid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """position_ids: long [N] -> (cos, sin), each [N, head_dim] in ``dtype``.

        ``grid`` (optional, float [N, 2]): normalised (row, col) in (0, 1) of image tokens, NaN for
        text rows. Image rows then use 2D angles in the last ``head_dim // 4`` frequency slots
        (the lowest 1D frequencies, nearly constant over a sequence): half rotate by the row,
        half by the column, at :func:`grid_frequencies`. Text rows are unchanged (exact 1D RoPE).
        """
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :].float()
        if grid is not None:
            k = grid_slots(self.head_dim) // 2
            f = grid_frequencies(k, freqs.device)
            g = torch.nan_to_num(grid.float())
            two_d = torch.cat([g[:, :1] * f, g[:, 1:] * f], dim=1)  # [N, 2k]
            is_img = ~torch.isnan(grid[:, :1])
            freqs = torch.cat([freqs[:, : -2 * k], torch.where(is_img, two_d, freqs[:, -2 * k:])], dim=1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def grid_slots(head_dim: int) -> int:
    """Frequency slots (of ``head_dim // 2``) that 2D image RoPE takes over: a quarter of the head."""
    return 2 * max(1, head_dim // 16)


def grid_frequencies(k: int, device: torch.device | str | None = None) -> Tensor:
    """k angular frequencies for coordinates in (0, 1): ``pi * 16 ** (j / (k - 1))``, j = 0..k-1,
    i.e. half a turn to 8 turns across the image (geometric, so offsets of a half or a quarter
    of the image do not alias to the peak at 0)."""
    j = torch.arange(k, dtype=torch.float32, device=device)
    return math.pi * 16.0 ** (j / max(k - 1, 1))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, H, D], cos/sin [N, D] -> rotated x [N, H, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class MLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Per-expert q/k/v/o projections (bias on q/k/v) and per-head q/k RMSNorm, one attention."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        h, q_dim, kv_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=True)
        self.k_proj = nn.Linear(h, kv_dim, bias=True)
        self.v_proj = nn.Linear(h, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, h, bias=False)
        norm = (lambda: RMSNorm(cfg.head_dim, cfg.rms_norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm = norm()
        self.k_norm = norm()
        self.q_norm_moe_gen = norm()
        self.k_norm_moe_gen = norm()
        self.q_proj_moe_gen = nn.Linear(h, q_dim, bias=True)
        self.k_proj_moe_gen = nn.Linear(h, kv_dim, bias=True)
        self.v_proj_moe_gen = nn.Linear(h, kv_dim, bias=True)
        self.o_proj_moe_gen = nn.Linear(q_dim, h, bias=False)

    def forward(
        self,
        x: Tensor,
        route: Routing,
        cos: Tensor,
        sin: Tensor,
        mask: MaskInfo | None,
        backend: str,
        past: Past | None = None,
    ) -> tuple[Tensor, KV]:
        """Attention of the new rows x [N, hidden] over ``past`` keys + their own keys.

        Returns the output [N, hidden] and the new rows' (k, v), each [N, Hkv, D], after RoPE.
        """
        n = x.shape[0]
        heads_q, heads_kv, d = self.num_heads, self.num_kv_heads, self.head_dim

        def q_und(t: Tensor) -> Tensor:
            return self.q_norm(self.q_proj(t).view(-1, heads_q, d))

        def q_gen(t: Tensor) -> Tensor:
            return self.q_norm_moe_gen(self.q_proj_moe_gen(t).view(-1, heads_q, d))

        def k_und(t: Tensor) -> Tensor:
            return self.k_norm(self.k_proj(t).view(-1, heads_kv, d))

        def k_gen(t: Tensor) -> Tensor:
            return self.k_norm_moe_gen(self.k_proj_moe_gen(t).view(-1, heads_kv, d))

        q = apply_rotary(route.apply(x, q_und, q_gen), cos, sin)
        k = apply_rotary(route.apply(x, k_und, k_gen), cos, sin)
        v = route.apply(x, self.v_proj, self.v_proj_moe_gen).view(n, heads_kv, d)
        if past is not None and not isinstance(past, tuple):  # a batched cache (model.batch_cache.BatchLayer)
            out = past.attend(q, k, v).reshape(n, heads_q * d)
            return route.apply(out, self.o_proj, self.o_proj_moe_gen), (k, v)
        k_all, v_all = (torch.cat([past[0], k]), torch.cat([past[1], v])) if past is not None else (k, v)
        out = attend(q, k_all.to(q.dtype), v_all.to(q.dtype), mask, backend=backend).reshape(n, heads_q * d)
        return route.apply(out, self.o_proj, self.o_proj_moe_gen), (k, v)


class MoTDecoderLayer(nn.Module):
    """Pre-norm block: x + o(attn(norm1(x))), then x + mlp(norm2(x)), every part per expert."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        route: Routing,
        cos: Tensor,
        sin: Tensor,
        mask: MaskInfo | None,
        backend: str,
        past: Past | None = None,
    ) -> tuple[Tensor, KV]:
        """x [N, hidden] -> (x' [N, hidden], new (k, v))."""
        h = route.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        attn, kv = self.self_attn(h, route, cos, sin, mask, backend, past)
        x = x + attn
        h = route.apply(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        x = x + route.apply(h, self.mlp, self.mlp_moe_gen)
        return x, kv


class MoTModel(nn.Module):
    """Embedding table, decoder layers, per-expert final norms, shared rotary."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.activation_checkpointing = False

    def forward(
        self,
        x: Tensor,
        position_ids: Tensor,
        route: Routing,
        mask: MaskInfo | None,
        backend: str = "auto",
        past: Sequence[Past] | None = None,
        grid: Tensor | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """Run all layers on embedded rows.

        Args:
            x: [N, hidden] input embeddings of the new rows.
            position_ids: long [N] RoPE positions.
            route: expert routing of the rows.
            mask: queries = the N rows; keys = cached prefix (if any) + the N rows.
            backend: attention backend (:func:`unibrain_cli.model.attention.attend`).
            past: per layer cached (k, v) [P, Hkv, D] of the prefix, or None.
            grid: optional float [N, 2] image-token coordinates for 2D image RoPE
                (:meth:`RotaryEmbedding.forward`), NaN rows for text.

        Returns:
            final-normed hidden states [N, hidden] and per layer the new rows' (k, v).
        """
        cos, sin = self.rotary_emb(position_ids, x.dtype, grid)
        present: list[KV] = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, kv = checkpoint(layer, x, route, cos, sin, mask, backend, layer_past, use_reentrant=False)
            else:
                x, kv = layer(x, route, cos, sin, mask, backend, layer_past)
            present.append(kv)
        return route.apply(x, self.norm, self.norm_moe_gen), present


class MoTLanguageModel(nn.Module):
    """``model`` (the MoT stack) + ``lm_head`` (untied unless ``tie_word_embeddings``)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        validate_llm_config(cfg)
        self.config = cfg
        self.model = MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_generation_expert()

    @torch.no_grad()
    def init_generation_expert(self) -> None:
        """Copy every understanding-expert weight onto its ``_moe_gen`` twin (BAGEL's init)."""
        params = dict(self.named_parameters())
        for name, p in params.items():
            if "_moe_gen" not in name:
                continue
            p.copy_(params[name.replace("_moe_gen", "")])

    def forward(
        self,
        x: Tensor,
        position_ids: Tensor,
        route: Routing,
        mask: MaskInfo | None,
        backend: str = "auto",
        past: Sequence[Past] | None = None,
        grid: Tensor | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """See :meth:`MoTModel.forward`; returns final hidden states (apply ``lm_head`` as needed)."""
        return self.model(x, position_ids, route, mask, backend, past, grid)
