"""Which transformers MoE families fedmoe trains, and what each parameter of one is.

Hand-written because transformers has no common description of an MoE: every family names its
expert count differently (Mixtral `num_local_experts`, OLMoE / Qwen2-MoE / Qwen3-MoE
`num_experts`, DeepSeek-V3 `n_routed_experts`; top-k is `num_experts_per_tok` in all five), and
shared experts (Qwen2-MoE `mlp.shared_expert` + `mlp.shared_expert_gate`, DeepSeek-V3
`mlp.shared_experts`) and dense MLPs (DeepSeek-V3's first `first_k_dense_replace` layers,
Qwen's `mlp_only_layers`: `mlp.{gate,up,down}_proj`) sit next to the routed experts under
`mlp.`. Every place of the project that needs the expert count, top-k or a parameter's role
asks here, and a checkpoint or a name this module cannot describe is refused, never guessed.

Roles: routed experts (`mlp.experts.*`, fused (E, ...) tensors) are aggregated per expert,
weighted by the tokens routed to each; the router (`mlp.gate`), attention, shared experts,
dense MLPs and the head are shared parameters, aggregated by the member's tokens. The roles name
base parameters and trainable-state tensors alike (`...mlp.shared_experts.up_proj.weight`, its
adapter `...mlp.shared_experts.up_proj.lora_B`; model/lora.py says which tensors are trained).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("routed_expert", "shared_expert", "dense_mlp", "attention", "router", "head")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # per family, see above
TOP_K_KEY = "num_experts_per_tok"
SUPPORTED = ("MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
             "DeepseekV3ForCausalLM")

# order matters: `mlp.shared_expert_gate` is a shared expert's gate, not the router `mlp.gate`
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.mlp\.experts\."), "routed_expert"),
    (re.compile(r"\.mlp\.shared_experts?(_gate)?\."), "shared_expert"),
    (re.compile(r"\.mlp\.gate\."), "router"),
    (re.compile(r"\.mlp\.(gate|up|down)_proj\."), "dense_mlp"),
    (re.compile(r"\.self_attn\."), "attention"),
    (re.compile(r"^lm_head\."), "head"),
)


class UnsupportedModel(ValueError):
    """A checkpoint fedmoe cannot train; the message names what is missing."""


@dataclass(frozen=True)
class Family:
    """What fedmoe reads of an MoE config."""

    architecture: str
    num_experts: int  # routed experts per MoE layer
    top_k: int


def role_of(name: str) -> str:
    """The role (one of ROLES) of a parameter or trainable-state tensor, by its canonical name."""
    for pattern, role in _RULES:
        if pattern.search(name):
            return role
    raise UnsupportedModel(f"parameter {name!r} is none of {', '.join(ROLES)}")


def _architecture(config: object) -> str:
    names = getattr(config, "architectures", None) or []
    return str(names[0]) if names else type(config).__name__


def describe(config: object) -> Family:
    """The family of a transformers config, or UnsupportedModel naming the missing piece."""
    arch = _architecture(config)
    counts = [getattr(config, key, None) for key in EXPERT_COUNT_KEYS]
    count = next((int(c) for c in counts if isinstance(c, int) and c > 0), None)
    if count is None:
        raise UnsupportedModel(f"{arch}: no routed experts (none of {', '.join(EXPERT_COUNT_KEYS)} in its config)")
    top_k = getattr(config, TOP_K_KEY, None)
    if not isinstance(top_k, int) or not 0 < top_k <= count:
        raise UnsupportedModel(f"{arch}: no top-k routing ({TOP_K_KEY} = {top_k!r}, {count} routed experts)")
    return Family(arch, count, top_k)


def num_experts(config: object) -> int:
    return describe(config).num_experts


def top_k(config: object) -> int:
    return describe(config).top_k


def check_supported(config: object, parameter_names: list[str] | None = None) -> Family:
    """`describe(config)`, plus a check that it is one of SUPPORTED and that every parameter
    name has a role; UnsupportedModel (one line) otherwise."""
    family = describe(config)
    model_type = str(getattr(config, "model_type", ""))
    known = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
    if family.architecture not in SUPPORTED and model_type not in known:
        raise UnsupportedModel(f"{family.architecture}: not a supported MoE family (one of {', '.join(SUPPORTED)})")
    for name in parameter_names or []:
        if name.startswith("model.embed_tokens.") or name.startswith("model.norm.") or "layernorm" in name \
                or name.endswith("_norm.weight"):
            continue  # frozen and never in the trainable state
        role_of(name)
    return family


_MOE_LAYER = re.compile(r"layers\.(\d+)\.mlp\.experts\.")


def moe_layers(model: object) -> list[int]:
    """Indices of the decoder layers with routed experts, in order: the layers that `router_logits`
    stands for (DeepSeek-V3's first `first_k_dense_replace` and Qwen's `mlp_only_layers` are dense)."""
    layers = {int(m.group(1)) for name, _ in model.named_parameters()  # type: ignore[attr-defined]
              if (m := _MOE_LAYER.search(name))}
    return sorted(layers)
