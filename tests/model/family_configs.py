"""Tiny configs of the five MoE families fedmoe trains (2 layers, 4 routed experts, top-2; DeepSeek-V3
a leading dense layer before 2 MoE layers, with a shared expert)."""

from __future__ import annotations

from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=True,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
FAMILIES: dict[str, tuple[type[PretrainedConfig], str, dict[str, object]]] = {
    "mixtral": (MixtralConfig, "MixtralForCausalLM", dict(num_local_experts=4)),
    "olmoe": (OlmoeConfig, "OlmoeForCausalLM", dict(num_experts=4)),
    "qwen2_moe": (Qwen2MoeConfig, "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "qwen3_moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=32, head_dim=8)),
    "deepseek_v3": (DeepseekV3Config, "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=32,
                         n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4, num_hidden_layers=3)),  # MLA: kv heads = heads; 1 dense + 2 MoE layers
}


def tiny_config(family: str, *, vocab_size: int) -> PretrainedConfig:
    cls, arch, extra = FAMILIES[family]
    return cls(vocab_size=vocab_size, architectures=[arch], **{**_COMMON, **extra})
