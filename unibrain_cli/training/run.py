"""``train(recipe, data_dir, out_dir, ...)``: the library entry behind ``unibrain train``.

Run folder layout::

    RUN/recipe.resolved.toml     the resolved recipe (all defaults filled in)
    RUN/run.json                 status, stages done, per-stage results, hash of model+data config
    RUN/metrics.jsonl            one JSON per log step: {"kind": "train", "stage", "step", "loss",
                                 "terms": {...}, "lr", "grad_norm", "<unit>_per_s", "elapsed_s"}
                                 and one {"kind": "eval", "stage", "step", "metrics": {...}} per stage
    RUN/<stage>/checkpoint-<step>/   atomic training checkpoints (see training.checkpoint)
    RUN/<stage>/final/               the stage's export (vae: ae.safetensors + config.json)
    RUN/loss_curve.png           loss terms per stage, written at the end

Every input problem is a UserError raised before any training starts (on every rank).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unibrain_cli.config.components import Recipe
from unibrain_cli.config.loader import recipe_to_dict, save_resolved, validate_recipe
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_path, write_text
from unibrain_cli.training.stages import StageContext, StageTask, get_stage
from unibrain_cli.training.trainer import MetricsLog, StepHook, run_stage

RUN_FORMAT = "unibrain-run/1"
#: Recipe parts that define the trained model; a resume with other values is refused.
HASHED_PARTS: tuple[str, ...] = ("model", "data")


@dataclass
class TrainSummary:
    """What :func:`train` did: per stage {"status": "trained" | "skipped", "steps", "final", "metrics"}."""

    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def recipe_fingerprint(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """(sha256 of the model+data parts of the resolved recipe, those parts as plain dicts)."""
    full = recipe_to_dict(recipe)
    parts = {k: full[k] for k in HASHED_PARTS}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()
    return digest, parts


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def recipe_differences(old: dict[str, Any], new: dict[str, Any], ignore_added_defaults: bool = False) -> list[str]:
    """Dotted keys whose values differ, as "key: old -> new". With ``ignore_added_defaults``, a key
    that ``old`` lacks and ``new`` holds at the field's default (a field a later version of the
    toolkit added: the run was trained with what that default does) is no difference."""
    a, b = _flatten(old), _flatten(new)
    defaults = _flatten({k: v for k, v in recipe_to_dict(Recipe()).items() if k in HASHED_PARTS})
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not (ignore_added_defaults and k not in a and k in defaults and b.get(k) == defaults[k])]


def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"run.json is corrupt ({exc}); choose a new --out", str(path)) from exc
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise UserError("not a UniBrain run folder (unknown run.json format); choose a new --out", str(path))
    return info


def check_run_dir(run_dir: Path, recipe: Recipe, resume: bool, stage: str | None) -> dict[str, Any] | None:
    """Refuse a non-empty folder that is not this recipe's run, or any non-empty folder without
    ``--resume`` unless ``--stage`` names a stage that has no outputs there yet."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if not run_dir.is_dir():
        raise UserError("exists and is not a folder; choose another --out", str(run_dir))
    info = read_run_json(run_dir)
    if info is None:
        raise UserError("output folder is not empty and holds no UniBrain run (run.json); choose a new --out",
                        str(run_dir))
    digest, parts = recipe_fingerprint(recipe)
    diffs = recipe_differences(info.get("recipe", {}), parts, ignore_added_defaults=True)
    if info.get("recipe_hash") != digest and diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
        raise UserError(f"this run was trained with a different model/data recipe ({shown}); use the same recipe "
                        "to continue, or a new --out", str(run_dir))
    if not resume:
        if stage is None:
            raise UserError("output folder is not empty (an earlier run); use --resume to continue it, or choose "
                            "a new --out", str(run_dir))
        if (run_dir / stage).exists():
            raise UserError(f"stage '{stage}' already has outputs in this run; use --resume to continue it, or "
                            "choose a new --out", str(run_dir / stage))
    return info


def _train_records(metrics_path: Path) -> list[dict[str, Any]]:
    """The ``kind == "train"`` records of a metrics.jsonl in file order (unreadable lines skipped)."""
    out: list[dict[str, Any]] = []
    if not metrics_path.is_file():
        return out
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train":
            out.append(rec)
    return out


