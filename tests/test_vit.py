"""SigLIP NaViT: patchify == conv, packing == per-image, parity with transformers, BAGEL keys."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from unibrain_cli.config.components import ModelConfig, ViTConfig
from unibrain_cli.config.validate import validate_model_config
from unibrain_cli.model.vit import PatchStem, SiglipVisionModel, patchify

CFG = ViTConfig(patch_size=4, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                max_patches_per_side=6)
BAGEL_KEYS = Path("/work/shared/bagel-7b-mot-keys.tsv")


def _model(seed: int = 0) -> SiglipVisionModel:
    torch.manual_seed(seed)
    return SiglipVisionModel(CFG).eval()


def test_patchify_linear_equals_conv() -> None:
    torch.manual_seed(0)
    c, p, hidden = 3, 4, 32
    image = torch.randn(c, 12, 16)
    conv = nn.Conv2d(c, hidden, kernel_size=p, stride=p)
    linear = nn.Linear(p * p * c, hidden)
    with torch.no_grad():  # the checkpoint's conversion: (out, c, kh, kw) -> (out, kh, kw, c)
        linear.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(hidden, -1))
        linear.bias.copy_(conv.bias)
    patches, pos = patchify(image, p, max_per_side=6)
    assert patches.shape == (3 * 4, p * p * c)
    expected = conv(image[None])[0].flatten(1).T  # [h*w, hidden], row-major
    torch.testing.assert_close(linear(patches), expected, rtol=1e-5, atol=1e-5)
    assert pos.tolist() == [r * 6 + col for r in range(3) for col in range(4)]


def test_patchify_rejects_oversized_grid() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        patchify(torch.zeros(3, 28, 4), 4, max_per_side=6)


@pytest.mark.parametrize("stem", [(), (5, 7)])
def test_packed_forward_equals_each_image_alone(stem: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = SiglipVisionModel(replace(CFG, stem_widths=stem)).eval()
    torch.manual_seed(1)
    images = [torch.randn(3, 8, 12), torch.randn(3, 16, 4), torch.randn(3, 24, 24)]
    parts = [patchify(im, CFG.patch_size, CFG.max_patches_per_side) for im in images]
    lengths = [p.shape[0] for p, _ in parts]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat([p for p, _ in parts]), torch.cat([q for _, q in parts]), cu)
        alone = [model(p, q, torch.tensor([0, p.shape[0]], dtype=torch.int32)) for p, q in parts]
    assert packed.shape == (sum(lengths), CFG.hidden_size)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_bad_cu_seqlens_is_rejected() -> None:
    model = _model()
    x, pos = patchify(torch.randn(3, 8, 8), 4, 6)
    with pytest.raises(ValueError, match="partition"):
        model(x, pos, torch.tensor([0, 3], dtype=torch.int32))


def test_matches_transformers_siglip() -> None:
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel as HFSiglip

    hf_cfg = SiglipVisionConfig(
        hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
        image_size=CFG.patch_size * CFG.max_patches_per_side, patch_size=CFG.patch_size,
        layer_norm_eps=CFG.layer_norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )
    torch.manual_seed(0)
    hf = HFSiglip(hf_cfg).eval()
    hf_sd = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    ours = SiglipVisionModel(CFG).eval()
    conv_w = hf_sd.pop("embeddings.patch_embedding.weight")
    hf_sd["embeddings.patch_embedding.weight"] = conv_w.permute(0, 2, 3, 1).reshape(CFG.hidden_size, -1)
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith("position_ids")}
    ours.load_state_dict(hf_sd, strict=True)

    torch.manual_seed(2)
    image = torch.randn(3, 24, 24)
    patches, pos = patchify(image, CFG.patch_size, CFG.max_patches_per_side)
    with torch.no_grad():
        expected = hf(pixel_values=image[None]).last_hidden_state[0]
        got = ours(patches, pos, torch.tensor([0, patches.shape[0]], dtype=torch.int32))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not BAGEL_KEYS.is_file(), reason="BAGEL key table not present")
def test_bagel_vit_keys_and_shapes() -> None:
    rows = {}
    for line in BAGEL_KEYS.read_text().splitlines()[1:]:
        if line.startswith("vit_model.vision_model."):
            name, shape, _ = line.split("\t")
            rows[name.removeprefix("vit_model.vision_model.")] = tuple(int(s) for s in shape.strip("[]").split(","))
    cfg = replace(ViTConfig(), patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26,
                  num_heads=16, max_patches_per_side=70)
    with torch.device("meta"):
        model = SiglipVisionModel(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == rows


STEM = replace(CFG, stem_widths=(5, 7))


def test_stem_is_a_per_patch_conv_stack_in_patchify_order() -> None:
    """The stem equals its convolutions run on each patch cut out of the image, features leaving
    ordered (row, col, channel); a patch's features depend on that patch only."""
    torch.manual_seed(0)
    stem = PatchStem(4, 3, (5, 7)).eval()
    image = torch.randn(3, 8, 12)
    patches, _ = patchify(image, 4, max_per_side=6)
    out = stem(patches)
    assert out.shape == (6, 1 * 1 * 7) and stem.out_features == 7
    for k, (r, c) in enumerate((r, c) for r in range(2) for c in range(3)):
        crop = image[None, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
        torch.testing.assert_close(out[k], stem.layers(crop)[0].permute(1, 2, 0).reshape(-1))
    changed = patches.clone()
    changed[1] += 1.0
    moved = (stem(changed) - out).abs().amax(dim=1)
    assert moved[1] > 0 and torch.equal(moved[[0, 2, 3, 4, 5]], torch.zeros(5))


def test_no_stem_keeps_siglip_keys_and_init() -> None:
    """Without ``stem_widths`` the module tree and its seeded init are SigLIP's as before; with one,
    ``embeddings.stem`` is added and the projection reads its features."""
    torch.manual_seed(3)
    plain = SiglipVisionModel(CFG).state_dict()
    torch.manual_seed(3)
    stemmed = SiglipVisionModel(STEM).state_dict()
    assert not any(".stem." in k for k in plain)
    assert plain["embeddings.patch_embedding.weight"].shape == (32, 4 * 4 * 3)
    assert stemmed["embeddings.patch_embedding.weight"].shape == (32, 7)
    assert set(stemmed) - set(plain) == {f"embeddings.stem.layers.{i}.{w}" for i in (0, 1, 3, 4) for w in ("weight", "bias")}
    torch.manual_seed(3)  # SigLIP's two embedding tensors first, drawn as before the stem existed
    linear, table = nn.Linear(4 * 4 * 3, 32), nn.Embedding(36, 32)
    assert torch.equal(plain["embeddings.patch_embedding.weight"], linear.weight)
    assert torch.equal(plain["embeddings.position_embedding.weight"], table.weight)


def test_stem_gets_gradients() -> None:
    torch.manual_seed(0)
    model = SiglipVisionModel(STEM)
    x, pos = patchify(torch.randn(3, 8, 8), 4, 6)
    model(x, pos, torch.tensor([0, x.shape[0]], dtype=torch.int32)).square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".stem." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("patch", "widths", "match"), [(4, (8, 8, 8), "multiple of 2 \\*\\* len"), (4, (0,), "positive")])
def test_stem_config_is_validated(patch: int, widths: tuple[int, ...], match: str) -> None:
    cfg = ModelConfig()
    cfg = replace(cfg, vit=replace(cfg.vit, patch_size=patch, stem_widths=widths))
    with pytest.raises(ValueError, match=match):
        validate_model_config(cfg, prefix="model.")
