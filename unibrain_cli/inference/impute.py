"""``unibrain impute``: generate missing modalities as NIfTI volumes in the input's own space.

By default every axial slice that holds brain is imputed (``--slices all``: the whole volume);
``--slices lesion`` (the lesion's middle slice, needs a lesion mask) and ``--slices K`` are
explicit choices. Each (slice, seed) row runs the interleaved chain — instruction -> generated
thinking -> sampled image -> re-encoded image, for each wanted modality in order — and rows
run ``--batch-size`` at a time through batched KV caches
(:func:`unibrain_cli.inference.batched.impute_chains`, the same outputs as one by one with
:func:`unibrain_cli.inference.engine.impute_chain`). The representative slice (the first) of
the first seed also answers the case (impression and diagnosis). Generated slices are put back
into the 1 mm grid and resampled onto the first input file's grid
(:func:`inputs.to_output_space`, box-averaged over thick output voxels). Every output voxel
inside the input's brain receives generated values with ``all``; with fewer slices the filled
fraction is recorded (``coverage``), and a choice that would fill no output voxel at all (one
1 mm slice between the slices of a thick-slab scan) is refused.

Outputs (all written to a temporary folder, then moved into ``--out``; nothing on error):

    <mod>_imputed.nii.gz   ensemble mean, header description "UniBrain synthetic <mod>",
                           intensities in [0, 1] (the normalised scale), 0 outside the brain
    <mod>_std.nii.gz       per-voxel standard deviation over the ensemble (when --ensemble > 1)
    montage.png            processed slices: inputs | imputed
    impute.json            thinking per modality, impression, diagnosis, seeds, slices, checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unibrain_cli.config.loader import recipe_to_dict
from unibrain_cli.data import templates
from unibrain_cli.errors import UserError
from unibrain_cli.inference.batched import impute_chains, row_context
from unibrain_cli.inference.checkpoint import InferenceBundle, load_for_inference, resolve_checkpoint
from unibrain_cli.inference.engine import Answer, Engine, generate_answer, impute_chain
from unibrain_cli.inference.inputs import (
    CaseVolumes,
    InputSpec,
    SliceGeometry,
    coverage,
    cut_slices,
    load_case,
    parse_slices,
    paste_slices,
    select_slices,
    slice_geometry,
    to_output_space,
)
from unibrain_cli.io.atomic import atomic_path, write_text
from unibrain_cli.io.volume import Volume, save_volume
from unibrain_cli.modalities import DISPLAY_NAMES, MODALITIES
from unibrain_cli.model.memory import MemoryOptions

FORMAT = "unibrain-impute/1"
#: Default targets: the paper's imputation chain T1 -> T2 -> FLAIR -> T1ce.
CHAIN: tuple[str, ...] = ("t1", "t2", "flair", "t1ce")
MONTAGE_ROWS = 8
#: (slice, seed) rows imputed together by default: 4x+ faster than one by one on 2 CPU cores
#: (``make bench``: impute_full_volume), a few hundred MB of KV cache for ``small``.
DEFAULT_BATCH = 16


@dataclass
class ImputeResult:
    """What :func:`impute` wrote."""

    out: Path
    files: dict[str, str]
    slices: list[int]
    thinking: dict[str, str]
    answer: Answer | None
    timings: dict[str, float] = field(default_factory=dict)
    coverage: float = 1.0  # fraction of the output's brain voxels that received generated slices


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def check_targets(have: Sequence[str], want: Sequence[str] | None, known: Sequence[str] = MODALITIES) -> list[str]:
    """The modalities to generate: ``want`` (validated), or the missing ones of :data:`CHAIN`."""
    if want:
        both = [m for m in want if m in have]
        if both:
            raise UserError(f"'{both[0]}' is both given and wanted; drop it from --want", "--want")
        unknown = [m for m in want if m not in known]
        if unknown:
            raise UserError(f"this model was not trained on '{unknown[0]}' (it knows {', '.join(known)})", "--want")
        return list(want)
    targets = [m for m in CHAIN if m not in have and m in known]
    if not targets:
        raise UserError("nothing to impute: every chain modality is given; name targets with --want", "--want")
    return targets


def check_out_dir(out: Path | None, force: bool) -> Path:
    """``--out`` must be absent or an empty folder (or any folder with ``force``)."""
    if out is None:
        raise UserError("an output folder is required", "--out")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another folder or pass --force", "--out")
    return out


def publish(tmp: Path, out: Path) -> None:
    """Move every file of ``tmp`` into ``out`` (renames; ``out`` is created when absent)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in sorted(tmp.iterdir()):
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(tmp, ignore_errors=True)


