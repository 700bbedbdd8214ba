"""Tables and progress bars in a log (issue 15, item 4): off a terminal nothing is squeezed to 80
columns -- each row on one line, every cell whole -- and on a terminal rich prints as it always did."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

import unibrain_cli.evaluation.runner as R
from unibrain_cli.cli.app import app
from unibrain_cli.evaluation import tables
from unibrain_cli.io.console import print_table, progress_bar, table_console

runner = CliRunner()

LONG = "copy-nearest (histogram-matched to the training mean, most similar input of the chain)"
ROWS = [
    ["UniBrain", "T1w, T2w, T2f → T1c", "30", "19.40 [18.73, 20.03]", "0.6517 [0.6289, 0.6738]",
     "16.94 [16.34, 17.49]", "0.5238 [0.5102, 0.5382]", "33.33 [16.67, 50.00]"],
    [LONG, "T1w → T2w", "30", "14.68 [14.28, 15.09]", "0.0194 [-0.0375, 0.0812]",
     "12.76 [12.56, 12.94]", "-0.2586 [-0.2742, -0.2414]", tables.UNAVAILABLE],
]
COLUMNS = ["Method", "Chain", "n", "PSNR (dB)", "SSIM", "PSNR brain (dB)", "SSIM brain", "Top-1 (%)"]


def wide_table() -> tables.Table:
    """A Table 2 look-alike far wider than 80 columns, with one very long cell."""
    display = pd.DataFrame(ROWS, columns=COLUMNS)
    return tables.Table("table2", "Table 2. Missing-modality imputation fidelity and diagnostic usability",
                        display.copy(), display, notes=["Values: mean [95% CI]; n = cases."])


def assert_rows_whole(text: str) -> None:
    """Every row of ROWS on one line of ``text``, each cell's full text in it, in order."""
    for row in ROWS:
        hits = [line for line in text.splitlines() if row[0] in line]
        assert len(hits) == 1, text
        pos = 0
        for cell in row:
            found = hits[0].find(cell, pos)
            assert found >= 0, (cell, hits[0])
            pos = found + len(cell)
    for name in COLUMNS:
        assert name in text, text


@pytest.fixture
def fake_evaluate(monkeypatch, tmp_path):
    """`unibrain evaluate` with the evaluation replaced by one wide table (no checkpoint needed)."""
    summary = {"cases": 30, "seconds": {"per_case_mean": 1.5}, "convention": {"name": "ours"}}
    result = R.EvalResult(tmp_path, {"table2": wide_table()}, {}, summary, [])
    monkeypatch.setattr(R, "evaluate", lambda *a, **k: result)
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    return ["evaluate", "--ckpt", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "E")]


def test_evaluate_tables_are_whole_in_a_log(fake_evaluate):
    res = runner.invoke(app, fake_evaluate)
    assert res.exit_code == 0, res.output
    assert_rows_whole(res.stdout)
    assert max(map(len, res.stdout.splitlines())) > 80  # wider than rich's default, not squeezed to it
    assert "evaluated" in res.stderr and "s per case" in res.stderr


def test_a_forced_terminal_is_unchanged(fake_evaluate, monkeypatch):
    """With a terminal forced (TTY_COMPATIBLE) at a forced width, output is rich's own, fitted to it."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    res = runner.invoke(app, fake_evaluate)
    assert res.exit_code == 0, res.output
    expected = Console(file=io.StringIO())
    assert expected.is_terminal and expected.width == 80
    expected.print(R.to_rich(wide_table()))
    assert res.stdout.startswith(expected.file.getvalue())  # the table exactly as rich prints it there
    assert max(Text.from_ansi(line).cell_len for line in res.stdout.splitlines()) <= 80  # fitted, as before


def test_a_table_on_a_pipe_is_whole(tmp_path: Path):
    """A real pipe (not a terminal): the table at its natural width, each row on one line."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_console import wide_table
        from unibrain_cli.evaluation.runner import to_rich
        from unibrain_cli.io.console import print_table
        print_table(to_rich(wide_table()))
        print_table(to_rich(wide_table()), stderr=True)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    assert_rows_whole(proc.stdout)
    assert_rows_whole(proc.stderr)


def test_a_table_that_fits_prints_as_before(monkeypatch):
    """Off a terminal, a table narrower than rich's width is printed exactly as rich prints it."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    narrow = R.to_rich(tables.Table("t", "T", pd.DataFrame(), pd.DataFrame({"a": ["1"], "b": ["2"]})))
    buf_new, buf_old = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf_new)
    assert table_console(narrow).width == Console().width  # rich's own width, not the table's
    print_table(narrow)
    Console(file=buf_old).print(narrow)
    assert buf_new.getvalue() == buf_old.getvalue()


def test_progress_bars_off_a_terminal(capsys, monkeypatch):
    """Off a terminal: a transient bar prints nothing at all; a persistent one its last state, one line."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("sampling", total=3)
        for _ in range(3):
            bar.advance(task)
    assert capsys.readouterr().out == ""
    terms = "loss 1.234 und 0.5678 gen 0.1234 sa 0.04567 " * 3
    with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[terms]}")) as bar:
        task = bar.add_task("unified", total=3, terms=terms.strip())
        for _ in range(3):
            bar.advance(task)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "unified" in lines[0] and "3/3" in lines[0] and terms.strip() in lines[0], lines
