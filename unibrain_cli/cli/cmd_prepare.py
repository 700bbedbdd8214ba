"""`unibrain prepare`: join RadGenome reports to their source volumes and preprocess them."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.common import STATE, command, emit_json, out, print_table


def prepare(
    radgenome_dir: Path = typer.Argument(..., metavar="RADGENOME_DIR", help="Release JSON tree or flat layout."),
    images: list[Path] = typer.Option([], "--images", help="Extra image roots (BraTS, ISLES'22, WMH, flat); repeatable."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="PREPARED output folder."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel worker processes across cases."),
    force: bool = typer.Option(False, "--force", help="Redo cases that are already prepared."),
    spacing: float = typer.Option(1.0, "--spacing", help="Isotropic voxel size of the case grids in mm (2 is "
                                  "enough for slices of 128 px or less: 8x fewer voxels)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Validate and preprocess every case: RAS+, 1 mm isotropic (--spacing), one grid per case, [0, 1] intensities.

    Prints first how each subset's report keys met their images; what still fails is in problems.csv.

    Example: unibrain prepare radgenome/ --images BraTS2023/ --images ISLES-2022/ --out prepared/
    """
    from rich.markup import escape

    from unibrain_cli.data.prepare import prepare as run_prepare
    from unibrain_cli.data.prepare import summary_table

    def echo(line: str) -> None:
        out(escape(line))

    res = run_prepare(radgenome_dir, out_dir, images=images, workers=workers, force=force, spacing=spacing,
                      progress=not STATE.quiet, echo=None if as_json else echo)
    if as_json:
        emit_json({"out": str(res.out), "prepared": res.n_prepared, "problems": len(res.problems),
                   "matching": res.matching})
    elif not STATE.quiet:
        print_table(summary_table(res), stderr=True)


def register(app: typer.Typer) -> None:
    app.command("prepare")(command(prepare))