def sequence_order(mods: Sequence[str]) -> list[str]:
    """Inputs enter the sequence in :data:`MODALITIES` order (the chain order of training)."""
    return [m for m in MODALITIES if m in mods]


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def case_record(case: CaseVolumes, order: Sequence[str], targets: Sequence[str], mode: str | int,
                ks: Sequence[int], brain_voxels: int, filled_voxels: int) -> dict[str, object]:
    """The impute.json fields about the case: inputs, output grid, sequence, slices, coverage
    (shared by the native and the released protocol)."""
    return {
        "inputs": case.sources,
        "output_grid": {"file": next(iter(case.sources.values())), "shape": list(case.out_shape),
                        "affine": np.round(case.out_affine, 6).tolist()},
        "sequence_inputs": list(order),
        "targets": list(targets),
        "slices_mode": str(mode),
        "slices": list(ks),
        "representative_slice": ks[0],
        "coverage": {"brain_voxels": brain_voxels, "filled_voxels": filled_voxels,
                     "fraction": round(filled_voxels / max(brain_voxels, 1), 4)},
    }


def montage(inputs: dict[str, np.ndarray], generated: dict[str, np.ndarray], rows: int = MONTAGE_ROWS) -> np.ndarray:
    """Grey image [rows*S, cols*S] in [0, 1]: one row per slice, columns = inputs then imputed."""
    cols = [*inputs.values(), *generated.values()]
    n = min(rows, cols[0].shape[0])
    return np.concatenate([np.concatenate([c[i] for c in cols], axis=1) for i in range(n)], axis=0)


