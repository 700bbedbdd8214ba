"""Exponential moving average of the trained parameters (what a stage exports).

``shadow = d * shadow + (1 - d) * param`` after every optimizer step, with the usual warm-up
``d = min(decay, (1 + n) / (10 + n))`` (n = updates so far) so short runs are not dominated by the
initial weights. Shadows are kept in float32 on the parameters' device, keyed by parameter name.
Frozen parameters (``requires_grad=False``) are not tracked: their EMA equals the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from unibrain_cli.training.parallel import named_parameters


class EMA:
    """EMA shadows of ``model``'s trainable parameters.

    ``model`` is the unwrapped module (``accelerator.unwrap_model``); names are its clean
    parameter names (:func:`~unibrain_cli.training.parallel.named_parameters`), the keys used in
    checkpoints. Under FSDP the shadows are the rank's local shards; the trainer gathers them
    through ``applied_to`` + ``parallel.full_params``.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in named_parameters(model).items() if p.requires_grad
        }

    def current_decay(self) -> float:
        """The decay applied by the next :meth:`update` (warm-up included)."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current trainable parameters into the shadows."""
        d = self.current_decay()
        params = named_parameters(model)
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily copy the shadows into ``model``'s parameters (restored on exit)."""
        params = named_parameters(model)
        backup = {name: params[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, shadow in self.shadow.items():
                    params[name].copy_(shadow.to(params[name].dtype))
            yield model
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    params[name].copy_(saved)

    def state_tensors(self) -> dict[str, Tensor]:
        """Shadows as CPU tensors for a safetensors file."""
        return {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}

    def load_state(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        """Restore shadows saved by :meth:`state_tensors`; the key sets must match exactly."""
        missing = sorted(set(self.shadow) - set(tensors))
        extra = sorted(set(tensors) - set(self.shadow))
        if missing or extra:
            raise ValueError(f"EMA keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, t in tensors.items():
            self.shadow[name].copy_(t.to(self.shadow[name].device, torch.float32))
        self.num_updates = int(num_updates)
