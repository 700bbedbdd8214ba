"""`unibrain synth`: the physics-based phantom in the RadGenome-Brain MRI layout."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.common import STATE, command, emit_json, out


def synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output folder (must be empty or absent)."),
    cases: int = typer.Option(20, "--cases", "-n", help="Number of cases, spread over the five subsets."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives identical files."),
    resolution: int = typer.Option(1, "--resolution", help="Voxel size in mm: 1 (real size) or 2 (fast)."),
    all_modalities: bool = typer.Option(
        False, "--all-modalities", help="Give every case all six contrasts on one grid (flat UniBrain layout)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty OUT."),
    workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel worker processes across cases."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a phantom dataset: release JSON reports + BraTS / ISLES'22 / WMH image trees.

    Example: unibrain synth demo/ --cases 50 --seed 0
    """
    from unibrain_cli.data.phantom import synthesize

    res = synthesize(out_dir, cases=cases, seed=seed, resolution=resolution, all_modalities=all_modalities,
                     force=force, progress=not STATE.quiet, workers=workers)
    if as_json:
        emit_json({"out": str(res.out), "case_ids": res.case_ids, "n_files": res.n_files,
                   "preview": str(res.preview), "all_modalities": res.all_modalities})
    else:
        per = ", ".join(f"{k} {len(v)}" for k, v in res.case_ids.items())
        out(f"[green]wrote[/] {cases} phantom cases ({per}) to {res.out}; preview: {res.preview}")


def register(app: typer.Typer) -> None:
    app.command("synth")(command(synth))
