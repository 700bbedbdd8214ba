"""``unibrain impute --protocol released``: the released checkpoint fills missing modalities.

Per processed slice (``--slices`` as for ``impute``: ``all`` by default, the whole volume;
``lesion`` is their middle lesion slice and needs a lesion mask), the given modalities enter in :data:`~unibrain_cli.modalities.MODALITIES`
order as LPI slices of their uint8 volumes, padded to 256 (:mod:`unibrain_cli.released.images`).

- ``task="generation"`` (their ``--task generation``, the default): every target on every slice
  is generated from the given images alone, in a fresh context (imputation only, 10 steps,
  shift 3); ``--ensemble N`` = N fresh runs with seeds ``seed .. seed + N - 1``, averaged as
  uint8 (their ``sample_time``).
- ``task="unified"`` (their ``--task unified``): one chain per slice (system prompt, thinking,
  images one after the other, shift 1); the first slice also answers (impression, diagnosis);
  ``--ensemble N`` = N draws per target from the same context, their uint8 average continuing
  the chain.

Outputs (temporary folder, then moved into ``--out``; nothing on error), as ``impute`` writes them:
``<mod>_imputed.nii.gz`` (the generated slice's grey level / 255, i.e. the protocol's 0-255 scale
mapped to [0, 1], on the first input's own grid; slices not processed are 0), ``<mod>_std.nii.gz``
(ensemble > 1), ``montage.png`` and ``impute.json`` (``"protocol": "released"``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from unibrain_cli.errors import UserError
from unibrain_cli.inference.checkpoint import resolve_memory
from unibrain_cli.inference.engine import Answer
from unibrain_cli.inference.impute import (
    FORMAT,
    ImputeResult,
    case_record,
    check_out_dir,
    check_targets,
    montage,
    publish,
    sequence_order,
    write_png,
)
from unibrain_cli.inference.inputs import (
    CaseVolumes,
    InputSpec,
    coverage,
    load_case,
    parse_slices,
    to_output_space,
)
from unibrain_cli.io.atomic import write_text
from unibrain_cli.io.volume import Volume, save_volume
from unibrain_cli.modalities import DISPLAY_NAMES
from unibrain_cli.model.memory import MemoryOptions
from unibrain_cli.released.engine import ReleasedEngine, run_generation, run_unified
from unibrain_cli.released.folder import ReleasedBundle, ReleasedFiles, load_released, resolve_released
from unibrain_cli.released.images import (
    lpi_slice,
    lpi_unslice,
    output_slice,
    raw_volumes,
    released_slices,
    rescale_to_uint8,
    slice_rgb,
)
from unibrain_cli.released.protocol import (
    CODES,
    GENERATION_SAMPLER,
    THINK_MAX_LENGTH,
    UNIFIED_SAMPLER,
    classify_answer,
)

ReleasedTask = Literal["generation", "unified"]
TASKS: tuple[str, ...] = ("generation", "unified")


def check_task(task: str | None) -> ReleasedTask:
    """``generation`` (also for None) | ``unified``; UserError naming ``--task`` otherwise."""
    if task is None:
        return "generation"
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; use generation or unified", "--task")
    return task  # type: ignore[return-value]


def load_uint8_case(spec: InputSpec) -> tuple[CaseVolumes, list[str], dict[str, np.ndarray]]:
    """(case on its 1 mm grid, input modalities in sequence order, modality -> uint8 volume [X, Y, Z])."""
    case = load_case(spec)
    raw = raw_volumes(spec, case)
    order = sequence_order(list(case.volumes))
    return case, order, {m: rescale_to_uint8(raw[m], case.sources[m]) for m in order}


def load_bundle(files: ReleasedFiles, device: str, memory: MemoryOptions | None = None) -> ReleasedBundle:
    """Load the released model onto ``--device`` (float32 on CPU, bf16 on CUDA, unless ``--dtype``),
    with ``--quantize`` / ``--offload`` (``memory``)."""
    dev, dtype = resolve_memory(device, memory)
    return load_released(files, dev, dtype, memory)


def slices_to_fill(case: CaseVolumes, mode: str | int) -> list[int]:
    """The axial slices ``impute`` fills (:func:`released_slices`); UserError for ``lesion`` without
    a lesion mask and for slices that would fill no output voxel (as ``impute`` refuses them)."""
    if mode == "lesion" and (case.lesion is None or not case.lesion.any()):
        raise UserError("'lesion' needs a lesion mask (a prepared case with mask.nii.gz); "
                        "use --slices all (the whole volume) or a number of slices", "--slices")
    ks = released_slices(case, mode)
    if coverage(case, ks)[1] == 0:
        raise UserError(f"the {len(ks)} generated 1-mm slice(s) fall between the slices of "
                        f"{next(iter(case.sources.values()))}: no output voxel would be filled; use --slices all",
                        "--slices")
    return ks


def _volume(slices: dict[int, np.ndarray], case: CaseVolumes) -> np.ndarray:
    """Grey slices {k: [Y, X] in [0, 1]} -> float32 volume on the output grid (zeros elsewhere)."""
    vol = np.zeros(case.shape, dtype=np.float32)
    for k, plane in slices.items():
        vol[:, :, k] = lpi_unslice(plane)
    return to_output_space(vol, case).array


def impute_slices(
    engine: ReleasedEngine,
    u8: dict[str, np.ndarray],
    ks: Sequence[int],
    targets: Sequence[str],
    task: ReleasedTask,
    seed: int,
    ensemble: int,
    steps: int | None = None,
    think_max_length: int = THINK_MAX_LENGTH,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[list[np.ndarray]]], dict[str, str], Answer | None]:
    """Run the task on every slice.

    Returns (target -> per slice the output grey uint8 [h, w], target -> per slice its draws,
    thinking of the first slice, its answer (unified only)).
    """
    images: dict[str, list[np.ndarray]] = {t: [] for t in targets}
    draws: dict[str, list[list[np.ndarray]]] = {t: [] for t in targets}
    thinking: dict[str, str] = {}
    answer = None
    for i, k in enumerate(ks):
        rgbs, sizes = zip(*(slice_rgb(v, k) for v in u8.values()), strict=True)
        hw = sizes[0]
        if task == "generation":
            for t in targets:
                gens = [torch.Generator().manual_seed(seed + j) for j in range(ensemble)]
                res = run_generation(engine, rgbs, t, gens, steps)
                images[t].append(output_slice(res.image, hw))
                draws[t].append([output_slice(d, hw) for d in res.draws])
            continue
        chain = run_unified(engine, rgbs, targets, torch.Generator().manual_seed(seed), sample_time=ensemble,
                            think_max_length=think_max_length, answer=i == 0, steps=steps)
        for t in targets:
            images[t].append(output_slice(chain.images[t], hw))
            draws[t].append([output_slice(d, hw) for d in chain.draws[t]])
        if i == 0:
            thinking = dict(chain.thinking)
            label = chain.label or ""
            answer = Answer(label, chain.impression or "", classify_answer(label)[0] or "")
    return images, draws, thinking, answer


def impute_released(
    spec: InputSpec,
    want: Sequence[str] | None,
    ckpt: str | Path | None,
    base: str | Path | None,
    out: Path | None,
    slices: str = "all",
    ensemble: int = 1,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    task: str | None = "generation",
    steps: int | None = None,
    think_max_length: int = THINK_MAX_LENGTH,
    bundle: ReleasedBundle | None = None,
    progress: bool = False,
    memory: MemoryOptions | None = None,
) -> ImputeResult:
    """Impute ``want`` with the released checkpoint and write the outputs into ``out`` (module docstring).

    Args:
        spec: the inputs; want: targets in order (None: the missing ones of T1 -> T2 -> FLAIR -> T1ce).
        ckpt, base: ``--ckpt`` and ``--base`` (ignored when ``bundle`` is given, except for the record).
        out, force: output folder (absent or empty unless ``force``).
        slices: ``lesion``, ``all`` or K; ensemble: draws averaged; seed: first seed.
        task: ``generation`` (imputation only) or ``unified`` (the chain).
        steps: Euler updates (default 9, i.e. their 10 timesteps); think_max_length: unified thinking bound.
    """
    t0 = time.perf_counter()
    if ensemble < 1:
        raise UserError("must be at least 1", "--ensemble")
    mode = parse_slices(slices)
    task_ = check_task(task)
    targets = check_targets(list(spec.files), want)
    out = check_out_dir(out, force)
    files = resolve_released(ckpt, base) if bundle is None else bundle.files
    case, order, u8 = load_uint8_case(spec)  # bad inputs fail before the (slow) model load
    if bundle is None:
        bundle = load_bundle(files, device, memory)
    t_load = time.perf_counter()
    ks = slices_to_fill(case, mode)
    brain_voxels, filled_voxels = coverage(case, ks)
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer, progress=progress)
    images, draws, thinking, answer = impute_slices(engine, u8, ks, targets, task_, seed, ensemble, steps,
                                                    think_max_length)
    t_gen = time.perf_counter()
    seeds = [seed + j for j in range(ensemble)] if task_ == "generation" else [seed]
    sampler = GENERATION_SAMPLER if task_ == "generation" else UNIFIED_SAMPLER
    record = {
        "format": FORMAT,
        "protocol": "released",
        "task": task_,
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "base": str(base) if base is not None else None,
        "files_used": bundle.files.to_dict(),
        **case_record(case, order, targets, mode, ks, brain_voxels, filled_voxels),
        "codes": {m: CODES[m] for m in [*order, *targets]},
        "ensemble": ensemble,
        "memory": (memory or MemoryOptions()).to_dict(),
        "seeds": seeds,
        "thinking": thinking,
        "impression": answer.impression if answer else None,
        "answer": answer.text if answer else None,
        "diagnosis": (answer.diagnosis or None) if answer else None,
        "sampler": asdict(sampler) | {"euler_steps": steps or sampler.euler_steps},
        "intensity": "generated grey level / 255 ([0, 1]); inputs mapped to 1-255 by the 0.5/99.5 percentiles "
                     "of their voxels > 0 (released protocol)",
        "seconds": {"load": round(t_load - t0, 3), "generate": round(t_gen - t_load, 3)},
    }
    inputs_gray = {m: np.stack([lpi_slice(u8[m], k) / 255.0 for k in ks]) for m in order}
    written = write_outputs(out, case, ks, targets, images, draws, inputs_gray, record)
    return ImputeResult(out, written, list(ks), thinking, answer, dict(record["seconds"]),  # type: ignore[arg-type]
                        coverage=filled_voxels / max(brain_voxels, 1))


def write_outputs(out: Path, case: CaseVolumes, ks: Sequence[int], targets: Sequence[str],
                  images: dict[str, list[np.ndarray]], draws: dict[str, list[list[np.ndarray]]],
                  inputs_gray: dict[str, np.ndarray], record: dict) -> dict[str, str]:
    """Write volumes, std maps, montage and impute.json into a temporary folder, then into ``out``."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        files: dict[str, str] = {}
        for m in targets:
            mean = _volume({k: img / 255.0 for k, img in zip(ks, images[m], strict=True)}, case)
            name = f"{m}_imputed.nii.gz"
            save_volume(Volume(mean.astype(np.float32), case.out_affine), tmp / name,
                        description=f"UniBrain synthetic {DISPLAY_NAMES[m]} (released)")
            files[m] = name
            if record["ensemble"] > 1:
                std = _volume({k: np.std(np.stack(d) / 255.0, axis=0) for k, d in zip(ks, draws[m], strict=True)}, case)
                std_name = f"{m}_std.nii.gz"
                save_volume(Volume(std.astype(np.float32), case.out_affine), tmp / std_name,
                            description=f"UniBrain synthetic {DISPLAY_NAMES[m]} std (released)")
                files[f"{m}_std"] = std_name
        generated = {m: np.stack(images[m]) / 255.0 for m in targets}
        write_png(tmp / "montage.png", montage(inputs_gray, generated))
        files["montage"] = "montage.png"
        files["json"] = "impute.json"
        write_text(tmp / "impute.json", json.dumps(record | {"files": files}, indent=1) + "\n")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
