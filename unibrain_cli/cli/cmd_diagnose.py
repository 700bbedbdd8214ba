"""`unibrain diagnose`: closed-set diagnosis over the five classes, scored by the model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from unibrain_cli.cli.cmd_infer import CASE, CASE_ID, CKPT, DEVICE, HAVE, PREPARED, SEED, STEPS
from unibrain_cli.cli.common import command, emit_json


def diagnose(
    have: str | None = HAVE,
    case: Path | None = CASE,
    prepared: Path | None = PREPARED,
    case_id: str | None = CASE_ID,
    ckpt: Path | None = CKPT,
    impute: bool = typer.Option(True, "--impute/--no-impute", help="Impute missing modalities first."),
    seed: int = SEED,
    steps: int | None = STEPS,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Print the most likely diagnosis and a probability for each class.

    Example: unibrain diagnose --have t1=scan.nii.gz --ckpt run/ --json
    """
    from unibrain_cli.inference.diagnose import diagnose as run_diagnose
    from unibrain_cli.inference.diagnose import diagnosis_table
    from unibrain_cli.inference.inputs import resolve_inputs

    spec = resolve_inputs(have, case, prepared, case_id)
    result = run_diagnose(spec, ckpt, impute=impute, seed=seed, device=device, steps=steps)
    if as_json:
        emit_json(result.to_dict())
    else:
        Console().print(diagnosis_table(result))


def register(app: typer.Typer) -> None:
    app.command("diagnose")(command(diagnose))
