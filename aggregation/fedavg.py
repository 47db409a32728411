"""Per-expert federated averaging of members' updates, weighted by routed tokens.

Each tensor of the trainable state is averaged over the members that sent it:
- an expert's tensors (group 'l:e') weighted by the tokens each member routed to that expert;
- shared tensors (attention adapters, router) weighted by the member's tokens.
A member that barely routed to an expert does not send it, so it neither counts nor dilutes.
With FFA-LoRA (A frozen and shared) averaging B is exactly averaging the products BA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch


class AggregationError(ValueError):
    """Updates that cannot be combined (shape disagreement, negative weight)."""


@dataclass(frozen=True)
class Update:
    member: str
    delta: Mapping[str, torch.Tensor]  # a subset of the trainable state's names
    num_tokens: int
    expert_tokens: Mapping[str, int] = field(default_factory=dict)  # 'l:e' -> routed tokens


def aggregate(
    updates: Sequence[Update], group_of: Callable[[str], str | None]
) -> dict[str, torch.Tensor]:
    """Weighted mean delta per tensor (fp32); tensors nobody sent (or with zero weight) are absent.

    Members are visited in name order so the float sums, and hence the result, do not depend
    on the order replies arrived in.
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for update in sorted(updates, key=lambda u: u.member):
        for name, delta in update.delta.items():
            group = group_of(name)
            weight = update.num_tokens if group is None else update.expert_tokens.get(group, 0)
            if weight < 0:
                raise AggregationError(f"member {update.member!r}: negative weight {weight} for {name}")
            if weight == 0:
                continue
            if name in sums and sums[name].shape != delta.shape:
                raise AggregationError(
                    f"member {update.member!r}: tensor {name!r} has shape {tuple(delta.shape)}, "
                    f"expected {tuple(sums[name].shape)}"
                )
            term = delta.detach().to(torch.float64) * weight
            sums[name] = sums[name] + term if name in sums else term
            weights[name] = weights.get(name, 0.0) + weight
    return {name: (total / weights[name]).to(torch.float32) for name, total in sums.items()}
