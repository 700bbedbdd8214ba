"""`unibrain diagnose`: closed-set diagnosis over the five classes, scored by the model."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.cmd_infer import CASE, CASE_ID, CKPT, DEVICE, HAVE, PREPARED, SEED
from unibrain_cli.cli.common import command
from unibrain_cli.errors import NotLandedError


def diagnose(
    have: str | None = HAVE,
    case: Path | None = CASE,
    prepared: Path | None = PREPARED,
    case_id: str | None = CASE_ID,
    ckpt: Path | None = CKPT,
    impute: bool = typer.Option(True, "--impute/--no-impute", help="Impute missing modalities first."),
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Print the most likely diagnosis and a probability for each class.

    Example: unibrain diagnose --have t1=scan.nii.gz --ckpt run/ --json
    """
    raise NotLandedError("diagnosis has not landed yet in this version (issue: unibrain diagnose)", "diagnose")


def register(app: typer.Typer) -> None:
    app.command("diagnose")(command(diagnose))
