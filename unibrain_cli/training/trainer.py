"""The generic training loop of one stage (Accelerate; single process, DDP or FSDP).

One optimizer step = ``stage.grad_accum`` micro-batches per rank. Per step:

    draw all micro-batches:  batch_i = task.next_batch(position, generator); position += 1
    counts_i = task.loss_counts(batch_i)          # once per micro-batch (also the log's flow tokens)
    norm = global_loss_norm(counts, accelerator)  # loss-token counts over micro-batches and ranks
    for each micro-batch:    with accumulate + autocast: out = task.loss(model, batch_i, norm=norm); backward
    clip (stage.grad_clip) -> AdamW step -> LR schedule step -> EMA update -> step += 1
    log every train.log_every, checkpoint every train.checkpoint_every, call hooks

Loss normalisation (BAGEL): a stage whose ``loss_counts(batch)`` names its loss terms (e.g.
``{"ntp": 37, "flow": 256, "sa": 64}`` target tokens) has each term normalised by the number of
its target tokens over ALL micro-batches of the optimizer step on ALL ranks, so a micro-batch
with 10 text targets weighs 10/1000 of one with 1000, not as much. ``accelerator.backward``
divides every micro-batch loss by ``grad_accum`` (accelerate 1.x, non-DeepSpeed) and DDP / FSDP
average gradients over the ``world`` ranks, so the task receives
``norm[k] = global_count[k] / (grad_accum * world)`` and returns ``sum of term-k token losses of
its micro-batch / norm[k]``; the accumulated, synchronised gradient is then exactly that of
``sum over the step's tokens of term k / global_count[k]``. With one micro-batch and one process
``norm[k]`` is the micro-batch's own count (the per-micro-batch mean). Logged terms are these
values averaged over micro-batches and ranks, i.e. the per-token mean over the whole step. A
stage without counts (``loss_counts`` returns ``{}``, e.g. ``vae``) is called as
``task.loss(model, batch)`` and keeps its per-micro-batch normalisation.

The LR follows a linear warm-up over ``warmup_steps`` then a cosine decay to ``min_lr`` at
``steps`` (:func:`lr_factor`). Weight decay applies to matrices (ndim >= 2) only. The model
parameters seen by AdamW and the EMA are the ones left trainable by ``task.trainable_modules``;
a submodule with an ``lr_scale`` attribute trains at that multiple of the LR (:func:`build_optimizer`).

Resume is exact: a checkpoint stores weights, EMA, optimizer, scheduler, global RNGs, every
rank's generator, the step and the data position as of the end of a completed step, and
``next_batch`` is a pure function of (position, generator). A Ctrl-C (KeyboardInterrupt) during
a step rolls back to the last completed step, saves it, and re-raises; SIGINT arriving during
the parameter update itself is deferred until the update is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from unibrain_cli.config.components import StageConfig
from unibrain_cli.io.atomic import atomic_dir, write_text
from unibrain_cli.training import parallel
from unibrain_cli.training.checkpoint import (
    Checkpoint,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    restore_global_rng,
    save_checkpoint,
)
from unibrain_cli.training.ema import EMA
from unibrain_cli.training.stages import StageTask, stage_generator


@dataclass
class StepInfo:
    """Passed to hooks after every optimizer step (values of this rank, not reduced)."""

    stage: str
    step: int  # completed optimizer steps
    total: int
    loss: float
    terms: dict[str, float]
    lr: float
    model: nn.Module | None = None  # the unwrapped training module (read-only use)
    rank: int = 0


StepHook = Callable[[StepInfo], None]


@dataclass
class StageResult:
    """Outcome of :func:`run_stage`."""

    name: str
    steps: int
    final_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled and path is not None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_stage(self, stage: str, after_step: int) -> None:
        """Drop this stage's records with step > ``after_step`` (logged after the checkpoint we
        resume from) and unreadable lines, so the log matches the resumed run."""
        if not self.enabled or not self.path or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage") == stage and int(rec.get("step", 0)) > after_step:
                continue
            kept.append(json.dumps(rec))
        write_text(self.path, "".join(k + "\n" for k in kept))


def lr_factor(step: int, stage: StageConfig) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up ``(step + 1) / warmup``,
    then cosine from 1 to ``min_lr / lr`` over the remaining ``steps - warmup`` steps."""
    if stage.warmup_steps > 0 and step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    floor = stage.min_lr / stage.lr if stage.lr > 0 else 0.0
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_trainable(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything (eval mode), then unfreeze (train mode) the named submodules ("" = all).
    Returns the trainable parameters; raises ValueError when none remain."""
    model.requires_grad_(False)
    model.eval()
    for name in names:
        sub = model.get_submodule(name) if name else model
        sub.requires_grad_(True)
        sub.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no trainable parameters for trainable_modules={list(names)}")
    return params


def build_optimizer(model: nn.Module, stage: StageConfig, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over trainable parameters; weight decay on ndim >= 2 tensors only. A submodule with an
    ``lr_scale`` attribute (e.g. the aligned path's draft network) trains its parameters at
    ``lr_scale`` times the stage's learning rate, in groups of their own after the usual two."""
    scale: dict[int, float] = {}
    for module in model.modules():
        if hasattr(module, "lr_scale"):
            for p in module.parameters():
                scale[id(p)] = float(module.lr_scale)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for k in sorted({1.0, *scale.values()}, key=lambda v: v != 1.0):
        mine = [p for p in trainable if scale.get(id(p), 1.0) == k]
        groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": stage.weight_decay, "lr": stage.lr * k},
                   {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "lr": stage.lr * k}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=tuple(betas))


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold back Ctrl-C inside the block (main thread only); re-raise it as KeyboardInterrupt after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def _full_state(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor]:
    """Full model state dict with clean names (FSDP: gathered on every rank)."""
    if parallel.is_fsdp(accelerator):
        state = accelerator.get_state_dict(model)
    else:
        state = accelerator.unwrap_model(model).state_dict()
    return {parallel.clean_name(k): v for k, v in state.items()}


