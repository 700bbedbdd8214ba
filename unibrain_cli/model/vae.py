"""FLUX-architecture KL autoencoder (the generation path's latent space).

Built with the FLUX config (in 3, ch 128, mult 1,2,4,4, 2 res blocks, z 16) its state_dict
keys and shapes equal FLUX.1's ``ae.safetensors`` (83.8M parameters) that BAGEL ships.

Conventions: images in [-1, 1], [B, C, H, W]; latents ``z = scale_factor * (z_raw -
shift_factor)``, [B, z_channels, H / d, W / d] with ``d = 2 ** (len(ch_mult) - 1)``.
GroupNorm uses 32 groups as FLUX; narrower test widths use the largest divisor of the channel
count that is <= 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unibrain_cli.config.components import VAEConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections and a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: Tensor) -> Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)  # [B, 1, HW, C]

        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by 1, conv3x3 stride 2 (FLUX/LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest upsampling, conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, kind: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, kind, resample)
        self.resample = kind if resample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if self.resample is not None:
            x = getattr(self, self.resample)(x)
        return x


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> moments [B, 2 * z_channels, H / d, W / d] (mean, logvar)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, padding=1)
        in_mult = (1, *mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            block_in = ch * in_mult[level]
            block_out = ch * m
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            last = level == len(mult) - 1
            self.down.append(_Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = _MidBlock(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Raw latent [B, z_channels, h, w] -> image [B, in_channels, h * d, w * d]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _MidBlock(block_in)
        levels: list[_Level] = []
        for level in reversed(range(len(mult))):
            block_out = ch * mult[level]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            levels.insert(0, _Level(blocks, Upsample(block_in) if level != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """KL autoencoder with FLUX's key layout: ``encoder.*`` and ``decoder.*``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.scale_factor = float(cfg.scale_factor)
        self.shift_factor = float(cfg.shift_factor)

    @property
    def downsample(self) -> int:
        """Spatial reduction factor d between image and latent."""
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    def _check_input(self, x: Tensor) -> None:
        d = self.downsample
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % d or x.shape[3] % d:
            raise ValueError(
                f"expected images [B, {self.config.in_channels}, H, W] with H, W multiples of {d}, "
                f"got {tuple(x.shape)}"
            )

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior of RAW latents: x [B, C, H, W] in [-1, 1] -> (mean, logvar), each
        [B, z_channels, H/d, W/d]; logvar clamped to [-30, 20] (LDM) for a stable KL."""
        self._check_input(x)
        mean, logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """x [B, C, H, W] in [-1, 1] -> scaled latent z [B, z_channels, H/d, W/d].

        ``sample`` draws from the posterior (with ``generator``), else uses its mean;
        then ``z = scale_factor * (z_raw - shift_factor)``.
        """
        mean, logvar = self.encode_moments(x)
        z_raw = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z_raw = mean + torch.exp(0.5 * logvar) * noise
        return self.scale_factor * (z_raw - self.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent z [B, z_channels, h, w] -> image [B, C, h*d, w*d] (about [-1, 1], not clamped)."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction: decode(encode(x))."""
        return self.decode(self.encode(x, sample=sample, generator=generator))

