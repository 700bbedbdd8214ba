"""The ``vae`` stage: train our own FLUX-architecture AutoEncoder on single-modality slices.

Data: random slices of the train split, one random present modality each (restricted to
``data.modalities``); images in [0, 1] are mapped to [-1, 1]; ``model.vae.in_channels == 3``
replicates the modality into three channels.

Loss (per image, then averaged over the batch):
``|x - x_hat|_1 / (C H W) + kl_weight * KL(q(z|x) || N(0, I)) / (C H W)`` (``recon_loss = "mse"``:
the squared error, what PSNR scores, instead of the L1 norm) with the KL summed over
latent elements — LDM's "sum reconstruction + kl_weight * sum KL" divided by the pixel count, so
``kl_weight = 1e-6`` means what it means in LDM/FLUX. The latent is sampled from the posterior
with noise drawn in ``next_batch``.

Export (``RUN/vae/final``): ``ae.safetensors`` (the AutoEncoder's state dict, EMA weights),
``config.json`` (its :class:`VAEConfig` with fitted ``scale_factor`` / ``shift_factor``) and
``latent_stats.json``. The factors make the flow see unit-variance BRAIN latents:
``shift = mean(z_raw)``, ``scale = 1 / std(z_raw)`` over the posterior means of up to
:data:`STATS_IMAGES` training slices, taken at the latent positions inside the brain (the slice's
brain mask average-pooled to the latent grid, >= 0.5) — the same normalisation FLUX ships as
constants (``z = 0.3611 * (z_raw - 0.1159)``, i.e. std 2.77, mean 0.1159 on its training images).
Background latents, all alike, would otherwise pull the mean towards them and shrink the std,
so brain tokens (what the flow has to generate) would come out with variance well above 1.
``latent_stats.json`` also records the full-field statistics for comparison.

End-of-stage evaluation: PSNR of posterior-mean reconstructions of :data:`EVAL_IMAGES` held-out
(val) slices, over the full field of view (``psnr``) and over the brain mask (``psnr_brain``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unibrain_cli.config.components import VAEConfig
from unibrain_cli.data.slices_data import SliceDataset, read_slices_meta
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation.metrics import psnr
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.training.stages import EpochSampler, StageTask, StepOutput

#: Training slices whose posterior means define the latent scale/shift.
STATS_IMAGES = 256
#: Held-out slices reconstructed for the end-of-stage PSNR.
EVAL_IMAGES = 64


class VAETrainModule(nn.Module):
    """Wraps an AutoEncoder so one ``forward`` returns everything the loss needs.

    ``forward(x [B, C, H, W] in [-1, 1], eps [B, z, H/d, W/d])`` ->
    ``(x_hat [B, C, H, W], mean, logvar)`` with ``z = mean + exp(logvar / 2) * eps`` (raw latents;
    the scale/shift of the AutoEncoder stay 1/0 during training).
    """

    def __init__(self, ae: AutoEncoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.ae.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.ae.decoder(z), mean, logvar


def vae_loss(x: Tensor, x_hat: Tensor, mean: Tensor, logvar: Tensor, kl_weight: float,
             kind: str = "l1") -> tuple[Tensor, Tensor, Tensor]:
    """(loss, reconstruction per pixel, KL per image in nats) — see the module docstring.

    ``kind`` is "l1" or "mse" for the reconstruction term. All computed in float32.
    """
    x, x_hat, mean, logvar = x.float(), x_hat.float(), mean.float(), logvar.float()
    diff = x_hat - x
    recon = diff.abs().mean() if kind == "l1" else diff.square().mean()
    kl_per_image = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
    pixels = x[0].numel()
    return recon + kl_weight * kl_per_image / pixels, recon, kl_per_image


def latent_stats(ae: AutoEncoder, images: Tensor, batch_size: int = 32, masks: Tensor | None = None
                 ) -> tuple[float, float]:
    """Mean and std over all elements of the RAW posterior means of ``images`` [N, C, H, W] in [-1, 1];
    with ``masks`` [N, h, w] (bool, latent grid) only over the masked latent positions (all channels)."""
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            mean, _ = ae.encode_moments(images[i:i + batch_size])
            m = mean.double()
            if masks is not None:
                m = m.permute(0, 2, 3, 1)[masks[i:i + batch_size].bool()]
            total += float(m.sum())
            total_sq += float(m.square().sum())
            count += m.numel()
    if count == 0:
        return float("nan"), float("nan")
    mu = total / count
    var = max(total_sq / count - mu * mu, 0.0)
    return mu, float(np.sqrt(var))


def latent_brain_mask(brain: np.ndarray, downsample: int) -> Tensor:
    """Brain masks [N, S, S] -> [N, S/d, S/d] bool: latent positions whose d x d pixels are >= half brain."""
    t = torch.from_numpy(np.ascontiguousarray(brain, dtype=np.float32))[:, None]
    return nn.functional.avg_pool2d(t, downsample)[:, 0] >= 0.5


def save_vae(ae: AutoEncoder, cfg: VAEConfig, out_dir: str | Path) -> None:
    """Write ``ae.safetensors`` + ``config.json`` (the VAEConfig) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}, str(out / "ae.safetensors"))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1), encoding="utf-8")


