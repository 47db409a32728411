"""The round's messages: the operator's TRAIN instruction and the member's reply.

Typed dataclasses with their Flower `RecordDict` form. Tensors cross the wire as safetensors
bytes inside a ConfigRecord (never pickle); the codec issue replaces the payload encoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from flwr.app import ConfigRecord, MetricRecord, RecordDict

TRAIN = "train"
PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message lacks a field or carries one of the wrong type."""


@dataclass(frozen=True)
class TrainInstruction:
    round: int
    run: str  # the operator's run name: node-local state (error feedback) is kept per run
    state: bytes  # safetensors: the member's new view (full) or a patch of its last view
    state_kind: str  # "full" | "patch" (aggregation/broadcast.py)
    base_view_sha256: str  # patch only: digest of the view the patch applies to
    view_sha256: str  # digest of the view after applying: the member checks it
    base_sha256: str
    base_path: str  # where the simulated members find the base; a SuperNode's node config overrides
    members_dir: str  # simulation only: <workspace>/corpora/members
    nodes_dir: str  # simulation only: <workspace>/nodes
    local_steps: int
    batch_size: int
    seq_len: int
    lr: float
    seed: int
    min_expert_tokens: int
    codec: str  # aggregation/codec.py spec
    codec_clip: float  # 0: none
    codec_seed: int  # the round's shared seed (randk coordinates)
    precision: str

    def to_record(self) -> RecordDict:
        config = {k: v for k, v in asdict(self).items() if k != "state"}
        return RecordDict(
            {
                "state": ConfigRecord({"payload": self.state}),
                "config": ConfigRecord({"version": PROTOCOL_VERSION, **config}),
            }
        )

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainInstruction:
        try:
            config = dict(content.config_records["config"])
            state = content.config_records["state"]["payload"]
        except KeyError as exc:
            raise ProtocolError(f"TRAIN message lacks {exc.args[0]!r}") from None
        if config.pop("version", None) != PROTOCOL_VERSION:
            raise ProtocolError(f"TRAIN message has protocol version other than {PROTOCOL_VERSION}")
        return cls(state=_typed("state", state, bytes), **_typed_fields(cls, config, skip={"state"}))


@dataclass(frozen=True)
class TrainReply:
    member: str
    round: int
    update: bytes  # the delta (a subset of the trainable state), in the round's codec
    view_sha256: str  # the view the member holds now (the server sends patches against it)
    expert_tokens: dict[str, int]  # 'l:e' -> tokens routed to that expert
    num_tokens: int
    num_examples: int
    train_loss: float
    seconds: float
    precision: str

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                "update": ConfigRecord({"payload": self.update}),
                "info": ConfigRecord(
                    {
                        "version": PROTOCOL_VERSION,
                        "member": self.member,
                        "round": self.round,
                        "precision": self.precision,
                        "view-sha256": self.view_sha256,
                    }
                ),
                "metrics": MetricRecord(
                    {
                        "num-tokens": self.num_tokens,
                        "num-examples": self.num_examples,
                        "train-loss": self.train_loss,
                        "seconds": self.seconds,
                    }
                ),
                "expert-tokens": MetricRecord(dict(self.expert_tokens)),
            }
        )

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainReply:
        try:
            info = content.config_records["info"]
            metrics = content.metric_records["metrics"]
            experts = content.metric_records["expert-tokens"]
            update = content.config_records["update"]["payload"]
            if info["version"] != PROTOCOL_VERSION:
                raise ProtocolError(f"reply has protocol version {info['version']!r}")
            return cls(
                member=_typed("member", info["member"], str),
                round=_typed("round", info["round"], int),
                precision=_typed("precision", info["precision"], str),
                view_sha256=_typed("view-sha256", info["view-sha256"], str),
                update=_typed("update", update, bytes),
                expert_tokens={k: _typed(f"expert-tokens[{k}]", v, int) for k, v in experts.items()},
                num_tokens=_typed("num-tokens", metrics["num-tokens"], int),
                num_examples=_typed("num-examples", metrics["num-examples"], int),
                train_loss=float(_typed("train-loss", metrics["train-loss"], (int, float))),
                seconds=float(_typed("seconds", metrics["seconds"], (int, float))),
            )
        except KeyError as exc:
            raise ProtocolError(f"reply lacks {exc.args[0]!r}") from None


def _typed(name: str, value: object, kind: type | tuple[type, ...]) -> object:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


def _typed_fields(cls: type, values: dict[str, object], *, skip: set[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.name not in values:
            raise ProtocolError(f"message lacks field {f.name!r}")
        kind = {"int": int, "float": (int, float), "str": str, "bytes": bytes}[str(f.type)]
        out[f.name] = _typed(f.name, values[f.name], kind)
    return out
