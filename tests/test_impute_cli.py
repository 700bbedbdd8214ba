"""`unibrain impute / diagnose / report` through Typer's runner: success paths and one-line errors
(exit code 2, nothing written) for every kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from unibrain_cli.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scans")
    idx = np.indices((30, 34, 28)).astype(np.float32)
    r = ((idx[0] - 14.5) / 12) ** 2 + ((idx[1] - 16.5) / 14) ** 2 + ((idx[2] - 13.5) / 11) ** 2
    brain = np.where(r < 1, 50 + 30 * np.sin(idx[0] / 2) + idx[2], 0).astype(np.float32)
    lps = np.diag([-1.0, -1.0, 1.2, 1.0])
    far = np.eye(4)
    far[:3, 3] = [500, 500, 500]
    files = {}

    def save(name, data, affine=lps):
        files[name] = d / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(files[name]))

    save("t1", brain)
    save("t2", brain[::-1] * 0.5 + 3 * (brain > 0))
    save("far", brain, far)
    save("vol4d", np.stack([brain, brain], axis=-1))
    save("vol2d", brain[:, :, 0])
    nan = brain.copy()
    nan[10, 10, 10] = np.nan
    save("nan", nan)
    files["corrupt"] = d / "corrupt.nii.gz"
    files["corrupt"].write_bytes(gzip.compress(b"not a nifti at all" * 10)[:40])
    files["missing"] = d / "missing.nii.gz"
    return files


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_impute_success(ckpt, scans, tmp_path):
    out = tmp_path / "out"
    res = invoke("-q", "impute", "--have", f"t1={scans['t1']},t2={scans['t2']}", "--want", "flair",
                 "--ckpt", ckpt, "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["flair_imputed.nii.gz", "impute.json", "montage.png"]
    img = nib.load(str(out / "flair_imputed.nii.gz"))
    src = nib.load(str(scans["t1"]))
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    meta = json.loads((out / "impute.json").read_text())
    assert meta["sequence_inputs"] == ["t1", "t2"] and meta["targets"] == ["flair"]
    assert meta["checkpoint"] == str(ckpt)



def test_steps_flag_sets_the_sampler_and_changes_the_image(ckpt, scans, tmp_path):
    def run(name: str, *extra: str) -> tuple[np.ndarray, dict]:
        out = tmp_path / name
        res = invoke("-q", "impute", "--have", f"t1={scans['t1']}", "--want", "t2", "--ckpt", ckpt,
                     "--out", out, *extra)
        assert res.exit_code == 0, res.output
        return nib.load(str(out / "t2_imputed.nii.gz")).get_fdata(), json.loads((out / "impute.json").read_text())

    default, meta_default = run("default")
    again, _ = run("again")
    one, meta_one = run("one", "--steps", "1")
    assert meta_one["sampler"]["sample_steps"] == 1 and meta_default["sampler"]["sample_steps"] != 1
    assert np.array_equal(default, again)  # same seed, same steps: the same image
    assert not np.allclose(default, one)


def test_case_folder_input(ckpt, scans, tmp_path):
    case = tmp_path / "sub01"
    case.mkdir()
    (case / "sub01_T1w.nii.gz").write_bytes(scans["t1"].read_bytes())
    res = invoke("-q", "impute", "--case", case, "--want", "t2", "--ckpt", ckpt, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "t2_imputed.nii.gz").is_file()


def test_diagnose_json_and_report(ckpt, scans):
    res = invoke("diagnose", "--have", f"t1={scans['t1']}", "--ckpt", ckpt, "--no-impute", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert sum(data["probabilities"].values()) == pytest.approx(1.0)
    assert data["prediction"] in data["probabilities"]
    res = invoke("diagnose", "--have", f"t1={scans['t1']}", "--ckpt", ckpt, "--no-impute")
    assert res.exit_code == 0 and "glioma" in res.output
    res = invoke("report", "--have", f"t1={scans['t1']}", "--ckpt", ckpt, "--format", "markdown")
    assert res.exit_code == 0, res.output
    assert "## Impression" in res.stdout and "**T1**" in res.stdout


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        (lambda s, c: ["--have", f"t9={s['t1']}", "--want", "t2"], ["unknown modality 't9'", "--have"]),
        (lambda s, c: ["--have", f"t1={s['t1']}", "--want", "t2,bogus"], ["unknown modality 'bogus'", "--want"]),
        (lambda s, c: ["--have", f"t1={s['t1']}", "--want", "t1n"], ["both given and wanted", "--want"]),
        (lambda s, c: ["--have", f"t1={s['missing']}", "--want", "t2"], ["missing.nii.gz", "not found"]),
        (lambda s, c: ["--have", f"t1={s['corrupt']}", "--want", "t2"], ["corrupt.nii.gz", "not a readable NIfTI"]),
        (lambda s, c: ["--have", f"t1={s['vol4d']}", "--want", "t2"], ["vol4d.nii.gz", "3D"]),
        (lambda s, c: ["--have", f"t1={s['vol2d']}", "--want", "t2"], ["vol2d.nii.gz", "3D"]),
        (lambda s, c: ["--have", f"t1={s['nan']}", "--want", "t2"], ["nan.nii.gz", "NaN"]),
        (lambda s, c: ["--have", f"t1={s['t1']},t2={s['far']}", "--want", "flair"],
         ["far.nii.gz", "t1.nii.gz", "overlap"]),
        (lambda s, c: ["--have", f"t1={s['t1']}", "--case", c.parent], ["only one of", "--case"]),
        (lambda s, c: ["--prepared", c.parent], ["--prepared", "--case-id"]),
        (lambda s, c: ["--have", f"t1={s['t1']}", "--slices", "some"], ["--slices"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ckpt, scans, tmp_path, case, needles):
    out = tmp_path / "out"
    res = invoke("impute", *case(scans, ckpt), "--ckpt", ckpt, "--out", out)
    assert_one_line_error(res, *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_not_a_checkpoint(scans, tmp_path):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("hello")
    for cmd in (["impute", "--want", "t2", "--out", tmp_path / "out"], ["diagnose"], ["report"]):
        res = invoke(*cmd, "--have", f"t1={scans['t1']}", "--ckpt", bogus)
        assert_one_line_error(res, "not a UniBrain checkpoint", "bogus")
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_force(ckpt, scans, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("x")
    res = invoke("impute", "--have", f"t1={scans['t1']}", "--want", "t2", "--ckpt", ckpt, "--out", out)
    assert_one_line_error(res, "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["x.txt"]


def test_report_bad_format_and_diagnose_bad_combo(ckpt, scans, tmp_path):
    res = invoke("report", "--have", f"t1={scans['t1']}", "--ckpt", ckpt, "--format", "pdf")
    assert_one_line_error(res, "--format", "pdf")
    res = invoke("diagnose", "--have", f"t1={scans['t1']}", "--case-id", "c1", "--ckpt", ckpt)
    assert_one_line_error(res, "--case-id", "--prepared")
