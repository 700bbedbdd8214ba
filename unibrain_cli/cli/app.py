"""The `unibrain` Typer app: every subcommand registered here, each a short wrapper."""

from __future__ import annotations

import typer

from unibrain_cli import __version__
from unibrain_cli.cli import (
    cmd_diagnose,
    cmd_evaluate,
    cmd_impute,
    cmd_prepare,
    cmd_report,
    cmd_slice,
    cmd_synth,
    cmd_train,
)
from unibrain_cli.cli.common import STATE

app = typer.Typer(
    name="unibrain",
    help=(
        "UniBrain: impute missing brain MRI modalities and write reports with one unified "
        "BAGEL-style model.\n\n"
        "Typical use: unibrain synth demo/ --cases 20; unibrain prepare demo/radgenome "
        "--images demo/images --out prepared/; unibrain slice prepared/ --out slices/; "
        "unibrain train --recipe small --data slices/ --out run/; "
        "unibrain impute --have t1=scan.nii.gz --want t2,flair --ckpt run/ --out imputed/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unibrain {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print results and errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE.debug = debug
    STATE.quiet = quiet


for module in (cmd_synth, cmd_prepare, cmd_slice, cmd_train, cmd_impute, cmd_diagnose, cmd_report, cmd_evaluate):
    module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