def write_png(path: Path, image: np.ndarray) -> None:
    """Save a grey [H, W] image in [0, 1] as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        plt.imsave(tmp, np.clip(image, 0, 1), cmap="gray", vmin=0.0, vmax=1.0, format="png")


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def run_slices(
    engine: Engine,
    images: dict[str, np.ndarray],
    brain: np.ndarray,
    targets: Sequence[str],
    seeds: Sequence[int],
    thinking_tokens: int,
    answer_tokens: int,
    steps: int | None = None,
    progress: bool = False,
    batch_size: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, str], Answer | None]:
    """Run the chain on every slice and seed.

    Rows (slice i, seed j) run ``batch_size`` at a time through
    :func:`unibrain_cli.inference.batched.impute_chains` (one forward per generated token and
    per Euler step for the whole batch); ``batch_size=1`` (or an uncached engine) runs them one
    by one with :func:`impute_chain`. Both give the same slices up to float rounding.

    Args:
        images: given modality -> [K, S, S] in [0, 1] (sequence order).
        brain: [K, S, S] brain masks.

    Returns:
        (modality -> generated [len(seeds), K, S, S], thinking of slice 0 / seed 0, answer of the same).
    """
    k_count = brain.shape[0]
    gen = {m: np.zeros((len(seeds), k_count, engine.image_size, engine.image_size), np.float32) for m in targets}
    thinking: dict[str, str] = {}
    answer = None
    rows = [(i, j) for i in range(k_count) for j in range(len(seeds))]
    batched = batch_size > 1 and engine.cached
    bar = task = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from unibrain_cli.io.console import progress_bar

        bar = progress_bar(TextColumn("imputing slices"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           transient=True)
        bar.start()
        task = bar.add_task("imputing", total=len(rows))
    try:
        if batched:
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo:lo + batch_size]
                inputs = {m: torch.from_numpy(v[[i for i, _ in chunk]]) for m, v in images.items()}
                mask = torch.from_numpy(brain[[i for i, _ in chunk]].astype(np.float32))
                res = impute_chains(engine, inputs, targets, [seeds[j] for _, j in chunk], thinking_tokens,
                                    brain=mask, steps=steps)
                for b, (i, j) in enumerate(chunk):
                    for m in targets:
                        gen[m][j, i] = res.images[m][b].numpy()
                if lo == 0:
                    thinking = res.thinking[0]
                    if answer_tokens > 0:
                        answer = generate_answer(engine, row_context(res.contexts.cond, 0), templates.both_question(),
                                                 answer_tokens)
                if bar is not None and task is not None:
                    bar.advance(task, len(chunk))
            return gen, thinking, answer
        for i in range(k_count):
            slice_inputs = {m: torch.from_numpy(v[i]) for m, v in images.items()}
            mask = torch.from_numpy(brain[i].astype(np.float32))
            start = engine.start(engine.encode(torch.stack(list(slice_inputs.values())), list(slice_inputs)))
            for j, s in enumerate(seeds):
                first = i == 0 and j == 0
                res1 = impute_chain(engine, slice_inputs, targets, seed=s, thinking_tokens=thinking_tokens,
                                    answer_tokens=answer_tokens if first else 0, brain=mask, start=start, steps=steps)
                for m in targets:
                    gen[m][j, i] = res1.images[m].numpy()
                if first:
                    thinking, answer = res1.thinking, res1.answer
                if bar is not None and task is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return gen, thinking, answer


def volumes_from_slices(
    gen: np.ndarray, ks: Sequence[int], case: CaseVolumes, geo: SliceGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed slices [N, K, S, S] -> (mean, std) volumes over the seeds, on the output grid."""
    outs = []
    for j in range(gen.shape[0]):
        grid = paste_slices({k: gen[j, i] for i, k in enumerate(ks)}, case, geo)
        outs.append(to_output_space(grid, case).array)
    stack = np.stack(outs)
    return stack.mean(axis=0), stack.std(axis=0)


