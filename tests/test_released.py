"""The released UniBrain checkpoint's protocol (``--protocol released``), without the real weights.

A BAGEL-shaped TINY model is written inside the test in the released layout (``ema.safetensors``
by BAGEL key names with the position tables, ``llm_config.json``, ``vit_config.json``, a Qwen2-format
tokenizer with the special tokens, ``ae.safetensors`` in FLUX key layout). Golden token and
position sequences are written BY HAND from the protocol facts (``released-checkpoint-protocol.md``)
and compared with what the model actually received. Images keep the protocol's geometry: 256-px
slices -> 16 x 16 = 256 latent tokens (FLUX downsample 8, patch 2) and 252 / 14 = 18 -> 324 ViT tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from typer.testing import CliRunner

from unibrain_cli.cli.app import app
from unibrain_cli.config.components import LLMConfig, ModelConfig, VAEConfig, ViTConfig
from unibrain_cli.errors import UserError
from unibrain_cli.inference.inputs import InputSpec
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.checkpoint import FLUX_VAE, build_model, save_bagel_folder, save_pretrained
from unibrain_cli.model.embeddings import patch_tokens, patchify_latent
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.released import protocol
from unibrain_cli.released.diagnose import diagnose_released
from unibrain_cli.released.engine import ReleasedEngine, run_diagnosis, run_generation, run_unified
from unibrain_cli.released.folder import (
    choose_protocol,
    flux_vae_config,
    load_qwen2_tokenizer,
    load_released,
    released_model_config,
    resolve_released,
)
from unibrain_cli.released.images import (
    crop_to_target,
    lpi_slice,
    output_slice,
    pad_to_target,
    raw_volumes,
    rescale_to_uint8,
    resize_hw,
    slice_rgb,
)
from unibrain_cli.released.impute import impute_released

runner = CliRunner()

# Qwen2.5's special tokens, in the order of their ids (151643 ...): vision_start / vision_end are 9 and 10 after.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CORPUS = [
    "Translate the attached MRI into its T2-FLAIR image.", "Translate the attached MRI images into t2f image.",
    "You should first think about the planning process in the mind and then generate the image.",
    "<think> I need to translate the given T1 image into the corresponding T2 image. </think>",
    "Assess the given data and present a comprehensive impression of the observed anatomical structures.",
    "Based on the provided information, what is the most likely clinical diagnosis? Glioblastoma Meningioma",
    "Impression: a ring-enhancing mass in the left frontal lobe with surrounding oedema. Metastatic tumor.",
] * 4

TINY = ModelConfig(
    llm=LLMConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                  vocab_size=512),
    vit=ViTConfig(patch_size=14, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                  max_patches_per_side=70),
    vae=VAEConfig(in_channels=3, ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=16, scale_factor=0.3611,
                  shift_factor=0.1159, resolution=256),
    latent_patch_size=2, max_latent_size=64, vit_max_num_patch_per_side=70, tokenizer="qwen2",
)
N_LATENT = (256 // 16) ** 2  # 256 latent tokens of a 256-px image
N_VIT = (252 // 14) ** 2  # 324 ViT patches of its 252-px ViT view


# ---------------------------------------------------------------------------------------------
# the tiny released folder
# ---------------------------------------------------------------------------------------------


def qwen2_style_tokenizer(specials: list[str]) -> Tokenizer:
    """A tiny byte-level BPE with Qwen2's pipeline; ``specials`` added after the vocabulary (as Qwen's)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(specials)
    return tok


def write_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """tokenizer.json + vocab.json + merges.txt + added_tokens.json (a Qwen2 folder's files)."""
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    (folder / "added_tokens.json").write_text(json.dumps(added))


