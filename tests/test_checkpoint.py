"""Checkpoints: our folder round trip, the BAGEL-7B-MoT key map on the meta device, FLOP counts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unibrain_cli.config.components import LLMConfig, ModelConfig, ViTConfig
from unibrain_cli.errors import UserError
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.checkpoint import (
    FLUX_VAE,
    CheckpointError,
    bagel_config_jsons,
    bagel_model_config,
    build_model,
    config_to_dict,
    from_pretrained,
    load_bagel_folder,
    model_config_from_dict,
    save_bagel_folder,
    save_pretrained,
)
from unibrain_cli.model.flops import (
    active_parameters,
    count_parameters,
    flops_per_token,
    parameter_breakdown,
)
from unibrain_cli.model.vae import AutoEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "bagel-7b-mot-keys.tsv"
CFG = ModelConfig()
PATCH_DIM = CFG.vit.patch_size**2 * CFG.vit.num_channels

BAGEL_7B = ModelConfig(
    llm=LLMConfig(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                  head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, vocab_size=152064, tie_word_embeddings=False),
    vit=ViTConfig(patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                  max_patches_per_side=70),
    vae=FLUX_VAE,
    latent_patch_size=2,
    max_latent_size=64,
    vit_max_num_patch_per_side=70,
)


def _tsv() -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in FIXTURE.read_text().splitlines()[1:]:
        if not line or line.startswith("#"):
            continue
        name, shape, _ = line.split("\t")
        rows[name] = tuple(json.loads(shape))
    return rows


def test_bagel_7b_maps_exactly_onto_the_checkpoint_keys() -> None:
    model = build_model(BAGEL_7B, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours.update({k: tuple(v.shape) for k, v in model.named_buffers() if k.endswith("pos_embed")})
    theirs = _tsv()
    assert len(theirs) == 1223
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
    assert count_parameters(BAGEL_7B, include_tables=True) == 14_607_260_128
    assert count_parameters(model) == 14_575_018_464
    assert parameter_breakdown(model) == {
        "embed+lm_head": 1_089_994_752, "llm-und-expert": 6_525_628_928, "gen-expert": 6_525_628_928,
        "bridges": 63_454_784, "vit": 402_552_736,
    }


def test_bagel_7b_recipe_is_this_model() -> None:
    from unibrain_cli.config.loader import RECIPES_DIR, load_recipe

    model = load_recipe(RECIPES_DIR / "bagel-7b.toml").model
    assert (model.llm, model.vit, model.vae) == (BAGEL_7B.llm, BAGEL_7B.vit, BAGEL_7B.vae)
    assert (model.latent_patch_size, model.max_latent_size, model.vit_max_num_patch_per_side) == (2, 64, 70)


def test_bagel_7b_config_from_its_json_files() -> None:
    llm_json, vit_json = bagel_config_jsons(BAGEL_7B)
    assert vit_json["num_hidden_layers"] == 27 and vit_json["image_size"] == 980
    cfg = bagel_model_config(llm_json, vit_json)
    assert cfg.llm == BAGEL_7B.llm and cfg.vit == BAGEL_7B.vit
    assert (cfg.max_latent_size, cfg.vit_max_num_patch_per_side, cfg.latent_patch_size) == (64, 70, 2)
    with pytest.raises(CheckpointError, match="lack a field"):
        bagel_model_config({"hidden_size": 8}, vit_json)


def _randomised(cfg: ModelConfig = CFG, seed: int = 0) -> UniBrainModel:
    torch.manual_seed(seed)
    m = UniBrainModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _outputs(m: UniBrainModel) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b = m.builder(image_markers=(1, 2))
    b.add_text([5, 6, 7])
    b.add_vit_image((2, 2), patches=torch.randn(4, PATCH_DIM, generator=g))
    b.add_text([8, 9])
    b.add_vae_image((2, 3), noisy=True, timestep=0.5, latents=torch.randn(6, 16, generator=g))
    b.add_vae_image((2, 3), latents=torch.randn(6, 16, generator=g))
    b.add_text([10, 11, 12], loss=True)
    with torch.no_grad():
        out = m(b.build())
    return out.logits, out.velocity


class _Tok:
    def __init__(self) -> None:
        self.saved = False

    def save(self, directory: Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.write_text("{}")
        return path


def test_save_and_load_pretrained_round_trip(tmp_path: Path) -> None:
    m = _randomised()
    vae = AutoEncoder(CFG.vae)
    out = save_pretrained(m, tmp_path / "ckpt", tokenizer=_Tok(), vae=vae, extra_config={"stage": "unified"})
    assert sorted(p.name for p in out.iterdir()) == ["ae.safetensors", "config.json", "model.safetensors", "tokenizer.json"]
    loaded = from_pretrained(out)
    assert loaded.config == CFG and loaded.extra == {"stage": "unified"} and loaded.tokenizer_dir == out
    for a, b in zip(_outputs(m), _outputs(loaded.model), strict=True):
        torch.testing.assert_close(a, b)
    assert loaded.vae is not None
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.vae.state_dict()[k])
    torch.testing.assert_close(loaded.model.latent_pos_embed.pos_embed, m.latent_pos_embed.pos_embed)


def test_vit_stem_round_trip(tmp_path: Path) -> None:
    """A model with the ViT's convolutional stem saves its widths in config.json and loads to the same outputs."""
    cfg = replace(CFG, vit=replace(CFG.vit, stem_widths=(6, 10)))
    m = _randomised(cfg)
    out = save_pretrained(m, tmp_path / "stem")
    assert json.loads((out / "config.json").read_text())["model"]["vit"]["stem_widths"] == [6, 10]
    loaded = from_pretrained(out)
    assert loaded.config == cfg
    for a, b in zip(_outputs(m), _outputs(loaded.model), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(_outputs(m)[0], _outputs(_randomised())[0])  # the stem is in the path


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    cfg = replace(CFG, llm=replace(CFG.llm, tie_word_embeddings=True))
    m = _randomised(cfg)
    save_pretrained(m, tmp_path / "tied")
    assert "language_model.lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    loaded = from_pretrained(tmp_path / "tied").model
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    torch.testing.assert_close(_outputs(m)[0], _outputs(loaded)[0])


def test_fake_bagel_folder_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _randomised()
    vae = AutoEncoder(CFG.vae)
    folder = save_bagel_folder(m, tmp_path / "BAGEL-7B-MoT", vae=vae)
    raw = load_file(folder / "ema.safetensors")
    assert "latent_pos_embed.pos_embed" in raw and "vit_pos_embed.pos_embed" in raw
    loaded = load_bagel_folder(folder, vae_config=CFG.vae)
    assert loaded.config.llm == CFG.llm and loaded.config.tokenizer == "qwen2"
    assert loaded.config.tokenizer_path == str(folder)
    for a, b in zip(_outputs(m), _outputs(loaded.model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    from unibrain_cli.model import checkpoint

    calls = []
    monkeypatch.setattr(checkpoint, "load_bagel_folder", lambda d, **kw: calls.append(d) or loaded)
    assert from_pretrained(folder) is loaded and calls == [folder]  # BAGEL folders are detected


def test_bagel_folder_with_wrong_keys_lists_them(tmp_path: Path) -> None:
    folder = save_bagel_folder(_randomised(), tmp_path / "bagel")
    state = load_file(folder / "ema.safetensors")
    del state["connector.fc2.bias"]
    state["language_model.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2)
    state["vae2llm.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_bagel_folder(folder, load_autoencoder=False, vae_config=CFG.vae)
    msg = str(err.value)
    assert "1 missing key(s): connector.fc2.bias" in msg
    assert "1 unexpected key(s): language_model.model.layers.0.self_attn.extra_proj.weight" in msg
    assert "vae2llm.weight [3, 3] != [128, 16]" in msg
    assert isinstance(err.value, UserError)


def test_broken_folders_raise_user_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a folder"):
        from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        from_pretrained(tmp_path / "empty")
    save_pretrained(_randomised(), tmp_path / "ok")
    meta = json.loads((tmp_path / "ok" / "config.json").read_text())
    meta["model"]["llm"]["hidden_sise"] = 3
    (tmp_path / "ok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model.llm.hidden_sise"):
        from_pretrained(tmp_path / "ok")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "unibrain", "model": {}}))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        from_pretrained(tmp_path / "bad")


def test_config_dict_round_trip() -> None:
    assert model_config_from_dict(config_to_dict(BAGEL_7B)) == BAGEL_7B
    assert model_config_from_dict(json.loads(json.dumps(config_to_dict(CFG)))) == CFG


def test_meta_build_costs_no_memory_and_materialises() -> None:
    m = build_model(CFG, device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert count_parameters(m) == count_parameters(UniBrainModel(CFG)) == count_parameters(CFG)


def test_flops_per_token() -> None:
    llm = BAGEL_7B.llm
    layer = llm.hidden_size * (3584 + 2 * 512) + 3584 * 3584 + 3 * 3584 * 18944
    assert active_parameters(BAGEL_7B, include_lm_head=False) == 28 * layer
    fwd0 = flops_per_token(BAGEL_7B, 0, training=False)
    assert fwd0 == 2 * active_parameters(BAGEL_7B)
    assert flops_per_token(BAGEL_7B, 1000) == 3 * flops_per_token(BAGEL_7B, 1000, training=False)
    attn = flops_per_token(BAGEL_7B, 1000, training=False) - fwd0
    assert attn == 4 * 28 * 28 * 128 * 1000
    assert 6 * 7.0e9 < flops_per_token(BAGEL_7B, 0) < 6 * 8.5e9  # ~7.6B active weights per token
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(CFG, -1)
