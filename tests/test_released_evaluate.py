"""``unibrain evaluate --protocol released``: Tables 1-2 with the released checkpoint's own protocol.

A tiny BAGEL-layout released folder (tests/test_released.py) and a tiny slices folder
(tests/test_evaluate.py: 32x32 slices, test cases te0 / te1 with T1-T1ce, te2 with T2 + FLAIR).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_evaluate import write_slices
from test_released import write_released
from typer.testing import CliRunner

from unibrain_cli.cli.app import app
from unibrain_cli.errors import UserError
from unibrain_cli.evaluation import runner as R
from unibrain_cli.released.engine import ReleasedEngine, run_generation
from unibrain_cli.released.evaluate import DIFFERENCES, GENERATED_FILE, evaluate_released, slice_to_uint8
from unibrain_cli.released.folder import load_released, resolve_released
from unibrain_cli.released.images import output_slice
from unibrain_cli.released.protocol import classify_answer

runner = CliRunner()
FAST = ["--thinking-tokens", "3", "--answer-tokens", "4", "--steps", "2"]
S = 32


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released(tmp_path_factory.mktemp("released") / "UniBrain")


@pytest.fixture(scope="module")
def bundle(released):
    return load_released(resolve_released(released))


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    return write_slices(tmp_path_factory.mktemp("slices") / "SLICES")


def invoke(*args):
    return runner.invoke(app, ["evaluate", *map(str, args)])


@pytest.fixture(scope="module")
def cli_run(released, slices, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval") / "EVAL"
    res = invoke("--ckpt", released, "--protocol", "released", "--data", slices, "--chain", "--ensemble", 2,
                 "--scenario", "t1,complete", "--baselines", "copy", *FAST, "--out", out)
    assert res.exit_code == 0, res.output
    return out, res.output


def reference_u8(x: np.ndarray) -> np.ndarray:
    """The protocol's uint8 slice, written out here: percentiles 0.5 / 99.5 of the pixels > 0 -> [1, 255]."""
    pos = x > 0
    lo, hi = np.percentile(x[pos], (0.5, 99.5))
    out = np.zeros(x.shape, np.uint8)
    out[pos] = np.clip(np.round((x[pos] - lo) / (hi - lo) * 255), 1, 255).astype(np.uint8)
    return out


def test_cli_writes_released_eval_json_and_prints_the_differences(cli_run) -> None:
    out, output = cli_run
    meta = json.loads((out / "eval.json").read_text())
    assert meta["protocol"] == "released" and meta["convention"]["name"] == "paper"
    assert meta["convention"]["protocol"] == "released" and meta["convention"]["differences"] == list(DIFFERENCES)
    assert meta["tasks"] == {"table1_und": "diagnosis", "table1_unified": "unified", "table2": "generation"}
    assert meta["sampler"]["generation"]["shift"] == 3.0 and meta["sampler"]["generation"]["euler_steps"] == 2
    assert meta["think_max_length"] == 3 and meta["answer_max_length"] == 4 and meta["ensemble"] == 2
    assert meta["cohorts"]["table2"] == {"t1->t2": 2, "t1,t2->flair": 2, "t1,t2,flair->t1ce": 2}
    assert {"table1_cases.csv", "table2_cases.csv", GENERATED_FILE, "eval.json", "tables.md"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "recipe.resolved.toml").exists()
    assert "Protocol: released" in output and output.count("differs from the authors' protocol") == len(DIFFERENCES)
    md = (out / "tables.md").read_text()
    assert "closed-set" not in md.split("\n\n")[1]  # no closed-set column in Table 1's header/rows
    assert "No 'Top-1 closed-set' column" in md and "No usability column" in md


