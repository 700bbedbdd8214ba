"""Supervised CNN diagnosis reference: what a dedicated image classifier reaches on Table 1's
closed-set diagnosis, per input scenario.

The unified model's closed-set Top-1 (Table 1) is read against this reference the way the U-Net
(:mod:`unibrain_cli.evaluation.baselines`) is a supervised reference for imputation: a small CNN
trained, **one model per scenario**, on every train-split slice of a slices folder that is in the
scenario's cohort (:func:`~unibrain_cli.evaluation.scenarios.scenario_inputs`) and carries exactly
one known disease class (:data:`~unibrain_cli.modalities.DISEASES`). It is the ceiling the data
allows an image-only classifier with this much training, not a competitor of the generative model.

Network (:class:`DiagnosisCNN`): input [B, 12, S, S] = the 6 modality channels in
:data:`~unibrain_cli.modalities.MODALITIES` order, zeroed where the modality is not an input of
the scenario, followed by 6 constant presence planes (1 where the modality is an input); four
blocks 3x3 conv -> GroupNorm -> ReLU with 32, 64, 64, 64 channels, 2x2 max-pool after the first
three, global average pool, linear to the classes. The first conv has stride 2 (``stem_stride``):
at 64 px that keeps 1,000 steps of batch 32 at about 30 s on one CPU thread (about 4x less than
stride 1) while the first layer still sees every pixel. About 97k parameters.

Training (:func:`train_classifier`): cross-entropy, AdamW, cosine decay to 10 % of ``lr``, random
left-right flips, batches drawn from successive random permutations of the training slices. Every
random draw (weight init, batches, flips) comes from one ``torch.Generator`` seeded with ``seed``,
so a seed gives bit-identical weights on CPU. Saved as ``weights.safetensors`` + ``config.json``
(never pickle).

Evaluation (:func:`evaluate_classifier`): Top-1 (%) over the split's evaluation slices
(``is_eval``, one per case: the cases of ``unibrain evaluate``) of the scenario's cohort with a
single known class, or over every such slice of the split with ``all_slices``. Run it as

    python -m unibrain_cli.evaluation.classifier SLICES [--scenario t1,complete] [--split test]
        [--all-slices] [--steps 1000] [--seed 0]

which prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unibrain_cli.data.slices_data import SliceDataset
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation.baselines import read_net_folder, save_net_folder
from unibrain_cli.evaluation.scenarios import SCENARIOS, parse_scenarios, scenario_inputs
from unibrain_cli.modalities import DISEASES, MODALITIES

CLASSIFIER_FORMAT = "unibrain-diagnosis-cnn/1"
#: Channels of the four conv blocks.
WIDTHS: tuple[int, ...] = (32, 64, 64, 64)
#: Training steps and slices per step of :func:`train_classifier` by default.
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 32
#: Slices read from a shard folder at a time when loading a split into memory.
_READ_CHUNK = 64


# --------------------------------------------------------------------------- network


class DiagnosisCNN(nn.Module):
    """Small image classifier: [B, in_channels, H, W] -> logits [B, n_classes] (any H, W >= 1).

    ``len(widths)`` blocks of 3x3 conv -> GroupNorm -> ReLU; 2x2 max-pool after every block but
    the last; the first conv has stride ``stem_stride``; global average pool; linear head.
    """

    def __init__(
        self,
        n_classes: int,
        in_channels: int = 2 * len(MODALITIES),
        widths: Sequence[int] = WIDTHS,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        if n_classes < 1 or not widths:
            raise ValueError(f"need >= 1 class and >= 1 block, got {n_classes} classes, widths {widths}")
        layers: list[nn.Module] = []
        cin = in_channels
        for k, cout in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, 3, stride=stem_stride if k == 0 else 1, padding=1),
                       nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU()]
            if k < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, n_classes)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Re-initialise from ``generator`` (CPU): He-uniform convs, uniform(+-1/sqrt(fan_in)) head,
        zero biases, unit GroupNorm scales."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                fan_in = mod.weight[0].numel()
                bound = math.sqrt(6.0 / fan_in) if isinstance(mod, nn.Conv2d) else 1.0 / math.sqrt(fan_in)
                w = torch.empty(mod.weight.shape).uniform_(-bound, bound, generator=generator)
                mod.weight.copy_(w)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.GroupNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- input rule


def input_mask(scenario: str, present: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bool [B, 6]: the scenario's input modalities of each row with presence ``present`` [B, 6].

    A ValueError names the first row not in the scenario's cohort (lacking one of its inputs).
    """
    pres = np.asarray(present.cpu() if isinstance(present, torch.Tensor) else present).astype(bool)
    if pres.ndim != 2 or pres.shape[1] != len(MODALITIES):
        raise ValueError(f"present must be [B, {len(MODALITIES)}], got {pres.shape}")
    mask = np.zeros_like(pres)
    for i, row in enumerate(pres):
        inputs = scenario_inputs(scenario, [m for m, p in zip(MODALITIES, row, strict=True) if p])
        if inputs is None:
            raise ValueError(f"row {i} (modalities {[m for m, p in zip(MODALITIES, row, strict=True) if p]}) "
                             f"is not in the cohort of scenario {scenario!r}")
        mask[i, [MODALITIES.index(m) for m in inputs]] = True
    return mask