def random_model(seed: int) -> UniBrainModel:
    torch.manual_seed(seed)
    model = UniBrainModel(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_released(folder: Path, seed: int = 0, specials: list[str] = QWEN_SPECIALS) -> Path:
    model = random_model(seed)
    torch.manual_seed(seed + 100)
    save_bagel_folder(model, folder, vae=AutoEncoder(TINY.vae).eval())
    write_tokenizer(qwen2_style_tokenizer(specials), folder)
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released(tmp_path_factory.mktemp("released") / "UniBrain")


@pytest.fixture(scope="module")
def bundle(released):
    return load_released(resolve_released(released))


@pytest.fixture(scope="module")
def hf(released) -> Tokenizer:
    """The tokenizer itself (the `tokenizers` library), for golden sequences."""
    return Tokenizer.from_file(str(released / "tokenizer.json"))


def rgb_inputs(n: int, hw: tuple[int, int] = (200, 180), seed: int = 0) -> list[np.ndarray]:
    """n padded RGB uint8 slices [256, 256, 3] (three equal channels) of random content."""
    rng = np.random.default_rng(seed)
    return [slice_rgb(rng.integers(0, 256, size=(hw[1], hw[0], 1), dtype=np.uint8), 0)[0] for _ in range(n)]


class Golden:
    """A sequence written by hand from the protocol facts: ids (VAE row -1, ViT row -2) and RoPE positions."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.bos, self.eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
        self.vs, self.ve = tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.p = 0

    def text(self, s: str) -> Golden:
        ids = [self.bos, *self.tok.encode(s, add_special_tokens=False).ids, self.eos]
        self.ids += ids
        self.pos += list(range(self.p, self.p + len(ids)))
        self.p += len(ids)
        return self

    def image(self) -> Golden:
        self.ids += [self.vs, *[-1] * N_LATENT, self.ve, self.vs, *[-2] * N_VIT, self.ve]
        self.pos += [self.p] * (N_LATENT + 2) + [self.p + 1] * (N_VIT + 2)
        self.p += 2
        return self

    def copy(self) -> Golden:
        g = Golden(self.tok)
        g.ids, g.pos, g.p = list(self.ids), list(self.pos), self.p
        return g


def layout(blocks) -> tuple[list[int], list[int]]:
    return [i for b in blocks for i in b.ids], [p for b in blocks for p in b.positions]


# ---------------------------------------------------------------------------------------------
# facts, folders, tokenizer
# ---------------------------------------------------------------------------------------------


def test_protocol_strings_and_numbers() -> None:
    assert protocol.SYSTEM_PROMPT == (
        "You should first think about the planning process in the mind and then generate the image. \nThe planning "
        "process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here")
    assert [protocol.generation_instruction(m) for m in ("t2", "flair", "t1ce", "t1")] == [
        "Translate the attached MRI into its t2w image.", "Translate the attached MRI into its T2-FLAIR image.",
        "Translate the attached MRI into its t1c image.", "Translate the attached MRI into its t1n image."]
    assert protocol.chain_instruction("flair") == "Translate the attached MRI images into t2f image."
    g, u = protocol.GENERATION_SAMPLER, protocol.UNIFIED_SAMPLER
    assert (g.num_timesteps, g.euler_steps, g.shift, g.text_scale, g.img_scale, g.interval, g.renorm_type,
            g.renorm_min) == (10, 9, 3.0, 3.0, 1.2, (0.4, 1.0), "text_channel", 0.0)
    assert (u.num_timesteps, u.shift, u.text_scale, u.img_scale) == (10, 1.0, 3.0, 1.2)
    assert (protocol.THINK_MAX_LENGTH, protocol.DIAGNOSIS_MAX_LENGTH) == (800, 512)
    assert protocol.classify_answer("Final: metastatic tumor, not a glioblastoma") == ("metastasis",
                                                                                      ["metastasis", "glioma"])
    assert protocol.classify_answer("Acute INFARCT.") == ("stroke", ["stroke"])
    assert protocol.classify_answer("normal study") == (None, [])


def test_folder_loads_weights_tables_autoencoder_and_tokenizer(released, bundle, hf, tmp_path) -> None:
    saved = load_file(released / "ema.safetensors")
    state = bundle.model.state_dict()
    for key in ("language_model.model.layers.1.self_attn.q_proj_moe_gen.weight", "vae2llm.weight",
                "vit_model.vision_model.embeddings.patch_embedding.weight", "connector.fc2.bias"):
        torch.testing.assert_close(state[key], saved[key])
    assert bundle.vae.config == TINY.vae  # widths read from ae.safetensors, FLUX scale / shift
    assert bundle.model.config.vit.num_layers == 1 and bundle.model.config.vit_max_num_patch_per_side == 70
    tok = bundle.tokenizer
    assert tok.special_ids == tuple(hf.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                                "<|vision_end|>"))
    assert tok.image_start_id - tok.bos_id == 151652 - 151644  # Qwen2.5's id layout
    # the stored position tables are loaded, not recomputed
    folder = Path(shutil.copytree(released, tmp_path / "tables"))
    weights = load_file(folder / "ema.safetensors")
    weights["latent_pos_embed.pos_embed"] = weights["latent_pos_embed.pos_embed"] + 0.25
    save_file(weights, str(folder / "ema.safetensors"))
    model = load_released(resolve_released(folder)).model
    torch.testing.assert_close(model.latent_pos_embed.pos_embed, weights["latent_pos_embed.pos_embed"])
    torch.testing.assert_close(model.vit_pos_embed.pos_embed, weights["vit_pos_embed.pos_embed"])
    # vocab.json + merges.txt (+ added_tokens.json) encode exactly as tokenizer.json
    (folder / "tokenizer.json").unlink()
    slow = load_qwen2_tokenizer(folder)
    assert slow.special_ids == tok.special_ids
    for text in (protocol.SYSTEM_PROMPT, protocol.FINAL_DIAGNOSIS_QUESTION, "T2-FLAIR <|im_end|> x"):
        assert slow.encode(text) == tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def _tsv(name: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in (Path(__file__).parent / "fixtures" / name).read_text().splitlines()[1:])
    return {r[0]: tuple(json.loads(r[1])) for r in rows if len(r) == 3 and not r[0].startswith("#")}


def test_released_construction_fits_the_public_checkpoint_shapes() -> None:
    """BAGEL-7B-MoT's json configs -> every tensor of ema.safetensors (the two tables included) and ae.safetensors."""
    llm = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 152064,
           "tie_word_embeddings": True, "qk_norm": False}  # both forced back, as their script does
    vit = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
           "patch_size": 14, "image_size": 980, "num_channels": 3}
    vae = flux_vae_config(_tsv("flux-ae-keys.tsv"))
    assert vae == FLUX_VAE
    cfg = released_model_config(llm, vit, vae)
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings and cfg.vit.num_layers == 26
    model = build_model(cfg, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours |= {k: tuple(v.shape) for k, v in model.named_buffers() if k.endswith("pos_embed")}  # loaded from the file
    assert ours == _tsv("bagel-7b-mot-keys.tsv")
    with torch.device("meta"):
        ae = AutoEncoder(vae)
    assert {k: tuple(v.shape) for k, v in ae.state_dict().items()} == _tsv("flux-ae-keys.tsv")


def test_protocol_choice(released, tmp_path) -> None:
    ours = save_pretrained(random_model(1), tmp_path / "ours")
    assert choose_protocol("auto", ours, None) == "native"
    assert choose_protocol("auto", released, None) == "released"
    assert choose_protocol("auto", None, None) == "native"
    assert choose_protocol("auto", ours, released) == "released"  # --base means an authors' step folder
    assert choose_protocol("released", ours, None) == "released"
    with pytest.raises(UserError, match="--base"):
        choose_protocol("native", released, released)
    with pytest.raises(UserError, match="--protocol"):
        choose_protocol("bagel", released, None)


def test_step_folder_with_base_takes_weights_from_the_step(released, tmp_path) -> None:
    step = tmp_path / "checkpoints_s3" / "0000200"
    step.mkdir(parents=True)
    other = random_model(7)
    # no ema.safetensors: model.safetensors is used
    shutil.copy(write_released(tmp_path / "other", seed=7) / "ema.safetensors", step / "model.safetensors")
    with pytest.raises(UserError, match="--base"):
        resolve_released(step)
    files = resolve_released(step, released)
    assert files.weights == step / "model.safetensors" and files.llm_config.parent == released
    assert files.tokenizer_dir == released and files.autoencoder == released / "ae.safetensors"
    model = load_released(files).model
    torch.testing.assert_close(model.vae2llm.weight, other.vae2llm.weight)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def test_uint8_mapping_padding_and_sizes() -> None:
    vol = np.concatenate([np.full(10, -5.0), np.zeros(10), np.arange(1, 1001, dtype=np.float64)]).reshape(10, 102, 1)
    u8 = rescale_to_uint8(vol)
    flat = u8.ravel()
    assert u8.dtype == np.uint8 and (flat[:20] == 0).all()  # voxels <= 0 stay 0
    assert flat[20] == 1 and flat[-1] == 255 and (np.diff(flat[20:].astype(int)) >= 0).all()
    # v = 500: (500 - 5.995) / (995.005 - 5.995) * 255 = 127.37 -> 127 (percentiles 0.5 / 99.5 of 1..1000)
    assert flat[20 + 499] == 127
    with pytest.raises(UserError, match="no voxel above 0"):
        rescale_to_uint8(np.zeros((3, 3, 3)))
    img = np.arange(240 * 200, dtype=np.int64).reshape(240, 200) % 251 + 1
    padded = pad_to_target(img)
    assert padded.shape == (256, 256) and (padded[8:248, 28:228] == img).all() and padded.sum() == img.sum()
    assert (crop_to_target(padded, (240, 200)) == img).all()
    tall = np.ones((256, 200))
    assert pad_to_target(tall) is tall  # their rule: no padding once the height reaches 256
    assert resize_hw(256, 256, protocol.VAE_RESIZE) == (256, 256) and resize_hw(256, 256, protocol.VIT_RESIZE) == (252, 252)
    assert resize_hw(300, 300, protocol.VAE_RESIZE) == (304, 304)
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 31  # mean 20.33 -> 20 (truncated)
    assert (output_slice(rgb, (240, 200)) == 20).all() and output_slice(rgb, (240, 200)).shape == (240, 200)


def test_lpi_slice_orientation(tmp_path) -> None:
    """Slices are LPI: row 0 anterior, column 0 the subject's right, whatever the file's voxel order."""
    data = np.zeros((20, 24, 6), np.float32)
    data[0, 0, 3] = 7.0  # LPS voxel order: i = 0 is the rightmost column, j = 0 the most anterior row
    data[5:15, 5:20, :] = np.linspace(1.0, 2.0, 10 * 15 * 6, dtype=np.float32).reshape(10, 15, 6)
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    from unibrain_cli.inference.inputs import load_case

    spec = InputSpec({"t1": path})
    case = load_case(spec)
    raw = raw_volumes(spec, case)["t1"]
    plane = lpi_slice(raw, 3)
    assert plane.shape == (24, 20) and plane[0, 0] == 7.0 and plane.max() == 7.0


# ---------------------------------------------------------------------------------------------
# golden sequences
# ---------------------------------------------------------------------------------------------


def test_generation_task_golden_sequence_and_guidance(bundle, hf) -> None:
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    inputs = rgb_inputs(2)
    res = run_generation(engine, inputs, "flair", [torch.Generator().manual_seed(0)])
    cond, text_free, image_free = res.contexts
    instruction = "Translate the attached MRI into its T2-FLAIR image."
    g_cond = Golden(hf).image().image().text(instruction)
    g_text = Golden(hf).image().image()
    g_img = Golden(hf).text(instruction)
    assert cond.layout() == (g_cond.ids, g_cond.pos)
    assert text_free.layout() == (g_text.ids, g_text.pos)
    assert image_free.layout() == (g_img.ids, g_img.pos)
    assert cond.length == len(g_cond.ids) and cond.next_position == g_cond.p  # the cache holds exactly that
    rec = engine.records[-1]
    assert rec.query_positions == (g_cond.p, g_text.p, g_img.p) and rec.size == (256, 256)
    # shift 3: t = 1, .96, .91, .86, .79, .71, .60, .46, .27 -> guidance on 8 of the 9 updates
    assert rec.calls == {"cond": 9, "text_free": 8, "image_free": 8}
    vae_block, vit_block = cond.blocks[0].latent_position_ids, cond.blocks[0].vit_position_ids
    assert list(vae_block) == [r * 64 + c for r in range(16) for c in range(16)]
    assert list(vit_block) == [r * 70 + c for r in range(18) for c in range(18)]
    assert set(cond.blocks[0].timesteps) == {0.0}
    assert res.image.shape == (256, 256, 3) and res.image.dtype == np.uint8
    again = run_generation(engine, inputs, "flair", [torch.Generator().manual_seed(0)])
    assert (again.image == res.image).all()  # seeded
    other = run_generation(engine, inputs, "flair", [torch.Generator().manual_seed(1)])
    assert not (other.image == res.image).all()


def test_unified_chain_golden_sequence_and_cfg_contexts_of_three_targets(bundle, hf) -> None:
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    chain = run_unified(engine, rgb_inputs(1, seed=3), ["t2", "flair", "t1ce"], torch.Generator().manual_seed(0),
                        think_max_length=5)
    system = ("You should first think about the planning process in the mind and then generate the image. \n"
              "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
              "</think> image here")
    first = "Translate the attached MRI into its t2w image."
    nxt = {"flair": "Translate the attached MRI images into t2f image.",
           "t1ce": "Translate the attached MRI images into t1c image."}
    think = chain.thinking
    assert all("<|im_end|>" not in think[t] for t in think)  # decoded text up to <|im_end|>, re-encoded as an item
    recs = engine.records
    assert len(recs) == 3
    # target 1: text-free = system + images; image-free = system + instruction
    cond = Golden(hf).text(system).image().text(first)
    text_free = Golden(hf).text(system).image()
    image_free = Golden(hf).text(system).text(first)
    cond.text(think["t2"])  # the thinking is in the conditional context only
    for rec in recs:
        assert rec.calls == {"cond": 9, "text_free": 6, "image_free": 6}  # shift 1: t = 1 .. 0.44 inside (0.4, 1]
    assert layout(recs[0].cond) == (cond.ids, cond.pos)
    assert layout(recs[0].text_free) == (text_free.ids, text_free.pos)
    assert layout(recs[0].image_free) == (image_free.ids, image_free.pos)
    # target k >= 2: text-free = all up to the previous generated image; image-free = that minus it + next instruction
    for k, target in ((1, "flair"), (2, "t1ce")):
        image_free = cond.copy().text(nxt[target])
        cond.image()
        text_free = cond.copy()
        cond.text(nxt[target]).text(think[target])
        assert layout(recs[k].cond) == (cond.ids, cond.pos)
        assert layout(recs[k].text_free) == (text_free.ids, text_free.pos)
        assert layout(recs[k].image_free) == (image_free.ids, image_free.pos)
        assert recs[k].query_positions == (cond.p, text_free.p, image_free.p)
    cond.image()
    assert chain.context.layout() == (cond.ids, cond.pos)
    q_imp, q_dx = chain.answer_contexts
    g_imp = cond.copy().text("Assess the given data and present a comprehensive impression of the observed "
                             "anatomical structures.")
    assert q_imp.layout() == (g_imp.ids, g_imp.pos)
    g_dx = g_imp.copy().text("Based on the provided information, what is the most likely clinical diagnosis? Answer "
                             "with Glioblastoma, Meningioma, or Metastatic tumor.")  # the impression is not appended
    assert q_dx.layout() == (g_dx.ids, g_dx.pos)
    assert set(chain.images) == {"t2", "flair", "t1ce"} and chain.images["t1ce"].shape == (256, 256, 3)


def test_diagnosis_task_golden_sequence(bundle, hf) -> None:
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    answer, ctx = run_diagnosis(engine, rgb_inputs(3, seed=5), torch.Generator().manual_seed(0), max_length=6)
    g = Golden(hf).image().image().image().text(
        "Based on the provided information, provide a detailed impression of the observed structures and any "
        "potential issues, and tell me what is the most likely clinical diagnosis?")
    assert ctx.layout() == (g.ids, g.pos) and ctx.length == len(g.ids)
    assert isinstance(answer, str) and "<|im_start|>" not in answer


def test_text_generation_is_greedy_from_im_start_and_stops_at_im_end(bundle, hf) -> None:
    model, tok = bundle.model, bundle.tokenizer
    engine = ReleasedEngine(model, bundle.vae, tok)
    ctx = engine.new_context()
    engine.add_text(ctx, "Impression: a mass.")
    before = (ctx.length, ctx.next_position)
    text = engine.gen_text(ctx, 3)
    assert (ctx.length, ctx.next_position) == before  # the context is not changed
    # reference: full uncached forwards of [item] + <|im_start|> + generated tokens, greedy
    seq = [tok.bos_id, *hf.encode("Impression: a mass.", add_special_tokens=False).ids, tok.eos_id, tok.bos_id]
    new = []
    for _ in range(2):  # max_length 3 = <|im_start|> + 2 tokens
        b = model.builder()
        b.add_text(seq + new)
        with torch.no_grad():
            new.append(int(model(b.build(), logits_at="last", velocity_at="none").logits[-1].argmax()))
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    assert text == hf.decode([tok.bos_id, *new], skip_special_tokens=False).split("<|im_end|>")[0].split(
        "<|im_start|>")[1]
    # make <|im_end|> the first greedy token: generation stops at once with an empty text
    head = model.language_model.lm_head.weight
    saved = head[tok.eos_id].clone()
    first = new[0] if new else int(head.argmax())
    with torch.no_grad():
        head[tok.eos_id] = 3 * head[first]
    try:
        b = model.builder()
        b.add_text(seq)
        with torch.no_grad():
            assert int(model(b.build(), logits_at="last", velocity_at="none").logits[-1].argmax()) == tok.eos_id
        assert engine.gen_text(ctx, 50) == ""
    finally:
        with torch.no_grad():
            head[tok.eos_id] = saved


def test_context_images_are_posterior_samples_and_bicubic_vit_views(bundle, monkeypatch) -> None:
    engine = ReleasedEngine(bundle.model, bundle.vae, bundle.tokenizer)
    seen = []
    real = bundle.model.prefill
    monkeypatch.setattr(bundle.model, "prefill", lambda cache, packed, **kw: seen.append(packed) or real(cache, packed))
    rgb = rgb_inputs(1, seed=9)[0]
    engine.add_image(engine.new_context(), rgb, torch.Generator().manual_seed(4))
    packed = seen[-1]
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 * 2 - 1
    with torch.no_grad():
        mean, logvar = bundle.vae.encode_moments(x[None])
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))
    z = 0.3611 * (mean + torch.exp(0.5 * logvar) * noise - 0.1159)
    torch.testing.assert_close(packed.vae_latents, patchify_latent(z[0], 2, 64)[0])
    z_mean = 0.3611 * (mean - 0.1159)
    assert not torch.allclose(packed.vae_latents, patchify_latent(z_mean[0], 2, 64)[0])  # sampled, not the mean
    vit = np.array(Image.fromarray(rgb).resize((252, 252), Image.BICUBIC))
    expect = patch_tokens(torch.from_numpy(vit).permute(2, 0, 1).float() / 255 * 2 - 1, 14)
    assert packed.vit_patches.shape == (N_VIT, 588)
    torch.testing.assert_close(packed.vit_patches, expect)