def test_table2_is_scored_on_uint8_by_scikit_image(cli_run, slices) -> None:
    """A Table-2 value recomputed here: the generated uint8 slice (generated.npz) against the target
    slice mapped to 1-255 by the protocol's percentile rule, scikit-image on uint8 / 255."""
    out, _ = cli_run
    frame = pd.read_csv(out / "table2_cases.csv")
    assert set(frame["method"]) == {"UniBrain", "UniBrain* (2 seeds)", "copy-nearest"}
    assert frame["psnr_brain"].isna().all() and frame["usability"].isna().all()
    cases = {c.case_id: c for c in R.load_cases(slices, "test", convention="paper")[0]}
    gen = np.load(out / GENERATED_FILE)
    for method, key in (("UniBrain", "t1->t2|te0|draw0"), ("UniBrain* (2 seeds)", "t1->t2|te0|ensemble")):
        pred = gen[key]
        assert pred.dtype == np.uint8 and pred.shape == (S, S)
        ref = reference_u8(cases["te0"].image("t2"))
        assert ref.min() == 0 and ref.max() == 255 and (ref[ref > 0] >= 1).all()
        row = frame.loc[(frame["method"] == method) & (frame["chain"] == "t1->t2") & (frame["case_id"] == "te0")]
        a, b = pred / 255.0, ref / 255.0
        assert row["psnr"].item() == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-9)
        assert row["ssim"].item() == pytest.approx(structural_similarity(b, a, data_range=1.0), abs=1e-9)


def test_generated_slice_is_the_released_generation_task(cli_run, slices, bundle) -> None:
    """draw0 of T1 -> T2 is exactly: the T1 slice mapped to uint8, flipped into LPI, padded to 256, their
    generation task with seed 0 (2 Euler steps), decoded, cropped to 32x32 and flipped back."""
    out, _ = cli_run
    case = {c.case_id: c for c in R.load_cases(slices, "test", convention="paper")[0]}["te0"]
    t1 = reference_u8(case.image("t1"))
    padded = np.zeros((256, 256), np.uint8)
    padded[112:144, 112:144] = np.fliplr(t1)
    rgb = np.repeat(padded[..., None], 3, axis=-1)
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    res = run_generation(engine, [rgb], "t2", [torch.Generator().manual_seed(0)], steps=2)
    expect = np.fliplr(output_slice(res.image, (S, S)))
    np.testing.assert_array_equal(np.load(out / GENERATED_FILE)["t1->t2|te0|draw0"], expect)


def test_table1_rows_come_from_the_released_answers(cli_run) -> None:
    out, _ = cli_run
    frame = pd.read_csv(out / "table1_cases.csv", keep_default_na=False)
    und = frame[frame["method"] == "UniBrain Und."]
    assert sorted(zip(und["scenario"], und["case_id"])) == [("complete", "te0"), ("complete", "te1"),
                                                            ("complete", "te2"), ("t1", "te0"), ("t1", "te1")]
    for _, r in frame.iterrows():
        pred, matched = classify_answer(str(r["answer"]))
        assert r["pred_text"] == (pred or "")
        assert float(r["top1"]) == float(r["diseases"] in matched)
        assert r["top1_closed"] == "" and r["pred_closed"] == ""  # never computed
    uni = frame[frame["method"] == "UniBrain"]
    assert list(uni["scenario"]) == ["t1", "t1"]  # complete: nothing to impute, not run
    assert dict(zip(uni["case_id"], uni["scored_target"])) == {"te0": "t1ce", "te1": "adc"}  # the last target
    assert all(0 < float(v) < 100 for v in uni["psnr"]) and all(-1 <= float(v) <= 1 for v in uni["ssim"])


