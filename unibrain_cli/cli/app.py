"""The `unibrain` Typer app: every subcommand registered here, each a short wrapper."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

try:  # recent typer ships its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_exc

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
from unibrain_cli.cli.common import STATE, fail
from unibrain_cli.io.allocator import tune_malloc


class OneLineErrors(TyperGroup):
    """Click's usage errors (unknown option, bad value, missing argument) as one line + exit 2.

    Typer would print a usage block and a framed error; every other user error of the CLI is
    one ``error: ...`` line (:func:`unibrain_cli.cli.common.fail`), so usage errors are too.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exc.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # bare `unibrain`: the help
                typer.echo(exc.ctx.get_help())
                sys.exit(2)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            fail(exc.format_message().rstrip(".") + where)
            sys.exit(2)
        except click_exc.ClickException as exc:
            fail(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
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
    tune_malloc()  # before any array or worker exists: see unibrain_cli/io/allocator.py
    app()
