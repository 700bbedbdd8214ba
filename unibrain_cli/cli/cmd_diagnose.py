"""`unibrain diagnose`: closed-set diagnosis over the five classes, scored by the model."""

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
    STEPS,
    memory_flags,
)
from unibrain_cli.cli.common import command, emit_json, print_table


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
    protocol: str = PROTOCOL,
    base: Path | None = BASE,
    dtype: str = DTYPE,
    quantize: str = QUANTIZE,
    offload: str = OFFLOAD,
) -> None:
    """Print the most likely diagnosis and a probability for each class.

    With --protocol released (the authors' checkpoint): their generated answer and the class it names.

    Example: unibrain diagnose --have t1=scan.nii.gz --ckpt run/ --json
    """
    from unibrain_cli.inference.diagnose import diagnose as run_diagnose
    from unibrain_cli.inference.diagnose import diagnosis_table
    from unibrain_cli.inference.inputs import resolve_inputs
    from unibrain_cli.released.folder import choose_protocol

    memory = memory_flags(dtype, quantize, offload, device)
    spec = resolve_inputs(have, case, prepared, case_id)
    if choose_protocol(protocol, ckpt, base) == "released":
        from unibrain_cli.released.diagnose import diagnose_released, released_diagnosis_table

        released = diagnose_released(spec, ckpt, base, impute=impute, seed=seed, device=device, steps=steps,
                                     memory=memory)
        emit_json(released.to_dict()) if as_json else print_table(released_diagnosis_table(released))
        return
    result = run_diagnose(spec, ckpt, impute=impute, seed=seed, device=device, steps=steps, memory=memory)
    if as_json:
        emit_json(result.to_dict())
    else:
        print_table(diagnosis_table(result))


def register(app: typer.Typer) -> None:
    app.command("diagnose")(command(diagnose))