def _single_class(diseases: object) -> str | None:
    """The one known class of an index ``diseases`` cell ("|"-joined), else None."""
    names = [d for d in str(diseases).split("|") if d]
    return names[0] if len(names) == 1 and names[0] in DISEASES else None


def _cohort(ds: SliceDataset, scenario: str) -> tuple[np.ndarray, list[str]]:
    """Positions in ``ds`` of the slices in the scenario's cohort with a single known class, and
    those classes."""
    rows, labels = [], []
    for i, (mods, dis) in enumerate(zip(ds.index["modalities"], ds.index["diseases"], strict=True)):
        label = _single_class(dis)
        if label is not None and scenario_inputs(scenario, [m for m in str(mods).split("|") if m]) is not None:
            rows.append(i)
            labels.append(label)
    return np.asarray(rows, dtype=np.int64), labels


def _read(ds: SliceDataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images float32 [N, 6, S, S] and present bool [N, 6] of ``rows`` of ``ds``, in memory."""
    images, present = [], []
    for s in range(0, len(rows), _READ_CHUNK):
        b = ds.batch(rows[s:s + _READ_CHUNK].tolist())
        images.append(b["images"])
        present.append(b["present"].astype(bool))
    if not images:
        return np.zeros((0, len(MODALITIES), ds.size, ds.size), np.float32), np.zeros((0, len(MODALITIES)), bool)
    return np.concatenate(images), np.concatenate(present)


# --------------------------------------------------------------------------- reference model


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a diagnosis CNN: its scenario, classes (output order), widths and stem stride."""

    scenario: str
    classes: tuple[str, ...]
    widths: tuple[int, ...] = WIDTHS
    stem_stride: int = 2


class ClassifierReference:
    """A trained scenario classifier: :meth:`scores` / :meth:`predict` map slices to disease classes.

    ``meta`` records the training (steps, seed, batch size, lr, split, number of training slices,
    image size, final loss); ``history`` the per-step cross-entropy losses of this process.
    """

    def __init__(self, config: ClassifierConfig, net: DiagnosisCNN | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        if config.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {config.scenario!r}")
        self.config = config
        self.net = net if net is not None else DiagnosisCNN(len(config.classes), 2 * len(MODALITIES),
                                                            config.widths, config.stem_stride)
        self.meta: dict[str, Any] = dict(meta or {})
        self.history: list[float] = []

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    @property
    def scenario(self) -> str:
        return self.config.scenario

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def net_inputs(self, images: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor) -> torch.Tensor:
        """images [B, 6, S, S] + present [B, 6] -> network input [B, 12, S, S]: the scenario's input
        channels (others zeroed) then one constant plane per modality (1 where it is an input)."""
        mask = torch.from_numpy(input_mask(self.scenario, present)).to(self.device, torch.float32)
        img = torch.as_tensor(images, dtype=torch.float32, device=self.device)
        if img.ndim != 4 or img.shape[:2] != mask.shape:
            raise ValueError(f"images must be [B, {len(MODALITIES)}, S, S] matching present {tuple(mask.shape)}, "
                             f"got {tuple(img.shape)}")
        planes = mask[:, :, None, None].expand_as(img)
        return torch.cat([img * planes, planes], dim=1)

    @torch.no_grad()
    def scores(self, images: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor,
               batch_size: int = 64) -> np.ndarray:
        """Softmax class probabilities float32 [B, len(classes)] of images float [B, 6, S, S] in [0, 1]
        with presence [B, 6]; every row must be in the scenario's cohort (ValueError otherwise)."""
        was_training = self.net.training
        self.net.eval()
        outs = [torch.softmax(self.net(self.net_inputs(images[s:s + batch_size], present[s:s + batch_size])), -1)
                .float().cpu().numpy() for s in range(0, len(images), batch_size)]
        self.net.train(was_training)
        return np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: np.ndarray | torch.Tensor, present: np.ndarray | torch.Tensor,
                batch_size: int = 64) -> list[str]:
        """The most probable class name of each row (see :meth:`scores`)."""
        return [self.classes[int(k)] for k in self.scores(images, present, batch_size).argmax(axis=1)]

    def save(self, directory: str | Path) -> None:
        """Write ``weights.safetensors`` + ``config.json`` into ``directory`` (atomic, overwrites)."""
        save_net_folder(directory, self.net, {"format": CLASSIFIER_FORMAT, **asdict(self.config), "meta": self.meta})

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ClassifierReference:
        """Read a model written by :meth:`save`."""
        raw, state = read_net_folder(directory, CLASSIFIER_FORMAT, "diagnosis classifier")
        config = ClassifierConfig(scenario=str(raw["scenario"]), classes=tuple(raw["classes"]),
                                  widths=tuple(int(w) for w in raw["widths"]), stem_stride=int(raw["stem_stride"]))
        model = cls(config, meta=raw.get("meta", {}))
        model.net.load_state_dict(state)
        model.net.to(device).eval()
        return model


# --------------------------------------------------------------------------- training


def train_classifier(
    slices: str | Path,
    scenario: str,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    *,
    split: str = "train",
    widths: Sequence[int] = WIDTHS,
    stem_stride: int = 2,
) -> ClassifierReference:
    """Train the ``scenario``'s classifier for ``steps`` AdamW steps of ``batch_size`` slices on every
    ``split`` slice (evaluation slice or not) in the scenario's cohort with a single known class.

    The classes are those of :data:`DISEASES` seen in training, in that order. Deterministic for a
    ``seed`` on CPU (one generator for init, batches and flips). UserError for a bad scenario,
    ``steps`` or ``batch_size`` < 1, or no usable slice.
    """
    names = parse_scenarios(scenario, "scenario")
    if len(names) != 1:
        raise UserError(f"give exactly one scenario, got {scenario!r}", "scenario")
    scenario = names[0]
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}", "--steps")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}", "batch_size")
    ds = SliceDataset(slices, split=split)
    rows, labels = _cohort(ds, scenario)
    if rows.size == 0:
        raise UserError(f"no {split} slice is in the cohort of scenario {scenario!r} with a single disease "
                        f"class of {', '.join(DISEASES)}; cannot train its diagnosis classifier", str(slices))
    classes = tuple(c for c in DISEASES if c in labels)
    images_np, present_np = _read(ds, rows)
    g = torch.Generator().manual_seed(seed)
    model = ClassifierReference(ClassifierConfig(scenario, classes, tuple(int(w) for w in widths), stem_stride))
    model.net.init_weights(g)
    model.net.to(device).train()
    x_all = model.net_inputs(images_np, present_np)  # [N, 12, S, S] on device
    y_all = torch.tensor([classes.index(c) for c in labels], device=model.device)
    del images_np
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    queue = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while queue.numel() < batch_size:
            queue = torch.cat([queue, torch.randperm(rows.size, generator=g)])
        pick, queue = queue[:batch_size], queue[batch_size:]
        flip = (torch.rand(batch_size, generator=g) < 0.5).to(model.device)
        pick = pick.to(model.device)
        x = x_all[pick]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model.net(x), y_all[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        model.history.append(float(loss.detach()))
    model.net.eval()
    model.meta = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "split": split,
                  "train_slices": int(rows.size), "train_per_class": {c: labels.count(c) for c in classes},
                  "image_size": ds.size, "final_loss": float(np.mean(model.history[-10:]))}
    return model


