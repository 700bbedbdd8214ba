"""Image-only imputation baselines trained on the same slices as UniBrain (train split).

Two baselines, both with the same call :meth:`impute(images, present, brain, inputs, target)`:

- :class:`CopyNearestBaseline` ("copy-nearest"): the target modality is replaced by the
  available input modality most similar to it (fixed table :data:`COPY_PREFERENCE`),
  intensity-matched inside the brain by histogram matching
  (``skimage.exposure.match_histograms``) against the *mean training histogram* of the
  target modality. That template is the average, over all train-split slices holding the
  target, of the brain-voxel quantile function at :data:`COPY_LEVELS` levels (the 1D
  Wasserstein barycentre of the per-slice histograms). Histogram matching was chosen over a
  per-pair linear regression because it needs no source/target pairing and handles the
  non-linear contrast differences between sequences; being monotone it cannot invert
  contrast (T1 -> T2 CSF), which is what makes it a floor, not a competitor.
  Output is 0 outside the given brain mask (evaluation: the inputs' mask), like the prepared data.
- :class:`UNetBaseline` ("unet"): a supervised U-Net image-to-image regressor, **one model
  per chain** (T1 -> T2; T1,T2 -> FLAIR; T1,T2,FLAIR -> T1ce; see :data:`CHAINS`), as the
  paper's generative baselines are per-task imputers. Inputs are the chain's modality
  channels (zeros where missing) followed by one constant presence plane per input
  (1 present, 0 missing); output is the target modality. L1 loss, AdamW, cosine decay, random
  left-right flips. Default width 24, depth 3: about 1.09M parameters. Saved as
  ``weights.safetensors`` + ``config.json`` (never pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.exposure import match_histograms
from torch import nn

from unibrain_cli.data.slices_data import SliceDataset
from unibrain_cli.data.slicing import slice_brain_mask
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir, write_text
from unibrain_cli.modalities import MODALITIES, parse_modality

#: The paper's imputation chains (Table 2): (available inputs, target).
CHAINS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("t1",), "t2"),
    (("t1", "t2"), "flair"),
    (("t1", "t2", "flair"), "t1ce"),
)

#: Target -> input modalities in order of preference for copy-nearest. Rationale: T2 and
#: FLAIR are both T2-weighted; DWI (b=1000) is T2-weighted EPI; T1ce is T1 plus contrast;
#: ADC shares bright CSF with T2.
COPY_PREFERENCE: dict[str, tuple[str, ...]] = {
    "t1": ("t1ce", "flair", "t2", "dwi", "adc"),
    "t2": ("flair", "dwi", "t1", "t1ce", "adc"),
    "flair": ("t2", "dwi", "t1", "t1ce", "adc"),
    "t1ce": ("t1", "flair", "t2", "dwi", "adc"),
    "dwi": ("t2", "flair", "adc", "t1", "t1ce"),
    "adc": ("t2", "dwi", "flair", "t1", "t1ce"),
}

#: Number of quantile levels of the copy-nearest intensity templates.
COPY_LEVELS = 256

UNET_FORMAT = "unibrain-unet-baseline/1"
COPY_FORMAT = "unibrain-copy-baseline/1"


def chain_key(inputs: Sequence[str], target: str) -> str:
    """Stable chain name, e.g. ``"t1,t2->flair"``."""
    return ",".join(inputs) + "->" + target


def parse_chain(key: str) -> tuple[tuple[str, ...], str]:
    """Inverse of :func:`chain_key` (aliases accepted): ``"t1,t2->flair"`` -> (("t1","t2"), "flair")."""
    if "->" not in key:
        raise UserError(f"bad chain {key!r}; write it as inputs->target, e.g. t1,t2->flair", "--chain")
    left, right = key.split("->", 1)
    inputs = tuple(parse_modality(m, "--chain") for m in left.split(",") if m.strip())
    target = parse_modality(right, "--chain")
    if not inputs or target in inputs:
        raise UserError(f"bad chain {key!r}: needs at least one input and a target not among them", "--chain")
    return inputs, target


def _batched(images: np.ndarray, present: np.ndarray | None, brain: np.ndarray | None) -> tuple[
    np.ndarray, np.ndarray, np.ndarray | None, bool
]:
    """Bring a single slice or a batch to [N, 6, S, S] / [N, 6] / [N, S, S]; infer ``present``."""
    images = np.asarray(images, dtype=np.float32)
    single = images.ndim == 3
    if single:
        images = images[None]
        present = None if present is None else np.asarray(present)[None]
        brain = None if brain is None else np.asarray(brain)[None]
    if images.ndim != 4 or images.shape[1] != len(MODALITIES):
        raise ValueError(f"images must be [N, {len(MODALITIES)}, S, S] or [{len(MODALITIES)}, S, S], "
                         f"got {images.shape}")
    if present is None:
        present = images.reshape(images.shape[0], images.shape[1], -1).max(axis=2) > 0
    present = np.asarray(present).astype(bool)
    if brain is not None:
        brain = np.asarray(brain).astype(bool)
        if brain.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"brain mask shape {brain.shape} does not match images {images.shape}")
    return images, present, brain, single


# --------------------------------------------------------------------------- copy-nearest


@dataclass
class CopyNearestBaseline:
    """Copy the most similar available modality, histogram-matched inside the brain.

    ``templates[m]`` is the mean training quantile function of modality m (float [COPY_LEVELS]
    over levels linspace(0, 1)); ``counts[m]`` the number of train slices it averages.
    """

    templates: dict[str, np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)
    name: str = "copy-nearest"

    def source_for(self, target: str, available: Sequence[str]) -> str:
        """The preferred available input for ``target`` (see :data:`COPY_PREFERENCE`)."""
        for m in COPY_PREFERENCE[target]:
            if m in available:
                return m
        raise ValueError(f"no input modality available to copy into {target} (have {list(available)})")

    def impute(
        self,
        images: np.ndarray,
        present: np.ndarray | None,
        brain: np.ndarray | None,
        inputs: Sequence[str],
        target: str,
    ) -> np.ndarray:
        """Impute ``target`` from the modalities in ``inputs`` that are present.

        images float [N, 6, S, S] (or [6, S, S]) in [0, 1]; present bool [N, 6] (None: a channel
        is present when non-zero); brain bool [N, S, S] (None: the present inputs' own mask,
        :func:`~unibrain_cli.data.slicing.slice_brain_mask`). Evaluation passes the inputs' mask
        (never the target's). Returns float32 [N, S, S] (or [S, S]) in [0, 1], 0 outside the brain.
        """
        if target not in self.templates:
            raise UserError(f"copy-nearest baseline has no training histogram for {target}; "
                            "the train split held no slice with that modality")
        images, present, brain, single = _batched(images, present, brain)
        template = self.templates[target]
        out = np.zeros((images.shape[0], *images.shape[2:]), dtype=np.float32)
        for i in range(images.shape[0]):
            avail = [m for m in inputs if present[i, MODALITIES.index(m)]]
            src = images[i, MODALITIES.index(self.source_for(target, avail))]
            if brain is not None:
                region = brain[i]
            else:
                region = slice_brain_mask(images[i, [MODALITIES.index(m) for m in avail]])
            if region.any():
                out[i][region] = match_histograms(src[region], template)
        np.clip(out, 0.0, 1.0, out=out)
        return out[0] if single else out

    def save(self, path: str | Path) -> None:
        """Write the templates as JSON (atomic)."""
        payload = {
            "format": COPY_FORMAT,
            "levels": COPY_LEVELS,
            "templates": {m: [float(v) for v in t] for m, t in self.templates.items()},
            "counts": self.counts,
        }
        write_text(path, json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CopyNearestBaseline:
        """Read a baseline written by :meth:`save`."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read copy-nearest baseline ({exc})", str(path)) from exc
        if payload.get("format") != COPY_FORMAT:
            raise UserError(f"not a copy-nearest baseline (format {payload.get('format')!r})", str(path))
        templates = {m: np.asarray(v, dtype=np.float64) for m, v in payload["templates"].items()}
        return cls(templates=templates, counts={m: int(c) for m, c in payload.get("counts", {}).items()})


