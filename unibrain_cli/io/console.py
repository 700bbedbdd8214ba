"""Rich output that stays readable in a log: tables and progress bars off a terminal.

On a terminal, rich fits a table to the terminal's width (wrapping cells) and redraws progress
bars in place; nothing here changes that. Off a terminal (CI, ``make demo | tee log``, output
redirected to a file) rich assumes 80 columns, so a wide table would come out with its cells
broken over several lines ("copy-nea" / "rest"). There, :func:`print_table` prints a table at its
natural width -- each row on one line, no cell wrapped or cut -- and a :func:`progress_bar` prints
nothing while it runs (rich has no live display there), then, unless transient, its final state
once on one unsqueezed line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import get_console
from rich.console import Console, RenderableType

if TYPE_CHECKING:
    from rich.progress import Progress, ProgressColumn

#: Off a terminal: the widest a table is measured at, and the width of a progress bar's console.
#: Far above any table or bar of this toolkit; a renderable that is not expanded still renders at its
#: natural width, so this never pads a line.
LOG_WIDTH = 10_000


def table_console(renderable: RenderableType, *, stderr: bool = False) -> Console:
    """A console on stdout (stderr with ``stderr``) that prints ``renderable`` without wrapping.

    On a terminal (or wherever rich is told it is one, e.g. ``FORCE_COLOR``/``TTY_COMPATIBLE``)
    this is rich's plain console, fitted to the terminal's (or ``COLUMNS``') width as always.
    Elsewhere it is as wide as ``renderable``'s natural width, and never narrower than rich's own
    choice (so a table that fits prints exactly as before).
    """
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    natural = console.measure(renderable, options=console.options.update_width(LOG_WIDTH)).maximum
    if natural <= console.width:
        return console
    return Console(stderr=stderr, width=natural)


def print_table(renderable: RenderableType, *, stderr: bool = False) -> None:
    """Print a rich table (or any renderable) on stdout (stderr with ``stderr``), see :func:`table_console`."""
    table_console(renderable, stderr=stderr).print(renderable)


def progress_bar(*columns: str | ProgressColumn, transient: bool = False) -> Progress:
    """A rich ``Progress`` on stdout (``columns``: rich's default columns when none) for a log too.

    On a terminal: ``Progress(*columns, transient=transient)``, exactly as rich draws it. Elsewhere
    rich draws no live display anyway; there a transient bar is disabled (it would print nothing but
    an empty line when it stops) and a persistent one prints its final state once, on one line at
    its natural width (on a console :data:`LOG_WIDTH` wide, not squeezed to 80 columns).
    """
    from rich.progress import Progress

    console = get_console()
    if console.is_terminal:
        return Progress(*columns, transient=transient)
    return Progress(*columns, transient=transient, console=Console(width=LOG_WIDTH), disable=transient)
