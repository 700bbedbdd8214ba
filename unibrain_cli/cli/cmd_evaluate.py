"""`unibrain evaluate`: the paper's Tables 1-3 on a prepared split, with baselines and figures."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.common import command
from unibrain_cli.errors import NotLandedError


def evaluate(
    ckpt: Path | None = typer.Option(None, "--ckpt", help="Training run folder or save_pretrained folder."),
    data: Path | None = typer.Option(None, "--data", help="PREPARED or SLICES folder."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    scenario: str = typer.Option("all", "--scenario", help="t1, t1_t2, t1_t2_flair, complete or all."),
    chain: bool = typer.Option(False, "--chain", help="Also run the imputation chains (Table 2)."),
    ensemble: int = typer.Option(1, "--ensemble", min=1, help="Seed ensemble size for imputation."),
    ablation: bool = typer.Option(False, "--ablation", help="Run the Table 3 ablation variants."),
    ratescore_models: Path | None = typer.Option(None, "--ratescore-models", help="Local RaTEScore models."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Evaluation output folder."),
) -> None:
    """Evaluate diagnosis, report generation and imputation like the paper's tables.

    Example: unibrain evaluate --ckpt run/ --data slices/ --split test --scenario all --chain --out eval/
    """
    raise NotLandedError("evaluation has not landed yet in this version (issue: unibrain evaluate)", "evaluate")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(command(evaluate))
