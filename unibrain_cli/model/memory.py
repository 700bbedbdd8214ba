"""Memory options for inference: compute dtype, weight quantisation, layer offload / streaming.

A BAGEL-7B-MoT model holds 14.6B parameters (29.2 GB in bf16, 58 GB in float32). Three knobs
(``--dtype``, ``--quantize``, ``--offload`` of ``impute`` / ``diagnose`` / ``report``), carried as
one :class:`MemoryOptions`:

- ``dtype``: ``auto`` (float32 on the CPU, bf16 on CUDA where supported: the default of
  :func:`unibrain_cli.inference.checkpoint.resolve_device`), ``bf16`` or ``fp32``.
- ``quantize``: ``none``; ``int8`` — weight-only int8 (per output row scale) of every ``nn.Linear``
  of the MoT decoder layers, through torchao's ``Int8WeightOnlyConfig`` (CPU and CUDA); ``nf4`` —
  bitsandbytes 4-bit NormalFloat (CUDA only). The embeddings, LM head, ViT, bridges and the
  autoencoder keep the compute dtype (the decoder layers are 13.05B of the 14.6B parameters).
  Layers are quantised one by one while loading, so the unquantised model never exists at once.
- ``offload``: ``none``; ``cpu`` — decoder-layer weights stay in CPU memory and each layer is
  copied to the GPU just before it runs (CUDA only); ``disk`` — decoder-layer weights stay in the
  checkpoint's safetensors file and each layer is read (memory-mapped, cast to the compute dtype,
  moved to the device) just before it runs and dropped after it (:class:`LayerStreamer`). On the
  CPU this is how the 14.6B model runs in 24 GiB of RAM. Outputs equal the in-memory model's
  bit for bit (same tensors, same operations); only time is spent.

Everything here is a no-op for the default options (``MemoryOptions()``): the default path loads
exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unibrain_cli.errors import UserError

DTYPES: tuple[str, ...] = ("auto", "bf16", "fp32")
QUANTIZE: tuple[str, ...] = ("none", "int8", "nf4")
OFFLOAD: tuple[str, ...] = ("none", "cpu", "disk")
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: State-dict prefix of the MoT decoder layers (``language_model.model.layers.N.``).
LAYER_PREFIX = "language_model.model.layers."


@dataclass(frozen=True)
class MemoryOptions:
    """How the model is held in memory (see the module docstring).

    Attributes:
        dtype: ``auto`` | ``bf16`` | ``fp32``.
        quantize: ``none`` | ``int8`` | ``nf4``.
        offload: ``none`` | ``cpu`` | ``disk``.
    """

    dtype: str = "auto"
    quantize: str = "none"
    offload: str = "none"

    @property
    def is_default(self) -> bool:
        return self == MemoryOptions()

    def torch_dtype(self, default: torch.dtype) -> torch.dtype:
        """The compute dtype: ``default`` (the device's) for ``auto``."""
        return TORCH_DTYPES.get(self.dtype, default)

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.dtype, "quantize": self.quantize, "offload": self.offload}


def _choice(value: str | None, allowed: tuple[str, ...], flag: str) -> str:
    name = (value if value is not None else allowed[0]).strip().lower()
    if name not in allowed:
        raise UserError(f"unknown value '{value}'; use {', '.join(allowed)}", flag)
    return name


def memory_options(dtype: str | None = "auto", quantize: str | None = "none", offload: str | None = "none") -> MemoryOptions:
    """Parse the three flags; UserError naming the flag for an unknown value or a bad combination."""
    opts = MemoryOptions(_choice(dtype, DTYPES, "--dtype"), _choice(quantize, QUANTIZE, "--quantize"),
                         _choice(offload, OFFLOAD, "--offload"))
    if opts.quantize != "none" and opts.offload != "none":
        raise UserError(f"--quantize {opts.quantize} and --offload {opts.offload} cannot be combined: quantise to "
                        "fit the weights in memory, or stream them, not both", "--offload")
    return opts


def check_memory_options(opts: MemoryOptions, device: torch.device | str) -> None:
    """Refuse options this device or this installation cannot run (UserError naming the flag)."""
    dev = torch.device(device)
    if opts.quantize == "nf4":
        if dev.type != "cuda":
            raise UserError("--quantize nf4 needs a CUDA device (bitsandbytes); on the CPU use --quantize int8")
        if not _importable("bitsandbytes"):
            raise UserError("nf4 needs the bitsandbytes package: pip install 'unibrain[gpu]'", "--quantize")
    if opts.quantize == "int8" and not _importable("torchao"):
        raise UserError("int8 needs the torchao package: pip install torchao", "--quantize")
    if opts.offload == "cpu" and dev.type != "cuda":
        raise UserError("cpu keeps the layers in CPU memory for a GPU; with --device cpu use --offload disk "
                        "(each layer read from the checkpoint file just before it runs)", "--offload")
    if opts.dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16; use --dtype fp32", "--dtype")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# layer names
# ---------------------------------------------------------------------------------------------


def layer_index(name: str) -> int | None:
    """N of a ``language_model.model.layers.N.*`` state-dict key, else None."""
    if not name.startswith(LAYER_PREFIX):
        return None
    head = name[len(LAYER_PREFIX):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The MoT decoder layers of a :class:`~unibrain_cli.model.bagel.UniBrainModel`."""
    return model.language_model.model.layers  # type: ignore[union-attr, return-value]


def set_tensor(module: nn.Module, name: str, value: Tensor | nn.Parameter) -> None:
    """Replace parameter/buffer ``name`` (dotted, relative to ``module``) by ``value``."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer")