def impute(
    spec: InputSpec,
    want: Sequence[str] | None,
    ckpt: str | Path | None,
    out: Path | None,
    slices: str = "all",
    ensemble: int = 1,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    bundle: InferenceBundle | None = None,
    thinking_tokens: int | None = None,
    answer_tokens: int | None = None,
    steps: int | None = None,
    progress: bool = False,
    batch_size: int = DEFAULT_BATCH,
    memory: MemoryOptions | None = None,
) -> ImputeResult:
    """Impute ``want`` for the case in ``spec`` and write the outputs into ``out`` (see the module docstring).

    Args:
        spec: the inputs (:func:`inputs.resolve_inputs`).
        want: modalities to generate, in order (None: the missing ones of :data:`CHAIN`).
        ckpt: ``--ckpt`` (ignored when ``bundle`` is given; recorded in impute.json).
        out: output folder (absent or empty unless ``force``).
        slices: ``all`` (every axial slice with brain: the whole volume), ``lesion`` (the lesion's
            middle slice; needs a lesion mask) or K (K slices around the lesion or the brain centre).
        ensemble: number of seeds averaged (``seed .. seed + ensemble - 1``).
        bundle: an already loaded model (tests, evaluation).
        thinking_tokens, answer_tokens: bounds on generated text (default: ``data.max_text_tokens``).
        steps: Euler steps (default: the recipe's ``flow.sample_steps``).
        batch_size: (slice, seed) rows run together (:func:`run_slices`); 1 = one by one.
        memory: ``--dtype`` / ``--quantize`` / ``--offload`` (:mod:`unibrain_cli.model.memory`).
    """
    import time

    if ensemble < 1:
        raise UserError("must be at least 1", "--ensemble")
    if batch_size < 1:
        raise UserError("must be at least 1", "--batch-size")
    mode = parse_slices(slices)
    targets = check_targets(list(spec.files), want)
    out = check_out_dir(out, force)
    t0 = time.perf_counter()
    if bundle is None:
        ckpt_path: Path | None = resolve_checkpoint(ckpt)
        case = load_case(spec)  # bad input files fail before the (slow) model load
        bundle = load_for_inference(ckpt_path, device, memory)
    else:
        ckpt_path = Path(ckpt) if ckpt is not None else None
        case = load_case(spec)
    known = bundle.recipe.data.modalities
    targets = check_targets(list(spec.files), targets, known)
    missing_in = [m for m in spec.files if m not in known]
    if missing_in:
        raise UserError(f"this model was not trained on '{missing_in[0]}' (it knows {', '.join(known)})", "--have")
    t_load = time.perf_counter()

    size = bundle.image_size
    if mode == "lesion" and (case.lesion is None or not case.lesion.any()):
        raise UserError("'lesion' needs a lesion mask (a prepared case with mask.nii.gz); "
                        "use --slices all (the whole volume) or a number of slices", "--slices")
    ks = select_slices(case.brain, case.lesion, mode)
    brain_voxels, filled_voxels = coverage(case, ks)
    if filled_voxels == 0:
        first_src = next(iter(case.sources.values()))
        raise UserError(f"the {len(ks)} generated 1-mm slice(s) fall between the slices of {first_src}: no output "
                        "voxel would be filled; use --slices all", "--slices")
    geo = slice_geometry(case.brain, size)
    order = sequence_order(list(case.volumes))
    cut, brain = cut_slices(case, ks, geo)
    images = {m: cut[m] for m in order}
    data = bundle.recipe.data
    engine = Engine(bundle.model, bundle.vae, bundle.tokenizer, bundle.recipe.flow, size, data.max_text_tokens,
                    progress=False)
    seeds = [seed + j for j in range(ensemble)]
    think = data.max_text_tokens if thinking_tokens is None else thinking_tokens
    ans = data.max_text_tokens if answer_tokens is None else answer_tokens
    gen, thinking, answer = run_slices(engine, images, brain, targets, seeds, think, ans, steps, progress,
                                       batch_size=batch_size)
    t_gen = time.perf_counter()

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        files: dict[str, str] = {}
        for m in targets:
            mean, std = volumes_from_slices(gen[m], ks, case, geo)
            name = f"{m}_imputed.nii.gz"
            save_volume(Volume(mean.astype(np.float32), case.out_affine), tmp / name,
                        description=f"UniBrain synthetic {DISPLAY_NAMES[m]}")
            files[m] = name
            if ensemble > 1:
                std_name = f"{m}_std.nii.gz"
                save_volume(Volume(std.astype(np.float32), case.out_affine), tmp / std_name,
                            description=f"UniBrain synthetic {DISPLAY_NAMES[m]} std")
                files[f"{m}_std"] = std_name
        write_png(tmp / "montage.png", montage(images, {m: gen[m].mean(axis=0) for m in targets}))
        files["montage"] = "montage.png"
        record = {
            "format": FORMAT,
            "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
            **case_record(case, order, targets, mode, ks, brain_voxels, filled_voxels),
            "batch_size": batch_size,
            "memory": (memory or MemoryOptions()).to_dict(),
            "ensemble": ensemble,
            "seeds": seeds,
            "thinking": thinking,
            "answer": answer.text if answer else None,
            "impression": answer.impression if answer else None,
            "diagnosis": answer.diagnosis if answer else None,
            "files": files,
            "image_size": size,
            "sampler": recipe_to_dict(bundle.recipe)["flow"] | ({"sample_steps": steps} if steps else {}),
            "intensity": "normalised [0, 1] (0.5-99.5 percentile window of the inputs' scale), 0 outside the brain",
            "seconds": {"load": round(t_load - t0, 3), "generate": round(t_gen - t_load, 3)},
        }
        write_text(tmp / "impute.json", json.dumps(record, indent=1) + "\n")
        files["json"] = "impute.json"
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImputeResult(out, files, ks, thinking, answer, dict(record["seconds"]),
                        filled_voxels / max(brain_voxels, 1))
