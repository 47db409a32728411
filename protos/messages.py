"""The round's messages: the operator's TRAIN instruction, the member's reply, the four
secure-aggregation stage messages (`SecAggMessage`) that follow TRAIN when secagg is on, and
HELLO (which member a node is: secure contribution plans its groups by member before TRAIN).

Typed dataclasses with their Flower `RecordDict` form. Tensors cross the wire as safetensors
bytes inside a ConfigRecord (never pickle); the codec issue replaces the payload encoding.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from flwr.app import ConfigRecord, MetricRecord, RecordDict

TRAIN = "train"
PROTOCOL_VERSION = 10  # 2: TRAIN carries `secure`, replies the member's identity key; SecAgg stages; HELLO
# 3: TRAIN carries the expert balance (`balance`, the consortium's `expert_load`, `balance_weight`)
# 4: TRAIN carries the members' local optimizer (`local_opt`)
# 5: TRAIN `state_kind` "step" (the member replays the server optimizer's step, `server_optimizer`)
# 6: SecAgg's survivor-list check stage; sessions bound to run and group; no identities on the wire
# 7: TRAIN carries the member-side L2 bound of the update (`update_clip`)
# 8: TRAIN's `server_optimizer` carries the server lr's multiplier per parameter kind
# 9: TRAIN carries the member-level DP noise variance every unmasked sum carries (`dp_noise_variance`)
# 10: a reply carries the member's record-level DP spent so far (`dp-epsilon`, `dp-delta`) when its DP is on


MAX_NOISE_VARIANCE = 1e24  # 9 standard deviations of it fit a 62-bit ring with room to spare
LOCAL_OPTIMIZERS = ("adamw", "sgd")  # TRAIN `local_opt`: the members' optimizer for their local steps


# A member's name: a folder, a ledger key, a certificate name (privacy/certs.py has the same rule)
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a run: a folder name on both sides, never a path


class ProtocolError(ValueError):
    """A message lacks a field or carries one of the wrong type."""


def member_name(value: object, *, empty: bool = False) -> str:
    """`value` if it is a member name (or, with `empty`, the empty string), else ProtocolError."""
    name = _typed("member", value, str)
    if not (empty and name == "") and not MEMBER_NAME.fullmatch(name):
        raise ProtocolError(f"member {name[:80]!r} is not a member name (1-64 letters, digits, '.', '_', '-')")
    return name


@dataclass(frozen=True)
class TrainInstruction:
    round: int
    run: str  # the operator's run name: node-local state (error feedback) is kept per run
    state: bytes  # safetensors: the member's new view (full), a patch of its last view, or a step
    state_kind: str  # "full" | "patch" | "step" (aggregation/broadcast.py)
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
    local_opt: str  # "adamw" | "sgd": the members' optimizer for their local steps
    seed: int
    min_expert_tokens: int
    codec: str  # aggregation/codec.py spec
    codec_clip: float  # 0: none
    update_clip: float  # the member scales its update down to this L2 norm before encoding it; 0: none
    codec_seed: int  # the round's shared seed (randk coordinates)
    precision: str
    secure: bool  # secure aggregation: keep the update on the node for the SecAgg stages
    balance: str  # "consortium": balance expert load against `expert_load`; "member": own batch only
    expert_load: bytes  # safetensors {"load": (L, E)}: the consortium's routed-token fractions; b"": none yet
    balance_weight: float  # the member's part of the consortium's tokens, in (0, 1]
    server_optimizer: str  # "step" broadcast: JSON of the server optimizer the member replays
    dp_noise_variance: float = 0.0  # secure: Skellam noise every unmasked sum carries, ring units (0: none)

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
        ins = cls(state=_typed("state", state, bytes), **_typed_fields(cls, config, skip={"state"}))
        for name in ("lr", "codec_clip", "update_clip", "dp_noise_variance"):
            value = getattr(ins, name)
            if not (math.isfinite(value) and value >= 0):
                raise ProtocolError(f"TRAIN {name} {value!r} is not a finite number >= 0")
        if ins.dp_noise_variance > MAX_NOISE_VARIANCE:
            raise ProtocolError(f"TRAIN dp_noise_variance {ins.dp_noise_variance:g} is above {MAX_NOISE_VARIANCE:g} (no ring holds it)")
        if not RUN_NAME.fullmatch(ins.run):  # members keep state under the run's name
            raise ProtocolError(f"TRAIN run {ins.run[:80]!r} is not a run name (1-64 letters, digits, '.', '_', '-')")
        return ins


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
    identity: bytes = b""  # the member's long-term Ed25519 public key (secure aggregation)
    dp_epsilon: float | None = None  # record-level DP (privacy/dp.py): ε spent on this node's data so far; None: DP off
    dp_delta: float | None = None  # the δ that ε is stated at

    def to_record(self) -> RecordDict:
        dp = {} if self.dp_epsilon is None else {"dp-epsilon": self.dp_epsilon, "dp-delta": self.dp_delta}
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
                        "identity": self.identity,
                    }
                ),
                "metrics": MetricRecord(
                    {
                        "num-tokens": self.num_tokens,
                        "num-examples": self.num_examples,
                        "train-loss": self.train_loss,
                        "seconds": self.seconds,
                        **dp,  # type: ignore[dict-item]
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
            dp = "dp-epsilon" in metrics or "dp-delta" in metrics
            return cls(
                member=member_name(info["member"]),
                round=_typed("round", info["round"], int),
                precision=_typed("precision", info["precision"], str),
                view_sha256=_typed("view-sha256", info["view-sha256"], str),
                identity=_typed("identity", info["identity"], bytes),
                update=_typed("update", update, bytes),
                expert_tokens={k: _typed(f"expert-tokens[{k}]", v, int) for k, v in experts.items()},
                num_tokens=_typed("num-tokens", metrics["num-tokens"], int),
                num_examples=_typed("num-examples", metrics["num-examples"], int),
                train_loss=float(_typed("train-loss", metrics["train-loss"], (int, float))),
                seconds=float(_typed("seconds", metrics["seconds"], (int, float))),
                # both or neither; server/validate.py checks the values (finite, >= 0; δ in (0, 1))
                dp_epsilon=float(_typed("dp-epsilon", metrics["dp-epsilon"], (int, float))) if dp else None,
                dp_delta=float(_typed("dp-delta", metrics["dp-delta"], (int, float))) if dp else None,
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
        kind = {"int": int, "float": (int, float), "str": str, "bytes": bytes, "bool": bool}[str(f.type)]
        out[f.name] = _typed(f.name, values[f.name], kind)
    return out


# ---------------------------------------------------------------- who is there

HELLO = f"{TRAIN}.hello"  # the operator asks a node which member it is (secure contribution plans groups by member)


@dataclass(frozen=True)
class Hello:
    """Server -> node: the node hints only; node -> server: `member` filled in."""

    member: str
    base_path: str
    members_dir: str
    nodes_dir: str

    def to_record(self) -> RecordDict:
        return RecordDict({"hello": ConfigRecord({"version": PROTOCOL_VERSION, **asdict(self)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> Hello:
        try:
            values = dict(content.config_records["hello"])
        except KeyError:
            raise ProtocolError("hello message lacks 'hello'") from None
        if values.pop("version", None) != PROTOCOL_VERSION:
            raise ProtocolError(f"hello message has protocol version other than {PROTOCOL_VERSION}")
        hello = cls(**_typed_fields(cls, values, skip=set()))
        member_name(hello.member, empty=True)  # empty: the operator's question
        return hello


# ---------------------------------------------------------------- secure aggregation stages

SECAGG_STAGES = ("advertise", "share", "mask", "check", "unmask")
# what each stage carries each way (privacy/secagg.py has the protocol); a reply's "seconds" is
# the member's time on the stage (crypto and its session file), for the operator's metrics
SECAGG_FIELDS: dict[str, tuple[dict[str, type | tuple[type, ...]], dict[str, type | tuple[type, ...]]]] = {
    "advertise": (
        {"group": list, "threshold": int, "neighbours": int, "ring-bits": int,
         "vector-length": int, "graph-seed": bytes},
        {"c-pub": bytes, "s-pub": bytes, "b-commitment": bytes, "signature": bytes, "seconds": float},
    ),
    "share": (
        {"senders": list, "c-pubs": list, "s-pubs": list, "b-commitments": list, "signatures": list},
        {"receivers": list, "ciphertexts": list, "seconds": float},
    ),
    "mask": ({"senders": list, "ciphertexts": list}, {"packed": bytes, "seconds": float}),
    "check": ({"survivors": list}, {"signature": bytes, "seconds": float}),
    "unmask": (
        {"signers": list, "signatures": list},
        {"b-owners": list, "b-shares": list, "s-owners": list, "s-shares": list, "seconds": float},
    ),
}


def secagg_session(run: str, group: int) -> str:
    """What a secure-aggregation session is bound to besides its round (privacy/secagg.py)."""
    return f"{run}/group-{group}"


def secagg_message_type(stage: str) -> str:
    return f"{TRAIN}.secagg_{stage}"


@dataclass(frozen=True)
class SecAggMessage:
    """One secure-aggregation stage, either way: server -> member (`member` empty) or back.

    `fields` holds the stage's values (SECAGG_FIELDS); lists hold only str or only bytes. The
    node hints (base/members/nodes paths) let a simulated node find its state dir, as in TRAIN.
    """

    stage: str
    run: str
    round: int
    group: int  # which secure-aggregation group of the round (contribution groups)
    member: str
    base_path: str
    members_dir: str
    nodes_dir: str
    fields: dict[str, object]

    def __post_init__(self) -> None:
        if self.stage not in SECAGG_STAGES:
            raise ProtocolError(f"unknown secure-aggregation stage {self.stage!r}")

    @property
    def reply(self) -> bool:
        return bool(self.member)

    def to_record(self) -> RecordDict:
        head = {k: getattr(self, k) for k in ("stage", "run", "round", "group", "member", "base_path", "members_dir", "nodes_dir")}
        return RecordDict({
            "secagg": ConfigRecord({"version": PROTOCOL_VERSION, **head}),
            "fields": ConfigRecord(dict(self.fields)),  # type: ignore[arg-type]
        })

    @classmethod
    def from_record(cls, content: RecordDict, *, stage: str, reply: bool) -> SecAggMessage:
        """Parse and check a stage message; `stage` and `reply` are what the receiver expects."""
        try:
            head = dict(content.config_records["secagg"])
            values = dict(content.config_records["fields"])
        except KeyError as exc:
            raise ProtocolError(f"secure-aggregation message lacks {exc.args[0]!r}") from None
        if head.pop("version", None) != PROTOCOL_VERSION:
            raise ProtocolError(f"secure-aggregation message has protocol version other than {PROTOCOL_VERSION}")
        if head.get("stage") != stage:
            raise ProtocolError(f"secure-aggregation message for stage {head.get('stage')!r}, expected {stage!r}")
        expected = SECAGG_FIELDS[stage][1 if reply else 0]
        if set(values) != set(expected):
            raise ProtocolError(f"secagg {stage} message has fields {sorted(values)}, expected {sorted(expected)}")
        for name, kind in expected.items():
            _typed(name, values[name], kind)
            if kind is list and len({type(v) for v in values[name]}) > 1:  # type: ignore[attr-defined]
                raise ProtocolError(f"field {name!r} mixes types")
        message = cls(
            stage=stage,
            run=_typed("run", head.get("run"), str),  # type: ignore[arg-type]
            round=_typed("round", head.get("round"), int),  # type: ignore[arg-type]
            group=_typed("group", head.get("group"), int),  # type: ignore[arg-type]
            member=member_name(head.get("member"), empty=True),
            base_path=_typed("base_path", head.get("base_path"), str),  # type: ignore[arg-type]
            members_dir=_typed("members_dir", head.get("members_dir"), str),  # type: ignore[arg-type]
            nodes_dir=_typed("nodes_dir", head.get("nodes_dir"), str),  # type: ignore[arg-type]
            fields=values,
        )
        if message.reply != reply:
            raise ProtocolError(f"secagg {stage} message {'lacks' if reply else 'has'} a member")
        return message

    def strings(self, name: str) -> list[str]:
        values = self.fields[name]
        if not all(isinstance(v, str) for v in values):  # type: ignore[attr-defined]
            raise ProtocolError(f"field {name!r} must hold strings")
        return list(values)  # type: ignore[call-overload]

    def blobs(self, name: str) -> list[bytes]:
        values = self.fields[name]
        if not all(isinstance(v, bytes) for v in values):  # type: ignore[attr-defined]
            raise ProtocolError(f"field {name!r} must hold bytes")
        return list(values)  # type: ignore[call-overload]

    def pairs(self, keys: str, values: str) -> dict[str, bytes]:
        """Two parallel lists (names, blobs) as a mapping; refuses unequal lengths or repeats."""
        names, blobs = self.strings(keys), self.blobs(values)
        if len(names) != len(blobs) or len(set(names)) != len(names):
            raise ProtocolError(f"fields {keys!r} and {values!r} do not pair up")
        return dict(zip(names, blobs, strict=True))