# --------------------------------------------------------------------------- evaluation


def _pct(hits: np.ndarray) -> float | None:
    return round(100.0 * float(hits.mean()), 2) if hits.size else None


def evaluate_classifier(
    slices: str | Path,
    scenarios: str | Sequence[str] = "all",
    split: str = "test",
    all_slices: bool = False,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Per scenario: train on the train split (:func:`train_classifier`) and score Top-1 (%) on the
    ``split``'s evaluation slices (``is_eval``) of the scenario's cohort with a single known class,
    or on every such slice with ``all_slices``.

    Returns ``{"slices", "split", "selection" ("eval" | "all"), "steps", "seed", "scenarios": {name:
    {"top1", "n", "per_class": {class: {"top1", "n"}}, "majority_top1", "classes", "train_slices",
    "train_seconds", "final_loss"}}}``; Top-1 values are percentages (None with no slice). A
    scenario with no scored slice is reported with ``n`` 0 and not trained.
    """
    names = parse_scenarios(scenarios)
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}", "--steps")
    ds = SliceDataset(slices, split=split, is_eval=None if all_slices else True)
    if len(ds) == 0:
        raise UserError(f"no {'' if all_slices else 'evaluation '}slices in split {split!r}", str(slices))
    out: dict[str, Any] = {"slices": str(slices), "split": split, "selection": "all" if all_slices else "eval",
                           "steps": steps, "seed": seed, "scenarios": {}}
    for name in names:
        rows, labels = _cohort(ds, name)
        if rows.size == 0:
            out["scenarios"][name] = {"top1": None, "n": 0, "per_class": {}, "majority_top1": None}
            continue
        t0 = time.perf_counter()
        model = train_classifier(slices, name, steps, seed, batch_size, lr, device)
        seconds = time.perf_counter() - t0
        images, present = _read(ds, rows)
        hits = np.asarray([p == t for p, t in zip(model.predict(images, present), labels, strict=True)], bool)
        truth = np.asarray(labels)
        per_class = {c: {"top1": _pct(hits[truth == c]), "n": int((truth == c).sum())}
                     for c in DISEASES if (truth == c).any() or c in model.classes}
        majority = max(int((truth == c).sum()) for c in set(labels))
        out["scenarios"][name] = {
            "top1": _pct(hits), "n": int(hits.size), "per_class": per_class,
            "majority_top1": round(100.0 * majority / hits.size, 2), "classes": list(model.classes),
            "train_slices": model.meta["train_slices"], "train_seconds": round(seconds, 2),
            "final_loss": round(model.meta["final_loss"], 4),
        }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m unibrain_cli.evaluation.classifier",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("slices", help="slices folder (from `unibrain slice`)")
    ap.add_argument("--scenario", default="all", help="t1, t1_t2, t1_t2_flair, complete, comma-separated, or all")
    ap.add_argument("--split", default="test", help="split to score (default test)")
    ap.add_argument("--all-slices", action="store_true", help="score every slice of the split, not one per case")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        res = evaluate_classifier(a.slices, a.scenario, a.split, a.all_slices, a.steps, a.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
