"""The one place where parallelism, activation checkpointing and compile touch a model.

Model code stays single-device. The trainer builds a plain ``nn.Module`` and calls, in order,

1. :func:`apply_model_transforms` (activation checkpointing, optional ``torch.compile``), then
2. :func:`make_accelerator` + ``accelerator.prepare`` which wraps the model for DDP (always under
   ``accelerate launch --num_processes N``) or FSDP (when ``ACCELERATE_USE_FSDP`` is set, e.g.
   ``accelerate launch --use_fsdp``; the plugin comes from :func:`fsdp_plugin`).

Checkpoint and export code never looks inside the wrapper: it uses :func:`named_parameters`
(clean parameter names), :func:`full_params` (gathers sharded FSDP parameters; a no-op otherwise)
and :func:`optimizer_state_dict` / :func:`load_optimizer_state_dict`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.utils.checkpoint import checkpoint

#: Name fragments inserted by wrappers; removed by :func:`clean_name`.
WRAPPER_PREFIXES: tuple[str, ...] = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def clean_name(name: str) -> str:
    """A parameter name without FSDP / checkpoint / compile / DDP wrapper fragments."""
    for frag in WRAPPER_PREFIXES[:3]:
        name = name.replace(frag, "")
    return name


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{clean name: parameter}`` of an unwrapped (possibly FSDP-sharded) model."""
    return {clean_name(n): p for n, p in model.named_parameters()}


def layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ``layers`` ModuleLists of ``model`` (the transformer / residual stacks), by name."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        path = f"{name}.layers" if name else "layers"
        if any(path.startswith(f"{outer}.") for outer, _ in found):
            continue
        found.append((path, layers))
    return found


def _checkpointed(layer: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if layer.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every layer of each outermost ``layers`` ModuleList in the backward pass.

    Generic: any module exposing ``layers: nn.ModuleList`` qualifies (the LLM decoder, the ViT).
    The layer's ``forward`` is replaced in place by a ``torch.utils.checkpoint`` (non-reentrant)
    call, so state-dict keys do not change; it is only active in training mode with grad enabled.
    Returns the number of layers wrapped (idempotent: already wrapped layers are skipped).
    """
    n = 0
    for _, layers in layer_lists(model):
        for layer in layers:
            if getattr(layer, "_unibrain_checkpointed", False):
                continue
            layer.forward = _checkpointed(layer, layer.forward)  # type: ignore[method-assign]
            layer._unibrain_checkpointed = True  # type: ignore[assignment]
            n += 1
    return n


def apply_model_transforms(model: nn.Module, *, activation_checkpointing: bool = False,
                           compile: bool = False) -> nn.Module:
    """Activation checkpointing and ``torch.compile`` (in place, keys unchanged); returns ``model``."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        model.compile()
    return model


def fsdp_requested() -> bool:
    """True when ``accelerate launch --use_fsdp`` (or ACCELERATE_USE_FSDP=true) started us."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes", "on")


def fsdp_plugin(model: nn.Module) -> FullyShardedDataParallelPlugin | None:
    """FSDP plugin for ``model`` when FSDP is requested, else None.

    ``use_orig_params`` is forced (stages freeze parts of the model). Unless the launcher set
    ``FSDP_AUTO_WRAP_POLICY``, each layer class found in a ``layers`` ModuleList is a wrap unit.
    Other settings (sharding strategy, offload, ...) come from accelerate's FSDP_* variables.
    """
    if not fsdp_requested():
        return None
    kwargs: dict[str, Any] = {"use_orig_params": True, "state_dict_type": "FULL_STATE_DICT"}
    classes = sorted({type(layer).__name__ for _, layers in layer_lists(model) for layer in layers})
    if "FSDP_AUTO_WRAP_POLICY" not in os.environ and classes:
        kwargs.update(auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=classes)
    return FullyShardedDataParallelPlugin(**kwargs)


def make_accelerator(model: nn.Module, mixed_precision: str, grad_accum: int,
                     find_unused_parameters: bool = False) -> Accelerator:
    """The Accelerator of one stage: DDP / FSDP from the launcher's environment, single process
    (CPU or one GPU) otherwise. ``mixed_precision`` is "no", "bf16" or "fp16";
    ``find_unused_parameters`` is passed to DDP (stages whose forward may skip trainable weights)."""
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       fsdp_plugin=fsdp_plugin(model), kwargs_handlers=handlers)


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def full_params(accelerator: Accelerator, model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
    """Yield the unwrapped model with full (unsharded) parameters.

    Under FSDP this is ``summon_full_params`` on every rank (``writeback`` keeps changes);
    otherwise parameters are already full and this only unwraps. ``model`` is the prepared model.
    """
    inner = accelerator.unwrap_model(model)
    if not is_fsdp(accelerator):
        yield inner
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=writeback, rank0_only=False):
        yield inner


def optimizer_state_dict(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state dict (FSDP: gathered, keyed by parameter name)."""
    if not is_fsdp(accelerator):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True),
                              FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=False)):
        return FSDP.optim_state_dict(model, getattr(optimizer, "optimizer", optimizer))


def load_optimizer_state_dict(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Inverse of :func:`optimizer_state_dict` (call after ``accelerator.prepare``)."""
    if not is_fsdp(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    inner = getattr(optimizer, "optimizer", optimizer)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True),
                              FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=False)):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, inner, state))
