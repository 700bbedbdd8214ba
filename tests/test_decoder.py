"""Qwen2-style MoT decoder: config checks, BAGEL names, equivalence to Hugging Face Qwen, routing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from unibrain_cli.config.components import LLMConfig
from unibrain_cli.config.validate import validate_llm_config
from unibrain_cli.model.attention import MaskInfo
from unibrain_cli.model.decoder import MoTLanguageModel, Routing

CFG = LLMConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                vocab_size=64, rope_theta=10_000.0)


def _model(cfg: LLMConfig = CFG, seed: int = 0) -> MoTLanguageModel:
    torch.manual_seed(seed)
    m = MoTLanguageModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        m.init_generation_expert()
    return m


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_heads": 5}, "num_heads=5 does not divide llm.hidden_size"),
        ({"head_dim": 16}, "head_dim=16 x llm.num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads=3 does not divide llm.num_heads"),
    ],
)
def test_invalid_shapes_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        validate_llm_config(replace(CFG, **change))


def test_state_dict_uses_bagel_names() -> None:
    keys = set(_model().state_dict())
    layer = "model.layers.1."
    for suffix in ("", "_moe_gen"):
        for name in ("q_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.weight",
                     "q_norm.weight", "k_norm.weight"):
            stem, rest = name.split(".", 1)
            assert f"{layer}self_attn.{stem}{suffix}.{rest}" in keys
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{layer}mlp{suffix}.{proj}.weight" in keys
        assert f"{layer}input_layernorm{suffix}.weight" in keys
        assert f"{layer}post_attention_layernorm{suffix}.weight" in keys
        assert f"model.norm{suffix}.weight" in keys
    assert f"{layer}self_attn.o_proj.bias" not in keys
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= keys
    assert not any("rotary" in k for k in keys)


def test_generation_expert_starts_as_a_copy() -> None:
    torch.manual_seed(0)
    m = MoTLanguageModel(CFG)
    sd = m.state_dict()
    for k, v in sd.items():
        if "_moe_gen" in k:
            assert torch.equal(v, sd[k.replace("_moe_gen", "")]), k


def test_tied_embeddings_share_the_table() -> None:
    m = MoTLanguageModel(replace(CFG, tie_word_embeddings=True))
    assert m.lm_head.weight is m.model.embed_tokens.weight


def _run(m: MoTLanguageModel, ids: torch.Tensor, route: Routing | None = None) -> torch.Tensor:
    n = ids.numel()
    route = route or Routing.all_und(n)
    h, _ = m(m.model.embed_tokens(ids), torch.arange(n), route, MaskInfo.from_splits([n], ["causal"], [0]), "sdpa")
    return m.lm_head(h)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_understanding_path_equals_hugging_face_qwen(qk_norm: bool) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = replace(CFG, qk_norm=qk_norm)
    m = _model(cfg)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10_000.0, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=False)
    if qk_norm:  # Qwen3 = Qwen2 + per-head q/k RMSNorm (its o_proj bias is zeroed below)
        ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, attention_bias=True, **common))
    else:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    ours = {k: v for k, v in m.state_dict().items() if "_moe_gen" not in k}
    theirs = ref.state_dict()
    for k in theirs:
        if k.endswith("o_proj.bias"):
            ours[k] = torch.zeros_like(theirs[k])
    ref.load_state_dict(ours, strict=True)
    ids = torch.randint(0, 64, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        got = _run(m, ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_routing_with_identical_experts_changes_nothing() -> None:
    m = _model()
    ids = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(2))
    mixed = Routing(torch.tensor([0, 1, 2, 6, 7, 8]), torch.tensor([3, 4, 5]), 9)
    with torch.no_grad():
        torch.testing.assert_close(_run(m, ids, mixed), _run(m, ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_run(m, ids, Routing.all_gen(9)), _run(m, ids), atol=1e-5, rtol=1e-5)


def test_generation_expert_only_acts_on_its_rows() -> None:
    m = _model()
    ids = torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(3))
    mixed = Routing(torch.tensor([0, 1, 2, 6, 7, 8]), torch.tensor([3, 4, 5]), 9)
    with torch.no_grad():
        before = _run(m, ids, mixed)
        m.model.layers[1].mlp_moe_gen.down_proj.weight.mul_(3.0)
        m.model.norm_moe_gen.weight.add_(1.0)
        after = _run(m, ids, mixed)
    # last layer's generation MLP and final norm touch only rows 3..5 (no later attention)
    torch.testing.assert_close(after[[0, 1, 2, 6, 7, 8]], before[[0, 1, 2, 6, 7, 8]])
    assert not torch.allclose(after[3:6], before[3:6])


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    ids = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        m = _model()
        m.model.activation_checkpointing = ckpt
        _run(m, ids).square().mean().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
