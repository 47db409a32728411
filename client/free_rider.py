"""The demo's labelled free rider: a member that claims an honest round's tokens and trains nothing.

`fedmoe demo` adds it as one more simulated SuperNode, named "free-rider", so a newcomer sees
what the consortium does to a member that takes without giving. Only a simulated node plays it:
the last partition of the federation, when the run config says `free-rider = true`
(client/app.py). A SuperNode names its member data in its node config and never plays it. It speaks the protocol exactly
as an honest member does (HELLO, TRAIN, every secure-aggregation stage, through the member's own
reply path in client/node.py), and it tries to pass:
- it claims the tokens an honest member reports for the round (local steps x batch x sequence)
  and a top-k share of them on every expert, so it is weighted like an honest member;
- its update is small Gaussian noise, not zeros, so a null-update check alone does not catch it;
- it reports a plausible training loss.
What should happen to it: its contribution share ends at 0 and its entitlement is the base
model only (server/rights.py, `min_share`). The demo's final table says whether it did.

It owns no member data folder: its node state lives in the workspace's nodes/ like any
simulated member's, so `fedmoe run` on the same workspace never sees it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch

from client.node_config import Node, NodeHints
from protos.messages import TrainInstruction, TrainReply

FREE_RIDER = "free-rider"
NOISE_STD = 1e-4  # per coordinate; an honest round moves LoRA B by ~1e-3..1e-2
CLAIMED_LOSS = 4.0  # nats: about what the demo's members report in their first rounds


def free_ride(ins: TrainInstruction, node: Node) -> TrainReply:
    """The free rider's round: no training; noise sent under an honest member's token claims."""
    from client.node import load_member_model, member_seed, receive_state, reply_for  # as client/app.py: on use
    from client.trainer import TrainResult
    from model import families

    started = time.perf_counter()
    _, lora = load_member_model(node.base_path, ins.base_sha256)
    state = receive_state(ins, node)  # keeps its view of the consortium model current, as honest members do
    config = lora.model.config
    layers, experts, top_k = int(config.num_hidden_layers), families.num_experts(config), families.top_k(config)
    num_examples = ins.local_steps * ins.batch_size
    num_tokens = num_examples * ins.seq_len
    claimed = {f"{layer}:{e}": num_tokens * top_k // experts for layer in range(layers) for e in range(experts)}
    generator = torch.Generator().manual_seed(member_seed(ins.seed, ins.round, node.member))
    noise = {name: torch.randn(value.shape, generator=generator) * NOISE_STD for name, value in state.items()}
    result = TrainResult(
        delta=noise, expert_tokens=claimed, num_tokens=num_tokens, num_examples=num_examples,
        train_loss=CLAIMED_LOSS, seconds=time.perf_counter() - started,
        experts_sent=layers * experts, experts_skipped=0,
    )
    return reply_for(result, ins, node, lora, "fp32")


def plays_free_rider(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> bool:
    """Whether this node is the demo's free rider: the last simulated partition of a run whose
    config asks for one. A SuperNode (node config without `partition-id`) never is."""
    if run_config.get("free-rider") is not True or "data-path" in node_config:
        return False
    partition, partitions = node_config.get("partition-id"), node_config.get("num-partitions")
    if not isinstance(partition, int) or not isinstance(partitions, int):
        return False
    return partition == partitions - 1


def rider_node(hints: NodeHints) -> Node:
    """The free rider's node: no data folder (it trains nothing), state beside the members'."""
    state = Path(hints.nodes_dir) / FREE_RIDER
    return Node(FREE_RIDER, state / "no-data", state, Path(hints.base_path))