# ---------------------------------------------------------------------------------------------
# commands end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scans")
    idx = np.indices((36, 40, 12)).astype(np.float32)
    r = ((idx[0] - 17.5) / 15) ** 2 + ((idx[1] - 19.5) / 17) ** 2 + ((idx[2] - 5.5) / 7) ** 2
    brain = np.where(r < 1, 300 + 80 * np.sin(idx[0] / 3) + 5 * idx[2], 0).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    files = {}
    for name, data in (("t1", brain), ("t2", brain[::-1] * 0.5 + 3 * (brain > 0))):
        files[name] = d / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(files[name]))
    return files


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_impute_released_end_to_end(bundle, released, scans, tmp_path) -> None:
    spec = InputSpec({"t1": scans["t1"], "t2": scans["t2"]})
    out = tmp_path / "out"
    res = impute_released(spec, ["flair"], released, None, out, slices="2", ensemble=2, seed=3, bundle=bundle)
    assert sorted(p.name for p in out.iterdir()) == ["flair_imputed.nii.gz", "flair_std.nii.gz", "impute.json",
                                                     "montage.png"]
    img, src = nib.load(str(out / "flair_imputed.nii.gz")), nib.load(str(scans["t1"]))
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    data = np.asarray(img.dataobj)
    filled = sorted({int(k) for k in np.flatnonzero(data.reshape(-1, data.shape[2]).any(axis=0))})
    assert len(filled) == 2 and sorted(res.slices) == filled  # 1-mm grid = the file's grid here
    assert data.min() >= 0 and data.max() <= 1 and b"released" in img.header["descrip"].tobytes()
    meta = json.loads((out / "impute.json").read_text())
    assert meta["protocol"] == "released" and meta["task"] == "generation" and meta["seeds"] == [3, 4]
    assert meta["sequence_inputs"] == ["t1", "t2"] and meta["codes"]["flair"] == "t2f"
    assert meta["sampler"]["shift"] == 3.0 and meta["sampler"]["euler_steps"] == 9
    again = tmp_path / "again"
    impute_released(spec, ["flair"], released, None, again, slices="2", ensemble=2, seed=3, bundle=bundle)
    assert (np.asarray(nib.load(str(again / "flair_imputed.nii.gz")).dataobj) == data).all()  # deterministic