def _ema_state(accelerator: Accelerator, model: nn.Module, ema: EMA) -> dict[str, Tensor]:
    """Full EMA tensors by parameter name (FSDP: local shards swapped in and gathered)."""
    if not parallel.is_fsdp(accelerator):
        return ema.state_tensors()
    with ema.applied_to(accelerator.unwrap_model(model)):
        state = _full_state(accelerator, model)
        return {k: state[k].detach().cpu().clone().float() for k in ema.shadow}


def _load_ema(accelerator: Accelerator, model: nn.Module, ema: EMA, tensors: dict[str, Tensor], n: int) -> None:
    if not parallel.is_fsdp(accelerator):
        ema.load_state(tensors, n)
        return
    with parallel.full_params(accelerator, model, writeback=True) as inner:  # put full EMA into params
        params = parallel.named_parameters(inner)
        backup = {k: params[k].detach().clone() for k in tensors}
        with torch.no_grad():
            for k, t in tensors.items():
                params[k].copy_(t.to(params[k].dtype))
    local = parallel.named_parameters(accelerator.unwrap_model(model))
    ema.load_state({k: local[k].detach() for k in ema.shadow}, n)  # the shards now hold the EMA
    with parallel.full_params(accelerator, model, writeback=True) as inner, torch.no_grad():
        params = parallel.named_parameters(inner)
        for k, t in backup.items():
            params[k].copy_(t)


def _gather_generators(accelerator: Accelerator, state: Tensor) -> dict[int, Tensor]:
    if accelerator.num_processes == 1:
        return {0: state}
    from accelerate.utils import gather_object

    states = gather_object([state.tolist()])
    return {r: torch.tensor(s, dtype=torch.uint8) for r, s in enumerate(states)}


def global_loss_norm(batch_counts: Sequence[Mapping[str, int]], accelerator: Accelerator
                     ) -> dict[str, float] | None:
    """Per-term divisors of one optimizer step (see the module docstring), or None.

    ``batch_counts``: ``task.loss_counts`` of every micro-batch of this rank; they are summed, then summed over ranks
    (an all-reduce every step when ``num_processes > 1``: every rank must return the same keys),
    and divided by ``grad_accum * num_processes``. None when the task reports no counts.
    """
    counts: dict[str, float] = {}
    for batch in batch_counts:
        for k, v in batch.items():
            counts[k] = counts.get(k, 0.0) + float(v)
    if not counts:
        return None
    names = sorted(counts)
    world = accelerator.num_processes
    if world > 1:
        vals = torch.tensor([counts[k] for k in names], dtype=torch.float64, device=accelerator.device)
        counts = dict(zip(names, accelerator.reduce(vals, "sum").tolist(), strict=True))
    scale = max(1, accelerator.gradient_accumulation_steps) * world
    return {k: counts[k] / scale for k in names}