def test_deterministic_by_seed_and_convention_ours(bundle, released, slices, tmp_path) -> None:
    kw = dict(scenarios="t1", chain=True, baselines="none", think_max_length=2, answer_max_length=2, steps=1,
              bundle=bundle)
    a = evaluate_released(released, None, slices, tmp_path / "a", **kw)
    b = evaluate_released(released, None, slices, tmp_path / "b", **kw)
    c = evaluate_released(released, None, slices, tmp_path / "c", seed=5, **kw)
    ours = evaluate_released(released, None, slices, tmp_path / "o", convention="ours", **kw)
    fa, fb, fc, fo = (pd.read_csv(tmp_path / n / "table2_cases.csv") for n in "abco")
    pd.testing.assert_frame_equal(fa, fb)
    assert not np.allclose(fa["psnr"], fc["psnr"])
    assert a.summary["convention"]["name"] == "paper" and ours.summary["convention"]["name"] == "ours"
    # the same generated slices (here the paper slice is the eval slice): same full-slice scores, plus brain ones
    np.testing.assert_allclose(fo["psnr"], fa["psnr"])
    np.testing.assert_allclose(fo["ssim"], fa["ssim"])
    assert fo["psnr_brain"].notna().all() and "SSIM brain" in ours.tables["table2"].display.columns
    assert "PSNR last target (dB)" not in ours.tables["table1"].display.columns
    assert c.summary["seed"] == 5 and b.summary["protocol"] == "released"


def test_step_folder_with_base_and_auto_protocol(released, slices, tmp_path) -> None:
    step = tmp_path / "0000200"
    step.mkdir()
    shutil.copy(released / "ema.safetensors", step / "ema.safetensors")
    out = tmp_path / "E"
    res = invoke("--ckpt", step, "--base", released, "--data", slices, "--scenario", "t1", "--max-cases", 1,
                 *FAST, "--out", out)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "eval.json").read_text())
    assert meta["protocol"] == "released" and meta["base"] == str(released) and meta["chains"] == []
    assert meta["files_used"]["weights"] == str(step / "ema.safetensors")
    assert meta["files_used"]["autoencoder"] == str(released / "ae.safetensors")


def test_protocol_choice_for_evaluate(released, tmp_path) -> None:
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text("{}")
    (native / "model.safetensors").write_bytes(b"")
    assert R.choose_evaluation_protocol("auto", released, None, False) == "released"
    assert R.choose_evaluation_protocol("auto", native, None, False) == "native"
    assert R.choose_evaluation_protocol("auto", tmp_path, None, True) == "native"  # an ablation folder
    assert R.choose_evaluation_protocol("native", released, None, True) == "native"
    with pytest.raises(UserError, match="--ablation"):
        R.choose_evaluation_protocol("released", tmp_path, None, True)
    assert slice_to_uint8(np.zeros((4, 4), np.float32))[1] == "empty"
    u8, why = slice_to_uint8(np.full((4, 4), 0.5, np.float32))
    assert why == "constant" and (u8 == 128).all()


def test_bad_combinations_are_one_line_errors_and_write_nothing(released, slices, tmp_path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(released / "ema.safetensors", partial / "ema.safetensors")
    base = ["--data", slices, *FAST]
    cases = [
        (["--ckpt", released, "--protocol", "released", "--ablation"], ("--protocol", "--ablation")),
        (["--ckpt", tmp_path, "--ablation", "--base", released], ("--base", "--ablation")),
        (["--ckpt", released, "--protocol", "released", "--chain", "--baselines", "copy,two-stage"],
         ("--baselines", "two-stage", "closed-set")),
        (["--ckpt", released, "--cfg-img-scale", "2"], ("--cfg-img-scale", "fixed")),
        (["--ckpt", released, "--thinking-plan", "forced"], ("--thinking-plan", "authors'")),
        (["--ckpt", released, "--batch-size", "4"], ("--batch-size", "one slice at a time")),
        (["--ckpt", released, "--protocol", "released", "--convention", "theirs"], ("--convention", "theirs")),
        (["--ckpt", released, "--protocol", "native", "--base", released], ("--base", "only applies")),
        (["--ckpt", partial, "--protocol", "released"], ("partial", "missing", "--base")),
        (["--ckpt", released, "--thinking-tokens", "0"], ("--thinking-tokens", ">= 1")),
    ]
    for i, (args, needles) in enumerate(cases):
        out = tmp_path / f"E{i}"
        res = invoke(*base, *args, "--out", out)  # args last: they override FAST
        assert res.exit_code == 2, (args, res.output)
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        for n in needles:
            assert n in lines[0], (n, lines[0])
        assert not out.exists() and not list(tmp_path.glob(f".E{i}*")), args
