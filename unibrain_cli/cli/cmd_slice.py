"""`unibrain slice`: lesion-centred 2D training slices with 2D size phrases."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.common import STATE, command, emit_json, out
from unibrain_cli.errors import UserError


def slice_cmd(
    prepared: Path = typer.Argument(..., metavar="PREPARED", help="Output of `unibrain prepare`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="SLICES output folder."),
    size: int = typer.Option(128, "--size", min=8, help="Square slice size in pixels."),
    axis: str = typer.Option("axial", "--axis", help="Slicing axis (axial)."),
    per_case: int | None = typer.Option(None, "--per-case", min=1, help="Lesion slices per case (default 3)."),
    all_lesion_slices: bool = typer.Option(False, "--all-lesion-slices", help="Keep every lesion slice."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing SLICES folder."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel worker processes across cases."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Cut each prepared case into 2D slices (largest lesion first; middle lesion slice flagged for evaluation).

    Example: unibrain slice prepared/ --out slices/ --size 64 --per-case 3
    """
    if per_case is not None and all_lesion_slices:
        raise UserError("use either --per-case or --all-lesion-slices, not both", "--per-case")
    from unibrain_cli.data.slicing import make_slices

    res = make_slices(prepared, out_dir, size=size, axis=axis, per_case=per_case or 3,
                      all_lesion_slices=all_lesion_slices, force=force, progress=not STATE.quiet,
                      workers=workers)
    if as_json:
        emit_json({"out": str(out_dir), "slices": getattr(res, "num_slices", None)})
    else:
        out(f"[green]wrote[/] slices to {out_dir}")


def register(app: typer.Typer) -> None:
    app.command("slice")(command(slice_cmd))
