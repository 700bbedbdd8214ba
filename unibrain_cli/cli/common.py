"""The one place where user errors become one line on stderr and exit code 2.

Every command is wrapped by :func:`command`; ``--debug`` (global) re-raises with the traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer
from rich.console import Console

from unibrain_cli.errors import UserError
from unibrain_cli.io.console import print_table  # noqa: F401  (the commands' one way to print a table)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class State:
    debug: bool = False
    quiet: bool = False


STATE = State()
console = Console(stderr=True)


def out(message: str) -> None:
    """Print a rich message on stderr unless --quiet.

    Off a terminal (a log file, CI) the message is not broken at 80 columns: one line stays one line.
    """
    if not STATE.quiet:
        console.print(message, soft_wrap=not console.is_terminal)


def emit_json(payload: Any) -> None:
    """Print a JSON result on stdout (machine-readable output of --json)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; return the Exit(2) to raise."""
    Console(stderr=True, soft_wrap=True, highlight=False).print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code=2)


def command(func: F) -> F:
    """Wrap a command: UserError -> one line + exit 2; Ctrl-C -> one line + exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            if STATE.debug:
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            if STATE.debug:
                raise
            Console(stderr=True).print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def parse_csv(value: str | None) -> list[str]:
    """Split a comma-separated flag value, dropping empties."""
    if not value:
        return []
    return [v.strip() for v in value.split(",") if v.strip()]
