"""`unibrain impute`: generate missing modalities as NIfTI volumes in the input's own space."""

from __future__ import annotations

from pathlib import Path

import typer

from unibrain_cli.cli.cmd_infer import CASE, CASE_ID, CKPT, DEVICE, HAVE, PREPARED, SEED
from unibrain_cli.cli.common import command
from unibrain_cli.errors import NotLandedError


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
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="Allow a non-empty --out."),
) -> None:
    """Impute missing modalities with the interleaved, KV-cached protocol.

    Example: unibrain impute --have t1=sub01_T1w.nii.gz --want t2,flair --ckpt run/ --out imputed/
    """
    raise NotLandedError("imputation has not landed yet in this version (issue: unibrain impute)", "impute")


def register(app: typer.Typer) -> None:
    app.command("impute")(command(impute))