def fit_copy_nearest(slices_dir: str | Path, split: str = "train") -> CopyNearestBaseline:
    """Learn the per-modality mean brain-intensity quantile functions on ``split`` slices."""
    ds = SliceDataset(slices_dir, split=split)
    if len(ds) == 0:
        raise UserError(f"no slices in split {split!r}; cannot fit the copy-nearest baseline", str(slices_dir))
    levels = np.linspace(0.0, 1.0, COPY_LEVELS)
    sums = {m: np.zeros(COPY_LEVELS) for m in MODALITIES}
    counts = dict.fromkeys(MODALITIES, 0)
    for i in range(len(ds)):
        arr = ds.arrays(i)
        brain = arr["brain"].astype(bool)
        if not brain.any():
            continue
        for c, m in enumerate(MODALITIES):
            if arr["present"][c]:
                sums[m] += np.quantile(arr["images"][c][brain], levels)
                counts[m] += 1
    templates = {m: sums[m] / counts[m] for m in MODALITIES if counts[m]}
    return CopyNearestBaseline(templates=templates, counts={m: c for m, c in counts.items() if c})


# --------------------------------------------------------------------------- U-Net


def save_net_folder(directory: str | Path, net: nn.Module, config: dict[str, Any]) -> None:
    """A trained reference network as ``weights.safetensors`` + ``config.json`` (``config`` holds
    its ``format``), written atomically into ``directory`` (overwrites)."""
    from safetensors.torch import save_file

    with atomic_dir(directory, overwrite=True) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def read_net_folder(directory: str | Path, fmt: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a folder written by :func:`save_net_folder`; UserError naming the
    file when it is missing, corrupt or not of format ``fmt`` (``what``: the model, for messages)."""
    from safetensors.torch import load_file

    root = Path(directory)
    cfg_path, w_path = root / "config.json", root / "weights.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"not a {what} folder (config.json/weights.safetensors missing)", str(root))
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt config.json ({exc})", str(cfg_path)) from exc
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise UserError(f"unsupported {what} format {got!r}", str(cfg_path))
    return raw, load_file(str(w_path))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, ch), ch)


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.SiLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(nn.Module):
    """A plain U-Net: [B, in_channels, H, W] -> [B, out_channels, H, W] (any H, W; padded inside).

    ``depth`` down-samplings by 2, channels ``base * 2**level``.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 24, depth: int = 3) -> None:
        super().__init__()
        self.depth = depth
        chs = [base * 2**i for i in range(depth + 1)]
        self.enc = nn.ModuleList([_ConvBlock(in_channels, chs[0])] +
                                 [_ConvBlock(chs[i], chs[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chs[i + 1], chs[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([_ConvBlock(2 * chs[i], chs[i]) for i in range(depth)])
        self.head = nn.Conv2d(chs[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2**self.depth
        ph, pw = (-h) % mult, (-w) % mult
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.depth)):
            x = self.dec[i](torch.cat([self.up[i](x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a chain U-Net: its input modalities, target, width and depth."""

    inputs: tuple[str, ...]
    target: str
    base_channels: int = 24
    depth: int = 3

    @property
    def in_channels(self) -> int:
        """Image channels plus one presence plane per input."""
        return 2 * len(self.inputs)


class UNetBaseline:
    """A trained chain U-Net; :meth:`impute` / :meth:`predict` map inputs to the target modality."""

    name = "unet"

    def __init__(self, config: UNetConfig, net: UNet | None = None, meta: dict[str, Any] | None = None) -> None:
        self.config = config
        self.net = net if net is not None else UNet(config.in_channels, 1, config.base_channels, config.depth)
        self.meta: dict[str, Any] = dict(meta or {})
        self.history: list[float] = []

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def net_inputs(self, images: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[N, 6, S, S] images + [N, 6] presence -> network input [N, 2k, S, S] (k chain inputs)."""
        idx = [MODALITIES.index(m) for m in self.config.inputs]
        img = torch.as_tensor(images, dtype=torch.float32, device=self.device)[:, idx]
        pres = torch.as_tensor(present, device=self.device)[:, idx].to(torch.float32)
        img = img * pres[:, :, None, None]
        planes = pres[:, :, None, None].expand_as(img)
        return torch.cat([img, planes], dim=1)

    @torch.no_grad()
    def predict(
        self,
        images: np.ndarray,
        present: np.ndarray | None = None,
        brain: np.ndarray | None = None,
        batch_size: int = 16,
    ) -> np.ndarray:
        """Target modality float32 [N, S, S] (or [S, S]) in [0, 1] from images [N, 6, S, S].

        ``present`` bool [N, 6] (None: non-zero channels); with ``brain`` [N, S, S] the output
        is zeroed outside that mask (evaluation passes the inputs' mask, never the target's).
        """
        images, present, brain, single = _batched(images, present, brain)
        was_training = self.net.training
        self.net.eval()
        outs = []
        for s in range(0, images.shape[0], batch_size):
            x = self.net_inputs(images[s:s + batch_size], present[s:s + batch_size])
            outs.append(self.net(x)[:, 0].clamp(0.0, 1.0).float().cpu().numpy())
        self.net.train(was_training)
        out = np.concatenate(outs) if outs else np.zeros((0, *images.shape[2:]), np.float32)
        if brain is not None:
            out = out * brain
        return out[0] if single else out

    def impute(
        self,
        images: np.ndarray,
        present: np.ndarray | None,
        brain: np.ndarray | None,
        inputs: Sequence[str],
        target: str,
    ) -> np.ndarray:
        """Same call as :meth:`CopyNearestBaseline.impute`; the chain must be this model's."""
        if tuple(inputs) != self.config.inputs or target != self.config.target:
            raise ValueError(f"this U-Net imputes {chain_key(self.config.inputs, self.config.target)}, "
                             f"not {chain_key(inputs, target)}")
        return self.predict(images, present, brain)

    def save(self, directory: str | Path) -> None:
        """Write ``weights.safetensors`` + ``config.json`` into ``directory`` (atomic, overwrites)."""
        save_net_folder(directory, self.net, {"format": UNET_FORMAT, **asdict(self.config), "meta": self.meta})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> UNetBaseline:
        """Read a model written by :meth:`save`."""
        raw, state = read_net_folder(directory, UNET_FORMAT, "U-Net baseline")
        config = UNetConfig(inputs=tuple(raw["inputs"]), target=raw["target"],
                            base_channels=int(raw["base_channels"]), depth=int(raw["depth"]))
        model = cls(config, meta=raw.get("meta", {}))
        model.net.load_state_dict(state)
        model.net.to(device)
        return model


def train_unet(
    slices_dir: str | Path,
    chain_inputs: Sequence[str],
    target: str,
    steps: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 8,
    lr: float = 1e-3,
    base_channels: int = 24,
    depth: int = 3,
    split: str = "train",
    progress: bool = False,
) -> UNetBaseline:
    """Train a chain U-Net for ``steps`` AdamW steps on the ``split`` slices holding ``target`` and
    at least one of ``chain_inputs``. Deterministic for a seed on CPU; ``history`` holds the
    per-step L1 losses."""
    inputs = tuple(parse_modality(m, "chain inputs") for m in chain_inputs)
    target = parse_modality(target, "chain target")
    if target in inputs:
        raise UserError(f"target {target} is also an input", "chain")
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}", "steps")
    ds = SliceDataset(slices_dir, split=split, require=[target])
    usable = ds.index["modalities"].map(lambda s: any(m in str(s).split("|") for m in inputs)).to_numpy(bool)
    rows = np.flatnonzero(usable)
    if rows.size == 0:
        raise UserError(f"no {split} slices with {target} and any of {list(inputs)}", str(slices_dir))
    config = UNetConfig(inputs=inputs, target=target, base_channels=base_channels, depth=depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNetBaseline(config)
    model.net.to(device).train()
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = np.random.default_rng(seed)
    t_idx = MODALITIES.index(target)
    bar = None
    if progress:
        from unibrain_cli.io.console import progress_bar

        bar = progress_bar(transient=True)
        task = bar.add_task(f"U-Net {chain_key(inputs, target)}", total=steps)
        bar.start()
    try:
        for _ in range(steps):
            pick = rows[rng.integers(0, rows.size, size=min(batch_size, rows.size))]
            b = ds.batch(pick.tolist())
            flip = rng.random(len(pick)) < 0.5
            imgs = b["images"].copy()
            imgs[flip] = imgs[flip][..., ::-1]
            x = model.net_inputs(imgs, b["present"])
            y = torch.as_tensor(imgs[:, t_idx : t_idx + 1], device=model.device)
            loss = F.l1_loss(model.net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            model.history.append(float(loss.detach()))
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    model.net.eval()
    model.meta = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "split": split,
                  "train_slices": int(rows.size), "image_size": ds.size,
                  "final_loss": float(np.mean(model.history[-10:]))}
    return model


def train_unet_chains(
    slices_dir: str | Path, steps: int, seed: int = 0, device: str | torch.device = "cpu", **kwargs: Any
) -> dict[str, UNetBaseline]:
    """One U-Net per chain of :data:`CHAINS`, keyed by :func:`chain_key` (same seed for each)."""
    return {chain_key(i, t): train_unet(slices_dir, i, t, steps, seed, device, **kwargs) for i, t in CHAINS}
