"""`unibrain report`: generated per-modality findings and impression."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.cmd_infer import (
    BASE,
    CASE,
    CASE_ID,
    CKPT,
    DEVICE,
    DTYPE,
    HAVE,
    OFFLOAD,
    PREPARED,
    PROTOCOL,
    QUANTIZE,
    SEED,
    memory_flags,
)
from unibrain_cli.cli.common import command
from unibrain_cli.errors import UserError


def report(
    have: str | None = HAVE,
    case: Path | None = CASE,
    prepared: Path | None = PREPARED,
    case_id: str | None = CASE_ID,
    ckpt: Path | None = CKPT,
    fmt: str = typer.Option("text", "--format", help="text, markdown or json."),
    seed: int = SEED,
    device: str = DEVICE,
    protocol: str = PROTOCOL,
    base: Path | None = BASE,
    dtype: str = DTYPE,
    quantize: str = QUANTIZE,
    offload: str = OFFLOAD,
) -> None:
    """Write findings and an impression for a case.

    With --protocol released (the authors' checkpoint): their model's written impression and the class it names.

    Example: unibrain report --case sub01/ --ckpt run/ --format markdown
    """
    from unibrain_cli.inference.inputs import resolve_inputs
    from unibrain_cli.inference.report import FORMATS, format_report
    from unibrain_cli.inference.report import report as run_report

    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}", "--format")
    from unibrain_cli.released.folder import choose_protocol

    memory = memory_flags(dtype, quantize, offload, device)
    spec = resolve_inputs(have, case, prepared, case_id)
    if choose_protocol(protocol, ckpt, base) == "released":
        from unibrain_cli.released.report import format_released_report, report_released

        released = report_released(spec, ckpt, base, seed=seed, device=device, memory=memory)
        typer.echo(format_released_report(released, fmt))
        return
    result = run_report(spec, ckpt, seed=seed, device=device, memory=memory)
    typer.echo(format_report(result, fmt))


def register(app: typer.Typer) -> None:
    app.command("report")(command(report))
