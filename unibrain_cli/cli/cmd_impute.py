"""`unibrain impute`: generate missing modalities as NIfTI volumes in the input's own space."""

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
from unibrain_cli.cli.common import STATE, command, out


def impute(
    have: str | None = HAVE,
    case: Path | None = CASE,
    prepared: Path | None = PREPARED,
    case_id: str | None = CASE_ID,
    want: str | None = typer.Option(None, "--want", help="Modalities to generate, in order: t2,flair."),
    ckpt: Path | None = CKPT,
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Output folder (must be empty unless --force)."),
    slices: str = typer.Option("all", "--slices",
                               help="all (every brain slice: the whole volume), lesion (its middle slice; needs a "
                                    "lesion mask) or a number K of slices."),
    batch_size: int = typer.Option(16, "--batch-size", min=1,
                                   help="Slices (x ensemble seeds) imputed together; 1 = one by one."),
    ensemble: int = typer.Option(1, "--ensemble", min=1, help="Average N seeds and write a std-dev map."),
    seed: int = SEED,
    steps: int | None = STEPS,
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="Allow a non-empty --out."),
    protocol: str = PROTOCOL,
    base: Path | None = BASE,
    task: str | None = typer.Option(None, "--task", help="Released protocol only: generation (default; each target "
                                    "from the given images) or unified (the authors' chain with thinking)."),
    dtype: str = DTYPE,
    quantize: str = QUANTIZE,
    offload: str = OFFLOAD,
) -> None:
    """Impute missing modalities with the interleaved, KV-cached protocol.

    Example: unibrain impute --have t1=sub01_T1w.nii.gz --want t2,flair --ckpt run/ --out imputed/
    """
    from unibrain_cli.errors import UserError
    from unibrain_cli.inference.impute import impute as run_impute
    from unibrain_cli.inference.inputs import parse_modality_list, resolve_inputs
    from unibrain_cli.released.folder import choose_protocol

    memory = memory_flags(dtype, quantize, offload, device)
    spec = resolve_inputs(have, case, prepared, case_id)
    targets = parse_modality_list(want, "--want") or None
    if choose_protocol(protocol, ckpt, base) == "released":
        from unibrain_cli.released.impute import impute_released

        result = impute_released(spec, targets, ckpt, base, out_dir, slices=slices, ensemble=ensemble, seed=seed,
                                 device=device, force=force, task=task, steps=steps, progress=not STATE.quiet,
                                 memory=memory)
    elif task is not None:
        raise UserError("--task only applies to --protocol released", "--task")
    else:
        result = run_impute(spec, targets, ckpt, out_dir, slices=slices, ensemble=ensemble, seed=seed, steps=steps,
                            device=device, force=force, progress=not STATE.quiet, batch_size=batch_size,
                            memory=memory)
    made = ", ".join(f for k, f in result.files.items() if f.endswith(".nii.gz"))
    filled = "" if result.coverage >= 1.0 else f"; {result.coverage:.0%} of the brain's output voxels filled"
    out(f"[green]imputed[/] {made} ({len(result.slices)} slice(s){filled}) -> {result.out}")


def register(app: typer.Typer) -> None:
    app.command("impute")(command(impute))
