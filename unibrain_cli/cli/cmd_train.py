"""`unibrain train`: the UniBrain stages (vae, sa, draft, unified, und, dhs) from a TOML recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.common import STATE, command, out
from unibrain_cli.errors import UserError


def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe TOML file or shipped name (tiny, small, bagel-7b)."),
    data: Path = typer.Option(None, "--data", help="SLICES folder from `unibrain slice`."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Run folder (checkpoints, metrics, resolved recipe)."),
    stage: str | None = typer.Option(None, "--stage", help="Run only this stage (vae, sa, draft, unified, und, dhs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe value: --set train.seed=3 (repeatable)."),
) -> None:
    """Train the unified model stage by stage on Accelerate.

    Example: unibrain train --recipe small --data slices/ --out run/ --set train.seed=1
    """
    from unibrain_cli.config import load_recipe

    resolved = load_recipe(recipe, overrides)
    if data is None:
        raise UserError("pass the SLICES folder from `unibrain slice`", "--data")
    if out_dir is None:
        raise UserError("pass a run folder for checkpoints and outputs", "--out")
    from unibrain_cli.training.run import train as run_train

    summary = run_train(resolved, data, out_dir, stage=stage, resume=resume, progress=not STATE.quiet)
    trained = [name for name, info in summary.stages.items() if info.get("status") == "trained"]
    out(f"[green]trained[/] {', '.join(trained) or 'nothing new'} -> {out_dir}")


def register(app: typer.Typer) -> None:
    app.command("train")(command(train))