def test_cli_impute_protocol_released_on_a_nifti_file(released, scans, tmp_path) -> None:
    out = tmp_path / "cli"
    res = invoke("-q", "impute", "--have", f"t1={scans['t1']}", "--want", "t2", "--slices", "1", "--ckpt", released,
                 "--out", out)
    assert res.exit_code == 0, res.output
    img, src = nib.load(str(out / "t2_imputed.nii.gz")), nib.load(str(scans["t1"]))
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    meta = json.loads((out / "impute.json").read_text())
    assert meta["protocol"] == "released" and meta["task"] == "generation" and len(meta["slices"]) == 1
    res = invoke("impute", "--have", f"t1={scans['t1']}", "--want", "t2", "--ckpt", released / "missing",
                 "--protocol", "released", "--out", tmp_path / "none")
    assert_one_line_error(res, "checkpoint folder not found")
    assert not (tmp_path / "none").exists()


def test_impute_released_unified_chain_records_thinking_and_answer(bundle, released, scans, tmp_path) -> None:
    spec = InputSpec({"t1": scans["t1"]})
    res = impute_released(spec, ["t2", "flair"], released, None, tmp_path / "u", slices="1", task="unified",
                          think_max_length=3, bundle=bundle)
    meta = json.loads((tmp_path / "u" / "impute.json").read_text())
    assert meta["task"] == "unified" and meta["sampler"]["shift"] == 1.0
    assert set(meta["thinking"]) == {"t2", "flair"} and meta["answer"] == res.answer.text
    assert (tmp_path / "u" / "t2_imputed.nii.gz").is_file() and (tmp_path / "u" / "flair_imputed.nii.gz").is_file()