# ---------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """torchao's import logs a warning per CUDA kernel library it cannot load on a CPU machine, and
    torch one about an Enum it registers: hide them (they are not the user's business)."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def quantize_linears(module: nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Quantise every ``nn.Linear`` in ``module`` (``module`` itself included; weights loaded); returns
    ``module``, or its replacement when ``module`` is itself a replaced linear (``nf4``).

    ``int8``: torchao weight-only int8 in place, one scale per output row (the weight keeps the
    compute dtype as its logical dtype). ``nf4``: each linear becomes a bitsandbytes ``Linear4bit``
    (NF4, compute dtype ``compute_dtype``), quantised when moved to the CUDA ``device``.
    """
    if mode == "none":
        return module
    if mode == "int8":
        with _quiet_torchao():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False))
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    if mode == "nf4":  # pragma: no cover - CUDA + bitsandbytes only
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        def to_nf4(lin: nn.Linear) -> nn.Module:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.to("cpu", compute_dtype), requires_grad=False)
            return q.to(device)

        if isinstance(module, nn.Linear):
            return to_nf4(module)
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, attr, to_nf4(child))
        return module
    raise ValueError(f"unknown quantisation {mode!r}")


def tensor_bytes(t: Tensor) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (torchao's int8 weights)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if t.is_meta:
        return 0
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` that live in memory (meta ones count 0)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


# ---------------------------------------------------------------------------------------------
# streaming decoder layers
# ---------------------------------------------------------------------------------------------

LayerLoader = Callable[[int], dict[str, Tensor]]


class BufferPool:
    """Buffers of converted streamed layers, reused by the next layer of the same shapes.

    Only buffers the pool made or adopted (:meth:`adopt`) come back into it: tensors that are views
    of a file mapping are never kept (they would keep the mapping and its pages alive).
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype, str], list[Tensor]] = {}
        self._owned: set[int] = set()

    @staticmethod
    def _device(device: torch.device | str) -> str:
        dev = torch.device(device)
        index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else 0)
        return f"{dev.type}:{index}"

    def take(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> Tensor | None:
        """A free buffer of that shape, dtype and device (removed from the free list), or None."""
        free = self._free.get((tuple(shape), dtype, self._device(device)))
        return free.pop() if free else None

    def adopt(self, t: Tensor) -> Tensor:
        """Mark a freshly allocated tensor as the pool's (it comes back with :meth:`give`)."""
        self._owned.add(t.data_ptr())
        return t

    def give(self, tensors: dict[str, Tensor]) -> None:
        """Return tensors nobody uses any more (a streamed layer's, after its forward)."""
        for t in tensors.values():
            t = t.data if isinstance(t, nn.Parameter) else t
            if t.data_ptr() in self._owned:
                self._free.setdefault((tuple(t.shape), t.dtype, self._device(t.device)), []).append(t)


class LayerStreamer:
    """Holds the decoder layers' weights outside the model and puts each layer's in just for its forward.

    The layers' parameters stay on the meta device (no memory). A forward pre-hook on layer i
    calls ``load(i)`` (tensor name relative to the layer -> tensor on the execution device, in the
    compute dtype) and assigns the tensors; a forward hook (run also when the forward raises) puts
    the meta placeholders back, so at most one layer's weights are held at a time.

    Attributes:
        loads: number of layer loads so far (tests / benchmarks).
    """

    def __init__(self, layers: nn.ModuleList, load: LayerLoader,
                 release: Callable[[dict[str, Tensor]], None] | None = None) -> None:
        self.layers = layers
        self.load = load
        self.release = release
        self.loads = 0
        self._placeholders: list[dict[str, Tensor]] = []
        self._handles: list[Any] = []
        for i, layer in enumerate(layers):
            self._placeholders.append({n: t for n, t in layer.named_parameters()})
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(layer.register_forward_hook(self._post_hook(i), always_call=True))

    def _pre_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            tensors = self.load(i)
            expected = self._placeholders[i]
            if set(tensors) != set(expected):
                raise RuntimeError(f"streamed layer {i} got tensors {sorted(set(tensors) ^ set(expected))[:4]} "
                                   "that do not match the layer")
            for name, t in tensors.items():
                set_tensor(module, name, t)
            self.loads += 1

        return hook

    def _post_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.release is not None:
                params = dict(module.named_parameters())
                self.release({name: params[name] for name in self._placeholders[i] if not params[name].is_meta})
            for name, placeholder in self._placeholders[i].items():
                set_tensor(module, name, placeholder)

        return hook

    def remove(self) -> None:
        """Detach the hooks (the layers keep their meta placeholders)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_streamer(model: nn.Module, load: LayerLoader,
                    release: Callable[[dict[str, Tensor]], None] | None = None) -> LayerStreamer:
    """Stream the decoder layers of ``model`` through ``load`` (see :class:`LayerStreamer`; ``release``
    receives a layer's tensors after its forward); kept on the model as ``model.layer_streamer``."""
    streamer = LayerStreamer(decoder_layers(model), load, release)
    model.layer_streamer = streamer  # type: ignore[assignment]
    return streamer
