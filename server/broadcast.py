"""The round's broadcast: TRAIN for every node of the roster, with the state each member needs.

`broadcast` (run config) says what a member that took part in the previous round gets:
- "delta": the int8 patch from its view to the state (aggregation/broadcast.py `advance`);
- "step": the previous round's aggregated update, and the member replays the server
  optimizer's step on the state and optimizer state it holds (`step_view`);
- "full": the full state every round.
A member that holds anything else (new, back from sitting a round out, restarted) gets the full
view. A "step" view after a resume is sent in full once: the last step is not committed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto

from aggregation.broadcast import advance, encode_step, step_view, view_digest
from model.io import tensors_to_bytes
from protos.messages import TRAIN, TrainInstruction
from server.sampling import Roster

if TYPE_CHECKING:
    from server.rounds import Run


def round_view(run: Run) -> tuple[str, str, bytes, bytes]:
    """(previous digest, new digest, full payload, payload for a member holding the previous view).

    The last payload is b"" when there is none: every member then gets the full view.
    """
    config = run.round
    if config.broadcast == "step":
        previous = run.step_base
        view = step_view(run.state, run.opt_state)
        digest = view_digest(view)
        if run.last_step is not None:
            small = tensors_to_bytes(encode_step(run.last_step))
        elif previous == digest:  # nothing moved since (an aborted round): an empty step
            small = tensors_to_bytes({})
        else:
            small = b""
        run.step_base, run.last_step = digest, None
        return previous, digest, tensors_to_bytes(view), small
    previous = view_digest(run.view) if run.view is not None else ""
    run.view, patch = advance(run.view if config.broadcast == "delta" else None, run.state)
    return previous, view_digest(run.view), tensors_to_bytes(run.view), tensors_to_bytes(patch) if patch is not None else b""


def broadcast(run: Run, roster: Roster, rnd: int, codec_seed: int) -> tuple[list[Message], dict[int, int]]:
    """TRAIN for every node of the roster, and the bytes each message puts on the wire."""
    config, ws = run.round, run.ws
    previous_digest, digest, full_payload, small_payload = round_view(run)
    small_kind = "step" if config.broadcast == "step" else "patch"
    load_payload = tensors_to_bytes({"load": run.expert_load}) if run.expert_load is not None else b""
    server_optimizer = json.dumps(asdict(run.optimizer), sort_keys=True) if config.broadcast == "step" else ""
    codec = str(config.codec_config())
    messages, bytes_down = [], {}
    for node in roster.nodes:
        if small_payload and previous_digest and run.held_views.get(run.node_member.get(node, "")) == previous_digest:
            kind, base_digest, payload = small_kind, previous_digest, small_payload
        else:
            kind, base_digest, payload = "full", "", full_payload
        ins = TrainInstruction(
            round=rnd, run=run.name, state=payload, state_kind=kind, base_view_sha256=base_digest, view_sha256=digest,
            base_sha256=run.base.sha256, base_path=str(ws.base),
            members_dir=str(ws.members_dir), nodes_dir=str(ws.root / "nodes"),
            local_steps=config.local_steps, batch_size=config.batch_size, seq_len=config.seq_len,
            lr=config.lr, local_opt=config.local_opt, seed=config.seed, min_expert_tokens=config.min_expert_tokens,
            codec=codec, codec_clip=config.codec_clip, update_clip=config.update_clip, codec_seed=codec_seed,
            precision=config.precision, secure=config.secagg == "on",
            balance=config.expert_balance, expert_load=load_payload, balance_weight=run.load_weight,
            server_optimizer=server_optimizer, dp_noise_variance=run.dp.variance if run.dp else 0.0,
        )
        content = ins.to_record()
        bytes_down[node] = recorddict_to_proto(content).ByteSize()  # what goes on the wire
        messages.append(Message(content=content, message_type=TRAIN, dst_node_id=node, group_id=str(rnd)))
    return messages, bytes_down
