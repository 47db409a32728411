"""An in-process Flower Grid: the real ClientApp answers each message at once, no Ray, no gRPC.

Only for tests of the round loop's message exchanges: `drop(node, message_type)` makes a node
silent for a message (a member that crashed or went offline at that stage), and `seen` records
every delivered message so a test can look at what the members held at each stage. A member
answers when the message is pushed, so a stage's replies wait in the grid until pulled; with
`answer_on_pull` it answers when its reply is pulled instead, so no more than a pull's worth of
replies exists at once (bench/faults.py: the server's memory, with replies waiting elsewhere as
they wait at a SuperLink in a deployment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from protos.messages import TRAIN, TrainInstruction


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the current task's run; set one for the test's process."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class FakeGrid:
    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        *,
        drop: Callable[[int, str], bool] = lambda node, message_type: False,
        before: Callable[[int, Message], None] = lambda node, message: None,
        answer_on_pull: bool = False,
    ) -> None:
        self.app = app
        self.nodes = {1000 + i: i for i in range(num_nodes)}  # node id -> partition id
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": p}, state=RecordDict(), run_config={})
            for node, p in self.nodes.items()
        }
        self.drop = drop
        self.before = before
        self.answer_on_pull = answer_on_pull
        self._pending: dict[str, Message] = {}  # message id -> its reply (or the message, answer_on_pull)
        self._count = 0
        self.seen: list[tuple[int, str]] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self._count += 1
            message.metadata.__dict__["_message_id"] = f"m{self._count}"  # the SuperLink's job
            node = message.metadata.dst_node_id
            self.seen.append((node, message.metadata.message_type))
            if not self.drop(node, message.metadata.message_type):
                self.before(node, message)
                self._pending[message.metadata.message_id] = message if self.answer_on_pull else self._answer(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        pulled = [self._pending.pop(i) for i in list(message_ids) if i in self._pending]
        return [self._answer(m) for m in pulled] if self.answer_on_pull else pulled

    def _answer(self, message: Message) -> Message:
        return self.app(message, self.contexts[message.metadata.dst_node_id])


class SentTrain:
    """The TRAIN instructions the members received, by round."""

    def __init__(self) -> None:
        self.by_round: dict[int, list[TrainInstruction]] = {}

    def __call__(self, node: int, message) -> None:  # noqa: ANN001
        if message.metadata.message_type == TRAIN:
            ins = TrainInstruction.from_record(message.content)
            self.by_round.setdefault(ins.round, []).append(ins)


def simulated_member(ins: TrainInstruction, node):  # noqa: ANN001, ANN201  (client.node.Node -> TrainReply)
    """A member that does not train (for tests and bench/faults.py at scale): a random update of an
    honest size under honest token counts, through the real reply path."""
    import torch

    from client.node import load_member_model, member_seed, receive_state, reply_for
    from client.trainer import TrainResult
    from model import families

    _, lora = load_member_model(node.base_path, ins.base_sha256)
    state = receive_state(ins, node)
    experts, top_k = families.num_experts(lora.model.config), families.top_k(lora.model.config)
    tokens = ins.local_steps * ins.batch_size * ins.seq_len
    g = torch.Generator().manual_seed(member_seed(ins.seed, ins.round, node.member))
    delta = {n: torch.randn(v.shape, generator=g) * 1e-3 for n, v in state.items()}
    claimed = {f"{layer}:{e}": tokens * top_k // experts for layer in families.moe_layers(lora.model) for e in range(experts)}
    result = TrainResult(delta, claimed, tokens, ins.local_steps * ins.batch_size, 4.0, 0.01, len(claimed), 0)
    return reply_for(result, ins, node, lora, "fp32")
