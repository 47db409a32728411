"""The round's expert-load stage: what the consortium routed to each expert, sent with the next TRAIN.

Members balance their routers against the consortium's load rather than their own batch
(model/moe.py, balance_loss), so that members with different data can own experts while no
expert starves consortium-wide. The load is an aggregate: in open rounds the sum of the
members' reported counts, under secure aggregation the sum of the experts' weights in the
group sums (the operator never sees one member's counts). How members share experts (the top
member's share per expert, each member's routing entropy) is known only in open rounds.
"""

from __future__ import annotations

import torch

from aggregation.specialization import consortium_load, routing_entropy, top_member_share
from model import families
from model.lora import LoraMoE, expert_of
from server.secure import Sums
from server.validate import Received


def observe_expert_load(
    lora: LoraMoE, secure: bool, received: Received, group_sums: dict[frozenset[str], Sums]
) -> tuple[torch.Tensor | None, float, dict[str, object]]:
    """(consortium load (L, E) or None when nothing was routed, a member's part of it, specialization)."""
    config = lora.model.config
    layers, experts = int(config.num_hidden_layers), families.num_experts(config)
    counts: dict[str, float] = {}
    if secure:
        for _, weights in group_sums.values():  # every tensor of an expert carries its routed tokens
            per_expert = {g: w for name, w in weights.items() if (g := expert_of(name)) is not None}
            for group, w in per_expert.items():
                counts[group] = counts.get(group, 0.0) + w
    else:
        for update in received.updates:
            for group, n in update.expert_tokens.items():
                counts[group] = counts.get(group, 0.0) + n
    load = consortium_load(counts, layers, experts) if counts else None
    weight = 1.0 / max(len(received.reports), 1)
    if secure:
        return load, weight, {"expert_top_member_share": None, "routing_entropy": {}}
    by_member = {u.member: u.expert_tokens for u in received.updates}
    return load, weight, {
        "expert_top_member_share": top_member_share(by_member, layers, experts),
        "routing_entropy": {m: routing_entropy(c, layers, experts) for m, c in sorted(by_member.items())},
    }

