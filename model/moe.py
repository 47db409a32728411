"""The shared model: a Hugging Face MoE causal LM; the embedded demo base is a Mixtral built from a config.

Checkpoints of the other supported families (model/families.py) are loaded as they are. Why Mixtral
for the demo: its sparse block is plain top-k routing over experts with no shared expert, so
every feed-forward parameter belongs to exactly one expert and "the experts a member's tokens
route to" is well defined; real Mixtral checkpoints load with `AutoModelForCausalLM` as they
are. In transformers 5 the experts are fused 3-D parameters (`mlp.experts.gate_up_proj`
(E, 2I, H), `mlp.experts.down_proj` (E, H, I)) and the router is `mlp.gate` (E, H).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from model import families


@dataclass(frozen=True)
class MoEConfig:
    """Shape of the embedded tiny base model (a real operator brings an HF checkpoint instead)."""

    vocab_size: int = 8192
    hidden_size: int = 192
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    max_seq_len: int = 512

    def to_hf(self) -> MixtralConfig:
        return MixtralConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def build_model(config: MoEConfig, *, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised MoE causal LM (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return MixtralForCausalLM(config.to_hf())


def num_experts(model: PreTrainedModel) -> int:
    return families.num_experts(model.config)


def routed_token_counts(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Tokens routed to each expert, per layer: (L, E) int64.

    `router_logits` is the model output with `output_router_logits=True`: one (tokens, E)
    tensor per layer. Top-k of the logits equals top-k of the softmax the router uses.
    """
    counts = []
    for logits in router_logits:  # (N, E)
        chosen = logits.topk(top_k, dim=-1).indices.flatten()  # (N * k,)
        counts.append(torch.bincount(chosen, minlength=logits.shape[-1]))
    return torch.stack(counts).to(torch.int64).cpu()


def balance_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    reference: torch.Tensor | None = None,  # (L, E) the consortium's routed-token fractions
    weight: float = 1.0,  # this member's part of the consortium's tokens
) -> torch.Tensor:
    """Switch-style load balancing, k * E * sum_e f_e * P_e per layer, averaged over layers.

    P_e is the mean router probability of expert e over the batch (it carries the gradient),
    f_e the fraction of top-k assignments that went to e (a constant); the factor k puts it on
    the scale of transformers' `load_balancing_loss_func` (equal to it for one layer), so the
    model's `router_aux_loss_coef` means the same in either balance. With a `reference`,
    f_e is the consortium's load, (1 - weight) * reference_e + weight * f_e: the member is pushed
    off the experts the consortium overloads, not off the ones it alone uses most, so members
    with different data can each own experts while no expert starves consortium-wide.
    """
    losses = []
    for layer, logits in enumerate(router_logits):  # (N, E)
        probs = logits.float().softmax(dim=-1)  # (N, E)
        chosen = logits.topk(top_k, dim=-1).indices.flatten()  # (N * k,)
        routed = torch.bincount(chosen, minlength=logits.shape[-1]).to(probs.dtype) / chosen.numel()  # (E,)
        if reference is not None:
            routed = (1 - weight) * reference[layer].to(probs.device, probs.dtype) + weight * routed
        losses.append(top_k * logits.shape[-1] * (routed.detach() * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    backward: bool = False,
) -> float:
    """Mean next-token cross-entropy over `blocks` (num_blocks, T), weighted by tokens; with
    `backward`, the gradient of that mean is accumulated into the parameters' .grad."""
    model.eval()
    count = blocks[:, 1:].numel()
    if count == 0:
        raise ValueError("evaluate_loss: no validation blocks")
    total = 0.0
    with torch.set_grad_enabled(backward):
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)  # (B, T)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch).logits  # (B, T, V)
            # the next token of every position but the last. fp32 logits are read in place, the last
            # position ignored (slicing it off would copy B x T x V floats); lower-precision logits
            # are copied to fp32 anyway, so without the last position
            if logits.dtype == torch.float32:
                flat = logits.reshape(-1, logits.shape[-1])
                targets = torch.nn.functional.pad(batch[:, 1:], (0, 1), value=-100).reshape(-1)
            else:
                flat, targets = logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100, reduction="sum")
            if backward:
                (loss / count).backward()
            total += float(loss.detach())
    return total / count
