"""`unibrain prepare`: join RadGenome reports to their source volumes and preprocess them."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.common import STATE, command, console, emit_json


def prepare(
    radgenome_dir: Path = typer.Argument(..., metavar="RADGENOME_DIR", help="Release JSON tree or flat layout."),
    images: list[Path] = typer.Option([], "--images", help="Extra image roots (BraTS, ISLES'22, WMH, flat); repeatable."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="PREPARED output folder."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel worker processes across cases."),
    force: bool = typer.Option(False, "--force", help="Redo cases that are already prepared."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Validate and preprocess every case: RAS+, 1 mm in-plane, one grid per case, [0, 1] intensities.

    Example: unibrain prepare radgenome/ --images BraTS2023/ --images ISLES-2022/ --out prepared/
    """
    from unibrain_cli.data.prepare import prepare as run_prepare
    from unibrain_cli.data.prepare import summary_table

    res = run_prepare(radgenome_dir, out_dir, images=images, workers=workers, force=force,
                      progress=not STATE.quiet)
    if as_json:
        emit_json({"out": str(res.out), "prepared": res.n_prepared, "problems": len(res.problems)})
    elif not STATE.quiet:
        console.print(summary_table(res))


def register(app: typer.Typer) -> None:
    app.command("prepare")(command(prepare))
