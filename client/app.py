"""The fedmoe ClientApp: translate Flower messages to plain objects and delegate to client.node.

A SuperNode starts a fresh process for every message, so this module imports only what a
hello or a secure-aggregation stage needs; the training stack (client/node.py: transformers,
peft) is imported by the first TRAIN, which saves seconds on every other message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from client.free_rider import FREE_RIDER, plays_free_rider, rider_node
from client.metrics import gpu_memory, record_round
from client.node_config import Node, NodeHints
from client.secure import handle_stage, load_roster, simulated_roster
from model.chatter import silence_library_chatter
from model.corpus import DataError
from model.precision import PrecisionError
from privacy.dp import BudgetFileError, BudgetSpent
from privacy.secagg import SecAggError
from protos.messages import SECAGG_STAGES, Hello, ProtocolError, SecAggMessage, TrainInstruction, TrainReply

silence_library_chatter()  # this module is a process's entry point (SuperNode, simulation actor)

app = ClientApp()

# Error codes in replies (Flower reserves small numbers; ours are 100+).
DATA_ERROR, BASE_ERROR, CONFIG_ERROR, STALE_VIEW, SECAGG_ERROR, DP_BUDGET = 101, 102, 103, 104, 105, 106


def node_of(context: Context, hints: NodeHints) -> Node:
    """This node's member: named by a SuperNode's node config, or a simulated partition (the last
    one plays the demo's free rider when the run config asks for it: client/free_rider.py)."""
    if plays_free_rider(context.node_config, context.run_config):
        return rider_node(hints)
    return Node.from_node_config(context.node_config, hints)


def run_round(ins: TrainInstruction, node: Node) -> TrainReply:
    """A member's round (client/node.py run_round), the training stack imported on first use."""
    from client.node import run_round as play

    return play(ins, node)


def free_ride(ins: TrainInstruction, node: Node) -> TrainReply:
    from client.free_rider import free_ride as play

    return play(ins, node)


@app.train()
def train(msg: Message, context: Context) -> Message:
    rider = plays_free_rider(context.node_config, context.run_config)
    return serve_train(msg, context, free_ride if rider else run_round)


def serve_train(msg: Message, context: Context, play: Callable[[TrainInstruction, Node], TrainReply]) -> Message:
    """One TRAIN: parse, `play` the round (client/node.py run_round for a member), reply or refuse."""
    from client.node import StaleView
    from model.base import BaseModelError

    try:
        ins = TrainInstruction.from_record(msg.content)
        node = node_of(context, ins)
    except (ProtocolError, DataError, KeyError, ValueError) as exc:
        return Message(error=Error(CONFIG_ERROR, f"node {context.node_id}: {exc}"), reply_to=msg)
    try:
        reply = play(ins, node)
    except DataError as exc:
        return Message(error=Error(DATA_ERROR, f"member {node.member!r}: {exc}"), reply_to=msg)
    except BaseModelError as exc:
        return Message(error=Error(BASE_ERROR, f"member {node.member!r}: {exc}"), reply_to=msg)
    except StaleView as exc:
        return Message(error=Error(STALE_VIEW, f"member {node.member!r}: {exc}"), reply_to=msg)
    except (PrecisionError, ProtocolError, BudgetFileError) as exc:
        return Message(error=Error(CONFIG_ERROR, f"member {node.member!r}: {exc}"), reply_to=msg)
    except BudgetSpent as exc:  # declines, like any refusal: the round goes on without it
        return Message(error=Error(DP_BUDGET, f"member {node.member!r}: {exc}"), reply_to=msg)
    try:  # the daemon's metrics (client/metrics.py); never fails the round
        record_round(
            node.state_dir, member=node.member, round=ins.round, num_tokens=reply.num_tokens,
            seconds=reply.seconds, local_steps=ins.local_steps, train_loss=reply.train_loss,
            precision=reply.precision, gpu=gpu_memory(), dp_epsilon=reply.dp_epsilon,
        )
    except OSError:
        pass
    return Message(content=reply.to_record(), reply_to=msg)


@app.train("hello")
def hello(msg: Message, context: Context) -> Message:
    """Which member this node is (the operator plans secure-contribution groups by member)."""
    try:
        ask = Hello.from_record(msg.content)
        node = node_of(context, ask)
    except (ProtocolError, DataError, KeyError, ValueError, OSError) as exc:
        return Message(error=Error(CONFIG_ERROR, f"node {context.node_id}: hello: {exc}"), reply_to=msg)
    return Message(content=Hello(node.member, "", "", "").to_record(), reply_to=msg)


def roster_of(node: Node, hints: NodeHints) -> dict[str, Ed25519PublicKey]:
    """The identity keys this node accepts in a group: a SuperNode's roster file, or the embedded
    consortium's own members (and its labelled free rider)."""
    if node.roster is not None:
        if node.ca is None:
            raise ProtocolError("node config 'ca' is missing: a SuperNode checks the roster's signature with the consortium CA")
        return load_roster(node.roster, node.ca)
    members = sorted(p.name for p in Path(hints.members_dir).iterdir() if p.is_dir())
    return simulated_roster(Path(hints.nodes_dir), [*members, FREE_RIDER])


def secagg_handler(stage: str) -> Callable[[Message, Context], Message]:
    def serve(msg: Message, context: Context) -> Message:
        """One secure-aggregation stage: refusals go back as errors (the server drops the node)."""
        try:
            parsed = SecAggMessage.from_record(msg.content, stage=stage, reply=False)
            node = node_of(context, parsed)  # type: ignore[arg-type]
            reply = handle_stage(parsed, node.state_dir, node.member, roster_of(node, parsed), node.secagg_min_group)
        except (ProtocolError, SecAggError, DataError, KeyError, ValueError, OSError) as exc:
            return Message(error=Error(SECAGG_ERROR, f"node {context.node_id}: secagg {stage}: {exc}"), reply_to=msg)
        return Message(content=reply.to_record(), reply_to=msg)

    return serve


for _stage in SECAGG_STAGES:
    app.train(f"secagg_{_stage}")(secagg_handler(_stage))
