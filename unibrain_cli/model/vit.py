"""SigLIP-style NaViT encoder for packed, variable-size images (the understanding path).

Attribute tree = BAGEL's ``vit_model.vision_model.*`` keys without that prefix:
``embeddings.patch_embedding`` (Linear(p*p*C -> hidden), inputs ordered (kh, kw, c): the
Linear form of SigLIP's Conv2d), ``embeddings.position_embedding`` (learned,
``max_patches_per_side ** 2`` rows, indexed by ``row * max_patches_per_side + col``),
``encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}``,
``post_layernorm``. With ``ViTConfig.stem_widths`` (ours, off in BAGEL) a patch-local
convolutional stem ``embeddings.stem.layers.*`` comes before ``patch_embedding``, which then reads
its features (:class:`PatchStem`).

Depth: exactly ``ViTConfig.num_layers`` layers are built. BAGEL's SigLIP-so400m config says
27 layers, but BAGEL builds ``27 + 1 + select_layer(-2) = 26`` and its checkpoint holds 26,
so the ``bagel-7b`` recipe sets ``num_layers = 26`` (the dropped last layer simply does not
exist here), and ``post_layernorm`` follows layer 26.

Attention is full (bidirectional) inside each image and never crosses images: one SDPA call
over the packed sequence with a block-diagonal boolean mask built from ``cu_seqlens``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unibrain_cli.config.components import ViTConfig
from unibrain_cli.model.embeddings import flattened_position_ids, patch_tokens


def patchify(image: Tensor, patch: int, max_per_side: int) -> tuple[Tensor, Tensor]:
    """Cut one image into NaViT patch tokens.

    Args:
        image: [C, H, W] (H, W multiples of ``patch``; at most ``max_per_side`` patches per side).
        patch: patch side in pixels.
        max_per_side: side of the learned position table.

    Returns:
        patches [h*w, patch*patch*C] ordered (kh, kw, c), and long position ids [h*w] =
        ``row * max_per_side + col`` (h = H / patch, w = W / patch, row-major).
    """
    _, height, width = image.shape
    tokens = patch_tokens(image, patch)
    return tokens, flattened_position_ids(height // patch, width // patch, max_per_side, device=image.device)


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """cu_seqlens [B+1] (0 = first, last = total) -> long [total] index of each token's image."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[0]) != 0 or int(lengths.sum()) != total or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} does not partition {total} tokens")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


class PatchStem(nn.Module):
    """Patch-local convolutional stem: [N, p*p*C] patches -> [N, (p/2^k)^2 * widths[-1]] features.

    Each patch (ordered (kh, kw, c), as :func:`patchify` cuts it) goes through ``k = len(widths)``
    blocks of 3x3 stride-2 convolution -> GroupNorm -> GELU on its own (zero padding at the patch
    border, a per-patch norm), and leaves ordered (row, col, channel) like the pixels came in. A
    patch's features therefore depend on that patch alone: packing, batching and the KV cache see
    exactly what the linear patch embedding gives them, only a non-linear function of the pixels.
    Why: a 16-px-patch ViT trained from scratch on a few hundred cases fits them and generalises
    poorly; early convolutions are the known remedy (Xiao et al. 2021, "Early convolutions help
    transformers see better"). Off (no stem) in BAGEL's SigLIP and in every shipped recipe: in
    ``small`` it lowered closed-set Top-1 on two seeds (twenty-second session, README).
    """

    def __init__(self, patch: int, channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        if patch % 2 ** len(widths):
            raise ValueError(f"patch size {patch} is not a multiple of 2 ** {len(widths)}")
        self.patch, self.channels = patch, channels
        layers: list[nn.Module] = []
        cin = channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, w), w),
                       nn.GELU(approximate="tanh")]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.out_features = self.features(patch, channels, widths)

    @staticmethod
    def features(patch: int, channels: int, widths: tuple[int, ...]) -> int:
        """Features per patch that leave the stem (``p*p*C``, the pixels, without one)."""
        return (patch // 2 ** len(widths)) ** 2 * (widths[-1] if widths else channels)

    def forward(self, patches: Tensor) -> Tensor:
        n = patches.shape[0]
        x = patches.reshape(n, self.patch, self.patch, self.channels).permute(0, 3, 1, 2)
        return self.layers(x).permute(0, 2, 3, 1).reshape(n, self.out_features)


class SiglipVisionEmbeddings(nn.Module):
    """Patch projection + learned position embedding: [N, p*p*C] -> [N, hidden]; with
    ``cfg.stem_widths`` the projection reads a :class:`PatchStem`'s features instead of the pixels."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        # built after the two SigLIP tensors, so a model without a stem draws the same init as before
        in_features = PatchStem.features(cfg.patch_size, cfg.num_channels, cfg.stem_widths)
        self.patch_embedding = nn.Linear(in_features, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_patches_per_side**2, cfg.hidden_size)
        self.stem = PatchStem(cfg.patch_size, cfg.num_channels, cfg.stem_widths) if cfg.stem_widths else None

    def forward(self, packed_pixel_values: Tensor, packed_position_ids: Tensor,
                override: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``override`` (rows, [n, hidden]): patch embeddings that replace the projection of those rows
        (``model.fused_view``); the position embedding is added to them alike."""
        x = packed_pixel_values.to(self.patch_embedding.weight.dtype)
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch_embedding(x)
        if override is not None:
            x = x.index_put((override[0],), override[1].to(x.dtype))
        return x + self.position_embedding(packed_position_ids)


class SiglipAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (all with bias)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        h = cfg.hidden_size
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.q_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [N, hidden]; mask: bool [N, N], True = may attend -> [N, hidden]."""
        n = x.shape[0]

        def heads(t: Tensor) -> Tensor:
            return t.view(n, self.num_heads, self.head_dim).transpose(0, 1)  # [heads, N, d]

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(0, 1).reshape(n, -1))


class SiglipMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """Stack of ``num_layers`` encoder layers."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SiglipVisionModel(nn.Module):
    """NaViT SigLIP encoder over a packed sequence of images.

    State-dict keys equal BAGEL's ``vit_model.vision_model.*`` after removing that prefix.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, packed_pixel_values: Tensor, packed_position_ids: Tensor, cu_seqlens: Tensor,
                override: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Encode packed images.

        Args:
            packed_pixel_values: [N, p*p*C] patches of all images, concatenated (see :func:`patchify`).
            packed_position_ids: long [N], ``row * max_patches_per_side + col`` per patch.
            cu_seqlens: int32 [B+1], cumulative patch counts (0, n_1, n_1+n_2, ..., N).
            override: (rows, [n, hidden]) patch embeddings given for those rows instead of the
                projection of their pixels (:class:`SiglipVisionEmbeddings`).

        Returns:
            [N, hidden] after ``post_layernorm``; token i only attended to its own image.
        """
        seg = segment_ids(cu_seqlens, packed_pixel_values.shape[0])
        mask = seg[:, None] == seg[None, :]
        x = self.embeddings(packed_pixel_values, packed_position_ids, override)
        return self.post_layernorm(self.encoder(x, mask))
