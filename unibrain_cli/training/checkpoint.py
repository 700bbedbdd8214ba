"""Atomic, pickle-free training checkpoints (``RUN/<stage>/checkpoint-<step>/``).

A checkpoint folder holds only safetensors and JSON::

    model.safetensors      full state dict of the stage's module (float tensors as trained)
    ema.safetensors        EMA shadows of the trained parameters (float32), by parameter name
    optimizer.safetensors  every tensor of the optimizer state, key "state/<param key>/<name>"
    optimizer.json         the rest of the optimizer state dict (param_groups, non-tensor state)
    rng.safetensors        torch CPU / CUDA RNG states and each rank's generator (uint8 tensors)
    state.json             step, data position, EMA update count, scheduler state, numpy and
                           python RNG states, world size, recipe hash

It is written into a temporary folder and renamed into place (``atomic_dir``), so a folder named
``checkpoint-<step>`` is always complete. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir

CHECKPOINT_FORMAT = "unibrain-checkpoint/1"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Checkpoint:
    """Everything needed to continue a stage exactly (see module docstring for the files)."""

    step: int
    position: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    ema_updates: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generators: dict[int, Tensor]  # rank -> torch.Generator state (uint8)
    global_rng: dict[str, Any] = field(default_factory=dict)  # see capture_global_rng
    world_size: int = 1
    recipe_hash: str = ""


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses aliases)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        t = v.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        t = t.contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into (tensors, JSON-able rest).

    Tensors go to ``"state/<key>/<name>"``; the JSON part records param_groups, non-tensor
    state values, and whether the state keys were ints (torch) or strings (FSDP names).
    """
    tensors: dict[str, Tensor] = {}
    meta_state: dict[str, dict[str, Any]] = {}
    keys = list(state.get("state", {}))
    for key, entry in state.get("state", {}).items():
        meta_entry: dict[str, Any] = {}
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tkey = f"state/{key}/{name}"
                tensors[tkey] = value
                meta_entry[name] = {"tensor": tkey}
            else:
                meta_entry[name] = {"value": value}
        meta_state[str(key)] = meta_entry
    meta = {
        "key_type": "int" if all(isinstance(k, int) for k in keys) else "str",
        "state": meta_state,
        "param_groups": state.get("param_groups", []),
    }
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state` (lists in param_groups become tuples, except params)."""
    as_int = meta.get("key_type") == "int"
    state: dict[Any, dict[str, Any]] = {}
    for key, entry in meta["state"].items():
        state[int(key) if as_int else key] = {
            name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()
        }
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def capture_global_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Process-global RNG states: torch (CPU, each CUDA device) as uint8 tensors; numpy and python
    ``random`` as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    np_state = np.random.get_state(legacy=False)
    np_json = {"bit_generator": np_state["bit_generator"],
               "state": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])},
               "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])}
    py = random.getstate()
    return tensors, {"numpy": np_json, "python": [py[0], list(py[1]), py[2]]}


def restore_global_rng(tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Inverse of :func:`capture_global_rng` (CUDA states only when the device count matches)."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in info:
        s = info["numpy"]
        np.random.set_state({"bit_generator": s["bit_generator"],
                             "state": {"key": np.asarray(s["state"]["key"], dtype=np.uint32),
                                       "pos": s["state"]["pos"]},
                             "has_gauss": s["has_gauss"], "gauss": s["gauss"]})
    if "python" in info:
        v, st, g = info["python"]
        random.setstate((v, tuple(st), g))


def checkpoint_dir(stage_dir: str | Path, step: int) -> Path:
    return Path(stage_dir) / f"checkpoint-{step}"


def list_checkpoints(stage_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a stage folder, ``(step, path)`` sorted by step."""
    root = Path(stage_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint of a stage folder, or None."""
    found = list_checkpoints(stage_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``path`` (replacing an older folder of the same name)."""
    path = Path(path)
    opt_tensors, opt_meta = flatten_optimizer_state(ckpt.optimizer)
    rng_tensors, rng_json = capture_global_rng() if not ckpt.global_rng else ({}, {})
    if ckpt.global_rng:
        rng_tensors = {k: v for k, v in ckpt.global_rng.items() if isinstance(v, Tensor)}
        rng_json = {k: v for k, v in ckpt.global_rng.items() if not isinstance(v, Tensor)}
    rng_tensors.update({f"generator.rank{r}": s for r, s in ckpt.generators.items()})
    state = {
        "format": CHECKPOINT_FORMAT, "step": ckpt.step, "position": ckpt.position,
        "ema_updates": ckpt.ema_updates, "scheduler": ckpt.scheduler, "world_size": ckpt.world_size,
        "recipe_hash": ckpt.recipe_hash, "rng": rng_json,
    }
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(_cpu_tensors(ckpt.model), str(tmp / "model.safetensors"))
        save_file(_cpu_tensors(ckpt.ema), str(tmp / "ema.safetensors"))
        save_file(_cpu_tensors(opt_tensors), str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        save_file(_cpu_tensors(rng_tensors), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a folder written by :func:`save_checkpoint` (tensors on CPU)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
        opt_meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        rng = load_file(str(path / "rng.safetensors"))
        model = load_file(str(path / "model.safetensors"))
        ema = load_file(str(path / "ema.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read training checkpoint ({exc}); delete it to resume from an earlier one",
                        str(path)) from exc
    generators = {int(k.removeprefix("generator.rank")): v for k, v in rng.items() if k.startswith("generator.rank")}
    global_rng: dict[str, Any] = {k: v for k, v in rng.items() if not k.startswith("generator.rank")}
    global_rng.update(state.get("rng", {}))
    return Checkpoint(
        step=int(state["step"]), position=int(state["position"]), model=model, ema=ema,
        ema_updates=int(state["ema_updates"]), optimizer=unflatten_optimizer_state(opt_tensors, opt_meta),
        scheduler=state["scheduler"], generators=generators, global_rng=global_rng,
        world_size=int(state.get("world_size", 1)), recipe_hash=str(state.get("recipe_hash", "")),
    )