def load_trained_vae(directory: str | Path) -> AutoEncoder:
    """The AutoEncoder exported by the vae stage (``ae.safetensors`` + ``config.json``), in eval mode."""
    root = Path(directory)
    cfg_path, weights = root / "config.json", root / "ae.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise UserError("not a trained VAE folder (expected ae.safetensors and config.json from "
                            "`unibrain train`'s vae stage)", str(p))
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON ({exc})", str(cfg_path)) from exc
    names = {f.name for f in dataclasses.fields(VAEConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"unknown VAE config keys {unknown}", str(cfg_path))
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    ae = AutoEncoder(cfg)
    try:
        ae.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"weights do not match config.json ({str(exc)[:300]})", str(weights)) from exc
    return ae.eval()


class VAEStage(StageTask):
    """Train the recipe's AutoEncoder (``model.vae``) from scratch; see the module docstring."""

    name = "vae"
    unit = "images"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.cfg: VAEConfig = ctx.recipe.model.vae
        self._train: SliceDataset | None = None
        self._choices: list[list[int]] = []
        self._sampler: EpochSampler | None = None

    # -- checks and data -------------------------------------------------------------------------
    def _allowed_channels(self, modalities: str) -> list[int]:
        allowed = set(self.ctx.recipe.data.modalities)
        present = [m for m in str(modalities).split("|") if m]
        return [MODALITIES.index(m) for m in present if m in allowed and m in MODALITIES]

    def check(self) -> None:
        data_dir = self.ctx.data_dir
        meta = read_slices_meta(data_dir)
        size = self.ctx.recipe.data.image_size
        if int(meta["size"]) != size:
            raise UserError(f"slices have image size {meta['size']} but the recipe's data.image_size is {size}; "
                            f"re-run `unibrain slice --size {size}` or --set data.image_size={meta['size']}",
                            str(data_dir))
        if self.cfg.in_channels not in (1, 3):
            raise UserError(f"model.vae.in_channels must be 1 or 3, got {self.cfg.in_channels}", "model.vae.in_channels")
        self._dataset()
        if not self._choices:
            raise UserError(f"the train split has no slices with any of the modalities {list(self.ctx.recipe.data.modalities)}"
                            " (empty train split?); check `unibrain slice` and data.modalities", str(data_dir))

    def _dataset(self) -> SliceDataset:
        if self._train is None:
            ds = SliceDataset(self.ctx.data_dir, split="train")
            choices = [self._allowed_channels(m) for m in ds.index["modalities"]]
            keep = [i for i, c in enumerate(choices) if c]
            ds.index = ds.index.iloc[keep].reset_index(drop=True)
            self._choices = [choices[i] for i in keep]
            self._train = ds
        return self._train

    def _sampler_for(self) -> EpochSampler:
        if self._sampler is None:
            ds = self._dataset()
            seed = self.ctx.recipe.train.seed * 1000 + self.ctx.index
            self._sampler = EpochSampler(len(ds), self.ctx.stage.batch_size, seed,
                                         self.ctx.rank, self.ctx.world_size)
        return self._sampler

    def _to_input(self, images: np.ndarray) -> Tensor:
        """[B, S, S] in [0, 1] -> [B, in_channels, S, S] in [-1, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None] * 2.0 - 1.0
        return x.expand(-1, self.cfg.in_channels, -1, -1).contiguous()

    # -- StageTask ---------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg = dataclasses.replace(self.cfg, scale_factor=1.0, shift_factor=0.0)
        return VAETrainModule(AutoEncoder(cfg))

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        """{"x": [B, C, S, S] in [-1, 1], "eps": [B, z, S/d, S/d] posterior noise}; per item the
        modality is drawn before its noise, so a batch of 2B equals two batches of B."""
        ds, sampler = self._dataset(), self._sampler_for()
        s, d = ds.size, self.cfg.downsample
        images, eps = [], []
        for i in sampler.indices(position):
            chans = self._choices[i]
            c = chans[int(torch.randint(len(chans), (1,), generator=generator))]
            images.append(ds.arrays(i)["images"][c])
            eps.append(torch.randn((self.cfg.z_channels, s // d, s // d), generator=generator))
        return {"x": self._to_input(np.stack(images)), "eps": torch.stack(eps)}

    def loss(self, model: nn.Module, batch: dict[str, Any], norm: Mapping[str, float] | None = None) -> StepOutput:
        # no loss_counts: per-micro-batch means (images of equal size; norm is always None)
        x = batch["x"]
        x_hat, mean, logvar = model(x, batch["eps"])
        loss, recon, kl = vae_loss(x, x_hat, mean, logvar, self.ctx.stage.kl_weight,
                                     self.ctx.stage.recon_loss)
        return StepOutput(loss, {"recon": float(recon.detach()), "kl": float(kl.detach())}, int(x.shape[0]))

    def _eval_images(self) -> tuple[np.ndarray, np.ndarray]:
        """Fixed held-out batch: the first EVAL_IMAGES val slices (train when no val), the allowed
        modalities in turn (slice i takes its (i mod n)-th). Returns (images [N, S, S] in [0, 1],
        brain masks [N, S, S])."""
        ds = SliceDataset(self.ctx.data_dir, split="val")
        if len(ds) == 0:
            ds = SliceDataset(self.ctx.data_dir, split="train")
        images, brains = [], []
        for i in range(len(ds)):
            chans = self._allowed_channels(ds.index["modalities"].iloc[i])
            if not chans:
                continue
            arr = ds.arrays(i)
            images.append(arr["images"][chans[len(images) % len(chans)]])
            brains.append(arr["brain"])
            if len(images) == EVAL_IMAGES:
                break
        return np.stack(images), np.stack(brains)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean PSNR (dB, [0, 1] images) of posterior-mean reconstructions: full field of view
        (``psnr``) and brain mask only (``psnr_brain``)."""
        ae: AutoEncoder = model.ae  # type: ignore[assignment]
        images, brains = self._eval_images()
        was_training = ae.training
        ae.eval()
        with torch.no_grad():
            rec = ae.decoder(ae.encode_moments(self._to_input(images))[0]).float()
        ae.train(was_training)
        rec01 = ((rec.mean(1).numpy() + 1.0) / 2.0).clip(0.0, 1.0)
        scores = [psnr(p, r) for p, r in zip(rec01, images)]
        brain = [psnr(p, r, b > 0) for p, r, b in zip(rec01, images, brains) if (b > 0).any()]
        return {"psnr": float(np.mean(scores)), "psnr_brain": float(np.mean(brain)) if brain else float("nan"),
                "eval_images": float(len(scores))}

    def fit_latent_scale(self, ae: AutoEncoder) -> dict[str, float]:
        """Latent mean/std over the brain positions of up to STATS_IMAGES training slices (first
        allowed modality each), falling back to the full field when no slice has brain; the
        full-field mean/std are reported alongside (``mean_full``/``std_full``)."""
        ds = self._dataset()
        order = np.random.default_rng(self.ctx.recipe.train.seed).permutation(len(ds))[:STATS_IMAGES]
        arrays = [ds.arrays(int(i)) for i in order]
        images = np.stack([a["images"][self._choices[int(i)][0]] for a, i in zip(arrays, order)])
        masks = latent_brain_mask(np.stack([a["brain"] for a in arrays]), self.cfg.downsample)
        was_training = ae.training
        ae.eval()
        x = self._to_input(images)
        mu_full, std_full = latent_stats(ae, x)
        mu, std = latent_stats(ae, x, masks=masks) if bool(masks.any()) else (mu_full, std_full)
        ae.train(was_training)
        if not np.isfinite(std) or std <= 0:
            raise RuntimeError(f"degenerate latent statistics (std {std}); the VAE did not train")
        return {"mean": mu, "std": std, "region": "brain" if bool(masks.any()) else "full",
                "brain_fraction": float(masks.float().mean()), "mean_full": mu_full, "std_full": std_full,
                "num_images": float(len(images))}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        ae: AutoEncoder = model.ae  # type: ignore[assignment]
        stats = self.fit_latent_scale(ae)
        cfg = dataclasses.replace(self.cfg, scale_factor=1.0 / stats["std"], shift_factor=stats["mean"])
        save_vae(ae, cfg, out_dir)
        (Path(out_dir) / "latent_stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