def stage_train_seconds(run_dir: str | Path, stage: str) -> float | None:
    """Wall time a run spent training ``stage`` (seconds), from ``RUN/metrics.jsonl``; None when the run
    logged no step of it.

    ``elapsed_s`` counts from the stage's start in its process, so a resumed stage restarts it: each
    process's last value is summed (a drop of ``elapsed_s`` starts a new process). Time between the
    last logged step and the stage's end (one ``log_every`` window at most) is not counted.
    """
    total, last = 0.0, None
    for rec in _train_records(Path(run_dir) / "metrics.jsonl"):
        if rec.get("stage") != stage or not isinstance(rec.get("elapsed_s"), int | float):
            continue
        t = float(rec["elapsed_s"])
        if last is not None and t < last:
            total += last
        last = t
    return None if last is None else total + last


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """One panel per stage, one line per loss term against the step (log y). None when no data."""
    if not metrics_path.is_file():
        return None
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for rec in _train_records(metrics_path):
        stage = series.setdefault(rec["stage"], {})
        for name, value in {"loss": rec["loss"], **rec.get("terms", {})}.items():
            xs, ys = stage.setdefault(name, ([], []))
            xs.append(int(rec["step"]))
            ys.append(float(value))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.5), squeeze=False)
    for ax, (stage, terms) in zip(axes[0], series.items()):
        for name, (xs, ys) in terms.items():
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
        if all(y > 0 for _, ys in terms.values() for y in ys):
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_png


def _write_run_json(run_dir: Path, info: dict[str, Any]) -> None:
    write_text(run_dir / "run.json", json.dumps(info, indent=1))


def train(
    recipe: Recipe,
    data_dir: str | Path,
    out_dir: str | Path,
    stage: str | None = None,
    resume: bool = False,
    progress: bool = False,
    hooks: Sequence[StepHook] = (),
) -> TrainSummary:
    """Run the recipe's stages in order (or only ``stage``) on the slices folder ``data_dir``.

    ``resume`` continues from the latest checkpoint of the first unfinished stage and skips
    finished ones. Raises UserError for bad input before training; a KeyboardInterrupt is
    re-raised after a checkpoint was saved and run.json marked "interrupted".
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    validate_recipe(recipe)  # stage order etc. (recipes built in code skip load_recipe)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() decides
    data_dir, run_dir = Path(data_dir), Path(out_dir)
    names = [s.name for s in recipe.train.stages]
    if not names:
        raise UserError("the recipe lists no stages", "train.stages")
    if stage is not None and stage not in names:
        raise UserError(f"stage '{stage}' is not in this recipe's train.stages ({', '.join(names)})", "--stage")
    to_run = [i for i, n in enumerate(names) if stage is None or n == stage]
    classes = {i: get_stage(names[i]) for i in to_run}
    info = check_run_dir(run_dir, recipe, resume, stage)
    if stage is not None:
        idx = names.index(stage)
        missing = [n for n in names[:idx] if not (run_dir / n / "final").is_dir()]
        if missing:
            raise UserError(f"--stage {stage} needs the finished outputs of {', '.join(missing)} in this run "
                            f"(RUN/<stage>/final); run them first", "--stage")
    tasks: list[StageTask] = []
    for i in to_run:
        inputs = {n: run_dir / n / "final" for n in names[:i]}
        ctx = StageContext(recipe, recipe.train.stages[i], i, data_dir, run_dir, inputs,
                           state.process_index, state.num_processes)
        task = classes[i](ctx)
        task.check()
        tasks.append(task)
    state.wait_for_everyone()  # every rank has checked the folder before it is written

    digest, parts = recipe_fingerprint(recipe)
    info = info or {"format": RUN_FORMAT, "recipe_hash": digest, "recipe": parts, "stages_done": [], "stages": {}}
    info["status"] = "running"
    main = state.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(recipe, run_dir)
        _write_run_json(run_dir, info)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    summary = TrainSummary(run_dir)
    for task in tasks:
        name = task.ctx.name
        if resume and name in info["stages_done"] and (task.ctx.stage_dir / "final").is_dir():
            summary.stages[name] = {"status": "skipped", **info["stages"].get(name, {})}
            continue
        try:
            result = run_stage(task, resume=resume, progress=progress, hooks=hooks, metrics=metrics,
                               recipe_hash=digest)
        except KeyboardInterrupt:
            if main:
                info["status"] = "interrupted"
                _write_run_json(run_dir, info)
            raise
        entry = {"steps": result.steps, "final": str(result.final_dir.relative_to(run_dir)),
                 "metrics": result.metrics, "resumed_from": result.resumed_from}
        info["stages"][name] = entry
        if name not in info["stages_done"]:
            info["stages_done"].append(name)
        summary.stages[name] = {"status": "trained", **entry}
        if main:
            _write_run_json(run_dir, info)
    info["status"] = "done" if all(n in info["stages_done"] for n in names) else "partial"
    if main:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        _write_run_json(run_dir, info)
    state.wait_for_everyone()
    return summary
