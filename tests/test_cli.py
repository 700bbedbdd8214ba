"""The CLI surface: every subcommand present with help, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from unibrain_cli.cli.app import app

SUBCOMMANDS = ["synth", "prepare", "slice", "train", "impute", "diagnose", "report", "evaluate"]
runner = CliRunner()


def test_help_lists_every_subcommand():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in res.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_has_an_example(name):
    res = runner.invoke(app, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example" in res.output


def test_unknown_recipe_key_is_one_line_naming_the_key():
    res = runner.invoke(app, ["train", "--recipe", "recipes/tiny.toml", "--set", "model.nope=1"])
    assert res.exit_code == 2
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "model.nope" in lines[0] and "tiny.toml" in lines[0]
    assert "Traceback" not in res.output


def test_wrong_type_in_override_names_the_path():
    res = runner.invoke(app, ["train", "--recipe", "tiny", "--set", "model.llm.hidden_size=big"])
    assert res.exit_code == 2
    assert "model.llm.hidden_size" in res.output and "integer" in res.output


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["train", "--recipe", str(tmp_path / "nope.toml")])
    assert res.exit_code == 2
    assert "nope.toml" in res.output and "not found" in res.output


def test_debug_flag_shows_the_exception():
    res = runner.invoke(app, ["--debug", "train", "--recipe", "tiny", "--set", "model.nope=1"])
    assert res.exit_code != 2
    assert res.exception is not None and "model.nope" in str(res.exception)


def test_impossible_flag_combination_is_refused(tmp_path):
    res = runner.invoke(app, ["slice", str(tmp_path), "--out", str(tmp_path / "s"), "--per-case", "2",
                              "--all-lesion-slices"])
    assert res.exit_code == 2
    assert "--per-case" in res.output and "--all-lesion-slices" in res.output


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "unibrain_cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "evaluate" in proc.stdout


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "unibrain_cli", "train", "--recipe", "tiny", "--set",
                           "model.nope=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "model.nope" in proc.stderr


@pytest.mark.parametrize("args, needles", [
    (["impute", "--bogus"], ["No such option: --bogus", "impute --help"]),
    (["evaluate", "--steps", "0"], ["'--steps'", "greater than or equal to 1", "evaluate --help"]),
    (["impute", "--ensemble", "two"], ["'--ensemble'", "integer"]),
    (["synth"], ["Missing argument 'OUT'", "synth --help"]),
    (["train", "--recipe"], ["'--recipe' requires an argument"]),
    (["imputee"], ["No such command 'imputee'"]),
])
def test_usage_errors_are_one_line_naming_the_flag(args, needles):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bare_command_prints_the_help():
    res = runner.invoke(app, [])
    assert res.exit_code == 2 and "Usage" in res.output and "evaluate" in res.output
