"""Each MoE family's parameters get their role; what no family describes is refused in one line."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

from model.families import UnsupportedModel, check_supported, describe, role_of
from model.lora import kind_of
from family_configs import FAMILIES, tiny_config


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_familys_parameters_have_the_role_their_module_plays(family: str) -> None:
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=64))
    assert describe(model.config).num_experts == 4 and describe(model.config).top_k == 2
    roles = {name: role_of(name) for name, _ in model.named_parameters(remove_duplicate=False) if "norm" not in name and "embed" not in name}
    for name, role in roles.items():
        if ".mlp.experts." in name:
            assert role == "routed_expert", name
        elif ".mlp.shared_expert" in name:
            assert role == "shared_expert", name
        elif ".mlp.gate.weight" in name:
            assert role == "router", name
    present = set(roles.values())
    assert {"routed_expert", "router", "attention", "head"} <= present
    assert ("shared_expert" in present) == (family in ("qwen2_moe", "deepseek_v3"))
    assert ("dense_mlp" in present) == (family == "deepseek_v3")
    if family == "deepseek_v3":  # the leading dense layer's MLP is shared, layer 1's is routed
        assert roles["model.layers.0.mlp.gate_proj.weight"] == "dense_mlp"
        assert not any(n.startswith("model.layers.0.mlp.experts.") for n in roles)
        assert roles["model.layers.1.mlp.shared_experts.up_proj.weight"] == "shared_expert"
    if family == "qwen2_moe":  # the shared expert's sigmoid gate is not the router
        assert roles["model.layers.0.mlp.shared_expert_gate.weight"] == "shared_expert"


def test_trainable_state_kinds_put_shared_experts_and_dense_mlps_with_the_token_weighted_tensors() -> None:
    assert kind_of("model.layers.1.mlp.experts.gate_up_proj.lora_B.e3") == "experts"
    assert kind_of("model.layers.0.mlp.shared_expert_gate.weight") == "attention"
    assert kind_of("model.layers.0.mlp.shared_experts.up_proj.lora_B") == "attention"
    assert kind_of("model.layers.0.mlp.gate_proj.lora_B") == "attention"
    assert kind_of("model.layers.0.mlp.gate.weight") == "router"
    assert kind_of("lm_head.lora_B") == "head"
    assert kind_of("model.layers.0.self_attn.q_proj.lora_B") == "attention"
    with pytest.raises(UnsupportedModel, match="'model.layers.0.mlp.mystery.lora_B' is none of"):
        kind_of("model.layers.0.mlp.mystery.lora_B")
    with pytest.raises(UnsupportedModel, match="not split per expert"):
        kind_of("model.layers.0.mlp.experts.down_proj.lora_B")


def test_a_dense_model_or_an_moe_without_routed_experts_or_top_k_is_refused_naming_the_missing_piece() -> None:
    with pytest.raises(UnsupportedModel) as dense:
        check_supported(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert str(dense.value) == (
        "LlamaForCausalLM: no routed experts (none of num_local_experts, num_experts, n_routed_experts in its config)"
    )
    no_experts = MixtralConfig(num_local_experts=0, architectures=["MixtralForCausalLM"])
    with pytest.raises(UnsupportedModel, match="^MixtralForCausalLM: no routed experts"):
        check_supported(no_experts)
    too_many = MixtralConfig(num_local_experts=4, num_experts_per_tok=5, architectures=["MixtralForCausalLM"])
    with pytest.raises(UnsupportedModel, match=r"^MixtralForCausalLM: no top-k routing \(num_experts_per_tok = 5, 4 routed"):
        check_supported(too_many)
    with pytest.raises(UnsupportedModel, match="parameter 'model.layers.0.mlp.odd.weight' is none of"):
        check_supported(MixtralConfig(num_local_experts=4), ["model.layers.0.mlp.odd.weight"])