@dataclass
class _ResumePoint:
    """State at the end of the last completed step (what a checkpoint must record)."""

    step: int
    position: int
    generator: Tensor


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from unibrain_cli.io.console import progress_bar

    return progress_bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[terms]}"), TextColumn("{task.fields[speed]}"),
                        TimeRemainingColumn())


def run_stage(
    task: StageTask,
    *,
    resume: bool = False,
    progress: bool = False,
    hooks: Sequence[StepHook] = (),
    metrics: MetricsLog | None = None,
    recipe_hash: str = "",
) -> StageResult:
    """Train ``task`` for ``stage.steps`` optimizer steps, checkpointing into RUN/<stage>/ and
    exporting the EMA weights to RUN/<stage>/final/ (see the module docstring)."""
    ctx = task.ctx
    stage, train = ctx.stage, ctx.recipe.train
    metrics = metrics or MetricsLog(None)
    set_seed(train.seed * 1000 + ctx.index)  # identical initialisation on every rank and every (re)start
    model = task.build_model()
    set_trainable(model, task.trainable_modules(model))
    parallel.apply_model_transforms(model, activation_checkpointing=ctx.recipe.model.activation_checkpointing)
    accelerator = parallel.make_accelerator(model, train.mixed_precision, stage.grad_accum,
                                            find_unused_parameters=task.find_unused_parameters)
    rank, main = accelerator.process_index, accelerator.is_main_process
    latest = latest_checkpoint(ctx.stage_dir) if resume else None
    ckpt: Checkpoint | None = load_checkpoint(latest) if latest is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt.model, strict=True)
    optimizer = build_optimizer(model, stage, train.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    scheduler = LambdaLR(getattr(optimizer, "optimizer", optimizer), lambda s: lr_factor(s, stage))
    ema = EMA(inner, stage.ema_decay)
    generator = stage_generator(train.seed, ctx.index, rank)
    step = position = 0
    if ckpt is not None:
        parallel.load_optimizer_state_dict(accelerator, model, optimizer, ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        _load_ema(accelerator, model, ema, ckpt.ema, ckpt.ema_updates)
        if rank in ckpt.generators:
            generator.set_state(ckpt.generators[rank])
        else:  # resumed with more processes: a fresh, still deterministic stream for the new rank
            generator = stage_generator(train.seed * 7919 + ckpt.step, ctx.index, rank)
        restore_global_rng({k: v for k, v in ckpt.global_rng.items() if isinstance(v, Tensor)},
                           {k: v for k, v in ckpt.global_rng.items() if not isinstance(v, Tensor)})
        step, position = ckpt.step, ckpt.position
        metrics.truncate_stage(stage.name, step)
    point = _ResumePoint(step, position, generator.get_state())
    saved_step = step if ckpt is not None else -1
    trainable = [p for p in model.parameters() if p.requires_grad]

    def save(at: _ResumePoint) -> None:
        nonlocal saved_step
        gens = _gather_generators(accelerator, at.generator)
        weights = _full_state(accelerator, model)
        ema_tensors = _ema_state(accelerator, model, ema)
        opt_state = parallel.optimizer_state_dict(accelerator, model, optimizer)
        if main:
            save_checkpoint(checkpoint_dir(ctx.stage_dir, at.step), Checkpoint(
                step=at.step, position=at.position, model=weights, ema=ema_tensors, ema_updates=ema.num_updates,
                optimizer=opt_state, scheduler=scheduler.state_dict(), generators=gens,
                world_size=accelerator.num_processes, recipe_hash=recipe_hash))
        saved_step = at.step

    bar = _progress_bar(progress and main)
    bar_task = None
    if bar is not None:
        bar.start()
        bar_task = bar.add_task(f"{stage.name}", total=stage.steps, completed=step, terms="", speed="")
    window_tokens, window_start, t0 = 0, time.perf_counter(), time.perf_counter()
    window_flow, window_steps = 0, 0  # flow-loss (generation + self-alignment) target tokens
    try:
        while step < stage.steps:
            loss_sum, terms_sum = 0.0, {}
            batches = []  # drawn up front (CPU): next_batch is a pure function of (position, generator)
            for _ in range(stage.grad_accum):
                batches.append(task.next_batch(position, generator))
                position += 1
            counts = [task.loss_counts(b) for b in batches]
            window_flow += sum(int(c.get("flow", 0)) + int(c.get("sa", 0)) for c in counts)
            window_steps += 1
            norm = global_loss_norm(counts, accelerator)
            while batches:
                batch = send_to_device(batches.pop(0), accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = task.loss(model, batch) if norm is None else task.loss(model, batch, norm=norm)
                    accelerator.backward(out.loss)
                loss_sum += float(out.loss.detach()) / stage.grad_accum
                for k, v in out.terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / stage.grad_accum
                window_tokens += int(out.n_tokens)
            with defer_sigint():
                grad_norm = (float(accelerator.clip_grad_norm_(trainable, stage.grad_clip))
                             if stage.grad_clip > 0 else float("nan"))
                lr = float(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ema.update(inner)
                step += 1
                point = _ResumePoint(step, position, generator.get_state())
            if step % max(1, train.log_every) == 0 or step == stage.steps:
                names = sorted(terms_sum)
                vals = torch.tensor([loss_sum, *(terms_sum[k] for k in names), float(window_flow), float(window_tokens)],
                                    dtype=torch.float64, device=accelerator.device)
                vals = accelerator.reduce(vals, "sum") if accelerator.num_processes > 1 else vals
                world = accelerator.num_processes
                now = time.perf_counter()
                speed = float(vals[-1]) / max(now - window_start, 1e-9)
                record = {"kind": "train", "stage": stage.name, "step": step, "loss": float(vals[0]) / world,
                          "terms": {k: float(vals[1 + i]) / world for i, k in enumerate(names)},
                          "lr": lr, "grad_norm": grad_norm, f"{task.unit}_per_s": speed,
                          "elapsed_s": now - t0}
                if float(vals[-2]) > 0:
                    record["flow_tokens_per_step"] = float(vals[-2]) / max(window_steps, 1)
                    record["flow_tokens_per_s"] = float(vals[-2]) / max(now - window_start, 1e-9)
                if main:
                    metrics.write(record)
                if bar is not None:
                    shown = " ".join(f"{k} {v:.4g}" for k, v in {"loss": record["loss"], **record["terms"]}.items())
                    flow = (f", {record['flow_tokens_per_s']:.0f} flow tok/s" if "flow_tokens_per_s" in record else "")
                    bar.update(bar_task, completed=step, terms=shown, speed=f"{speed:.1f} {task.unit}/s{flow}")
                window_tokens, window_start, window_flow, window_steps = 0, now, 0, 0
            elif bar is not None:
                bar.update(bar_task, completed=step)
            if train.checkpoint_every > 0 and step % train.checkpoint_every == 0 and step < stage.steps:
                save(point)
            info = StepInfo(stage.name, step, stage.steps, loss_sum, dict(terms_sum), lr, inner, rank)
            for hook in hooks:
                hook(info)
    except KeyboardInterrupt:
        if point.step > saved_step:
            save(point)
        raise
    finally:
        if bar is not None:
            bar.stop()
    if saved_step < step:
        save(point)
    final_dir = ctx.stage_dir / "final"
    result_metrics = _finish(task, accelerator, model, ema, final_dir)
    if main and result_metrics:
        metrics.write({"kind": "eval", "stage": stage.name, "step": step, "metrics": result_metrics})
    accelerator.wait_for_everyone()
    return StageResult(stage.name, step, final_dir, result_metrics, ckpt.step if ckpt is not None else None)


def _finish(task: StageTask, accelerator: Accelerator, model: nn.Module, ema: EMA, final_dir: Path) -> dict[str, float]:
    """Evaluate and export the EMA weights on the main process (plain module, no wrapper)."""
    if parallel.is_fsdp(accelerator):
        with ema.applied_to(accelerator.unwrap_model(model)):
            state = _full_state(accelerator, model)
        plain = task.build_model()
        plain.load_state_dict(state, strict=True)
        context: contextlib.AbstractContextManager[nn.Module] = contextlib.nullcontext(plain)
    else:
        context = ema.applied_to(accelerator.unwrap_model(model))
    if not accelerator.is_main_process:
        return {}
    with context as plain_model:
        modes = [(m, m.training) for m in plain_model.modules()]
        plain_model.eval()
        try:
            result = task.evaluate(plain_model)
            with atomic_dir(final_dir, overwrite=True) as tmp:
                task.export(plain_model, tmp)
        finally:
            for m, mode in modes:
                m.training = mode
    return result
