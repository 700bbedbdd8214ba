"""`unibrain impute`: generate missing modalities as NIfTI volumes in the input's own space."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.cmd_infer import CASE, CASE_ID, CKPT, DEVICE, HAVE, PREPARED, SEED, STEPS
from unibrain_cli.cli.common import STATE, command, out


def impute(
    have: str | None = HAVE,
    case: Path | None = CASE,
    prepared: Path | None = PREPARED,
    case_id: str | None = CASE_ID,
    want: str | None = typer.Option(None, "--want", help="Modalities to generate, in order: t2,flair."),
    ckpt: Path | None = CKPT,
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Output folder (must be empty unless --force)."),
    slices: str = typer.Option("lesion", "--slices", help="lesion, all, or a number K of central slices."),
    ensemble: int = typer.Option(1, "--ensemble", min=1, help="Average N seeds and write a std-dev map."),
    seed: int = SEED,
    steps: int | None = STEPS,
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="Allow a non-empty --out."),
) -> None:
    """Impute missing modalities with the interleaved, KV-cached protocol.

    Example: unibrain impute --have t1=sub01_T1w.nii.gz --want t2,flair --ckpt run/ --out imputed/
    """
    from unibrain_cli.inference.impute import impute as run_impute
    from unibrain_cli.inference.inputs import parse_modality_list, resolve_inputs

    spec = resolve_inputs(have, case, prepared, case_id)
    targets = parse_modality_list(want, "--want") or None
    result = run_impute(spec, targets, ckpt, out_dir, slices=slices, ensemble=ensemble, seed=seed, steps=steps,
                        device=device, force=force, progress=not STATE.quiet)
    made = ", ".join(f for k, f in result.files.items() if f.endswith(".nii.gz"))
    out(f"[green]imputed[/] {made} ({len(result.slices)} slice(s)) -> {result.out}")


def register(app: typer.Typer) -> None:
    app.command("impute")(command(impute))