def test_diagnose_released_chain_and_understanding(bundle, released, scans) -> None:
    spec = InputSpec({"t1": scans["t1"]})
    chain = diagnose_released(spec, released, bundle=bundle, think_max_length=3)
    assert chain.task == "unified" and chain.imputed == ["t2", "flair", "t1ce"] and set(chain.thinking) == set(
        chain.imputed)
    plain = diagnose_released(spec, released, impute=False, bundle=bundle, answer_max_length=4)
    assert plain.task == "diagnosis" and plain.imputed == [] and plain.given == ["t1"]
    assert plain.prediction == protocol.classify_answer(plain.answer)[0]


def test_cli_diagnose_and_report_with_a_step_folder_and_base(released, scans, tmp_path) -> None:
    step = tmp_path / "0001000"
    step.mkdir()
    shutil.copy(released / "ema.safetensors", step / "ema.safetensors")
    res = invoke("-q", "diagnose", "--have", f"t1={scans['t1']},t2={scans['t2']},flair={scans['t1']},"
                 f"t1ce={scans['t2']}", "--ckpt", step, "--base", released, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["protocol"] == "released" and result["task"] == "diagnosis"  # nothing to impute
    res = invoke("-q", "report", "--have", f"t1={scans['t1']}", "--ckpt", released, "--format", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["protocol"] == "released"


def _broken_folders(released: Path, tmp: Path) -> dict[str, Path]:
    folders = {}
    partial = tmp / "partial"
    partial.mkdir()
    shutil.copy(released / "ema.safetensors", partial / "ema.safetensors")
    shutil.copy(released / "llm_config.json", partial / "llm_config.json")
    folders["partial"] = partial
    shaped = Path(shutil.copytree(released, tmp / "shaped"))
    llm = json.loads((shaped / "llm_config.json").read_text())
    llm["intermediate_size"] = 48
    (shaped / "llm_config.json").write_text(json.dumps(llm))
    folders["shaped"] = shaped
    folders["tokenizer"] = Path(shutil.copytree(released, tmp / "tok"))
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json"):
        (folders["tokenizer"] / name).unlink()
    write_tokenizer(qwen2_style_tokenizer(QWEN_SPECIALS[:3]), folders["tokenizer"])  # no vision tokens
    step = tmp / "0000200"
    step.mkdir()
    shutil.copy(released / "ema.safetensors", step / "ema.safetensors")
    folders["step"] = step
    return folders


def test_cli_errors_are_one_line_and_write_nothing(released, scans, tmp_path) -> None:
    bad = _broken_folders(released, tmp_path)
    have = f"t1={scans['t1']}"
    folders = [
        (bad["partial"], ("partial", "missing vit_config.json", "ae.safetensors", "--base")),
        (bad["shaped"], ("ema.safetensors", "shape mismatch", "mlp.gate_proj.weight [64, 32] != [48, 32]")),
        (bad["tokenizer"], ("tokenizer.json", "no special token '<|vision_start|>'")),
        (bad["step"], ("--base", "step folder")),
    ]
    for i, (ckpt, needles) in enumerate(folders):
        assert_one_line_error(invoke("diagnose", "--have", have, "--ckpt", ckpt, "--no-impute"), *needles)
        assert_one_line_error(invoke("report", "--have", have, "--ckpt", ckpt), *needles)
        out = tmp_path / f"out{i}"
        with pytest.raises(UserError) as err:
            impute_released(InputSpec({"t1": scans["t1"]}), ["t2"], ckpt, None, out)
        assert all(n in str(err.value) for n in needles), str(err.value)
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))
    for extra, needles in ((["--protocol", "native", "--base", released], ("--base", "only applies")),
                           (["--protocol", "bagel"], ("--protocol", "unknown protocol"))):
        assert_one_line_error(invoke("diagnose", "--have", have, "--ckpt", released, *extra), *needles)
        assert_one_line_error(invoke("report", "--have", have, "--ckpt", released, *extra), *needles)
