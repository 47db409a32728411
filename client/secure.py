"""A member's side of secure aggregation: its identity key, its masked input, the four stages.

After TRAIN the node keeps its update (pre-scaled, compressed, as ring elements) on its own disk
and answers the server's stage messages (advertise, share, mask, unmask) with
privacy/secagg_member.py's MemberSession, which it saves between messages: a stage may be served by
another process (a simulation actor, a fresh ClientApp process of a SuperNode). Everything
stays under the node's state dir, owner-only, and the round's files are deleted after unmask.

Member-side checks beyond the protocol's: a stage message must be for the run and round this
node trained; the group's directory must hold this node's own identity key; the identity keys
the server hands out are pinned the first time they are seen (`peers.json`), so a server that
swaps a member's key later is refused; a node takes part in one group per round; and a round
is unmasked for one set of survivors only, even when the server re-runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aggregation.codec_config import CodecConfig
from aggregation.secure import TOKENS, SecureLayout
from protos.messages import ProtocolError, SecAggMessage, TrainInstruction
from model.io import load_tensors, save_tensors
from model.lora import LoraMoE, expert_of
from privacy.secagg import ProtocolViolation, SecAggParams
from privacy.secagg_member import MemberSession
from privacy.secagg_wire import KeyAdvert

IDENTITY = "identity-ed25519.pem"
_REVEALS_KEPT = 256  # updates whose unmask survivors a member remembers (a re-run is of a recent round)


def identity_key(state_dir: Path) -> Ed25519PrivateKey:
    """The member's long-term Ed25519 key, created owner-only on first use."""
    path = state_dir / IDENTITY
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(path, pem)
    return key


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def layout_for(lora: LoraMoE, ins: TrainInstruction) -> SecureLayout:
    shapes = lora.shapes()
    return SecureLayout(
        shapes=shapes,
        groups={name: expert_of(name) or TOKENS for name in shapes},
        codec=CodecConfig.parse(ins.codec, clip=ins.codec_clip or None),
        codec_seed=ins.codec_seed,
        budget=ins.local_steps * ins.batch_size * ins.seq_len,
    )


_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def round_dir(state_dir: Path, run: str, rnd: int) -> Path:
    """The round's folder; a run name that could leave the state dir is refused."""
    if not _RUN_NAME.fullmatch(run) or rnd < 0:
        raise ProtocolViolation(f"run name {run!r} / round {rnd} cannot name a folder in the state dir")
    return state_dir / "secagg" / run / f"round-{rnd:05d}"


def keep_input(state_dir: Path, run: str, rnd: int, vector: torch.Tensor, trained_from: str = "") -> None:
    """Keep this round's ring input until the mask stage. Everything older goes, including an
    earlier attempt at this same round (a round the server re-runs is trained and keyed anew).

    `trained_from` names what determined the update apart from the member's data (the view of
    the global state, the round, the seed): the key under which the member remembers which
    survivors it helped unmask (see _remember_reveal). Empty: the run and round name it.
    """
    folder = round_dir(state_dir, run, rnd)
    if folder.parent.is_dir():
        for old in folder.parent.iterdir():
            shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    save_tensors(folder / "input.safetensors", {"x": vector})
    (folder / "trained-from").write_text(trained_from or f"run {run} round {rnd}")


def handle_stage(msg: SecAggMessage, state_dir: Path, member: str) -> SecAggMessage:
    """Answer one stage message; ProtocolViolation / ProtocolError for anything refused."""
    started = time.perf_counter()
    folder = round_dir(state_dir, msg.run, msg.round)
    if not (folder / "input.safetensors").is_file():
        raise ProtocolViolation(
            f"member {member!r}: secure-aggregation {msg.stage} for run {msg.run!r} round {msg.round}, "
            "which this node did not train"
        )
    key = identity_key(state_dir)
    session_file = folder / f"session-{msg.group}.json"
    if msg.stage == "advertise":
        if any(folder.glob("session-*.json")) or (folder / "advertised").exists():
            # one group per round: the same input in two groups would let sums be differenced
            raise ProtocolViolation(f"member {member!r}: round {msg.round} already advertised")
        (folder / "advertised").touch()
        group, identities = msg.strings("group"), msg.blobs("identities")
        if len(group) != len(identities):
            raise ProtocolError("fields 'group' and 'identities' do not pair up")
        offered = dict(zip(group, identities, strict=True))
        if offered.get(member) != public_bytes(key):
            raise ProtocolViolation(f"member {member!r}: the group's directory does not hold this node's identity key")
        directory = _pinned_directory(state_dir, offered)
        params = SecAggParams(
            round=msg.round, members=tuple(group), threshold=int(msg.fields["threshold"]),  # type: ignore[call-overload]
            neighbours=int(msg.fields["neighbours"]), ring_bits=int(msg.fields["ring-bits"]),  # type: ignore[call-overload]
            vector_length=int(msg.fields["vector-length"]), graph_seed=msg.fields["graph-seed"],  # type: ignore[call-overload, arg-type]
        )
        session = MemberSession(params, member, key, directory)
        advert = session.advertise()
        out: dict[str, object] = {"c-pub": advert.c_pub, "s-pub": advert.s_pub, "b-commitment": advert.b_commitment, "signature": advert.signature}
    else:
        if not session_file.is_file():
            raise ProtocolViolation(f"member {member!r}: {msg.stage} before advertise in round {msg.round}")
        session = MemberSession.from_json(session_file.read_bytes(), key, _pinned_directory(state_dir, {}))
        if msg.stage == "share":
            senders = msg.strings("senders")
            columns = [msg.blobs(f) for f in ("c-pubs", "s-pubs", "b-commitments", "signatures")]
            if any(len(c) != len(senders) for c in columns) or len(set(senders)) != len(senders):
                raise ProtocolError("share: advert fields do not pair up")
            adverts = {s: KeyAdvert(s, msg.round, *parts) for s, *parts in zip(senders, *columns, strict=True)}
            ciphertexts = session.share_keys(adverts)
            out = {"receivers": sorted(ciphertexts), "ciphertexts": [ciphertexts[r] for r in sorted(ciphertexts)]}
        elif msg.stage == "mask":
            x = load_tensors(folder / "input.safetensors")["x"]
            masked = session.masked_input(x, msg.pairs("senders", "ciphertexts"))
            out = {"packed": masked.packed}
        else:
            survivors = msg.strings("survivors")
            trained_from = (folder / "trained-from").read_text()
            _check_reveal(state_dir, member, trained_from, survivors)
            reply = session.unmask(survivors, msg.strings("dropped"))
            _remember_reveal(state_dir, trained_from, survivors)
            out = {
                "b-owners": sorted(reply.b_shares), "b-shares": [reply.b_shares[o] for o in sorted(reply.b_shares)],
                "s-owners": sorted(reply.s_shares), "s-shares": [reply.s_shares[o] for o in sorted(reply.s_shares)],
            }
    if session.stage == "done":
        session_file.unlink(missing_ok=True)
        if not any(folder.glob("session-*.json")):
            shutil.rmtree(folder, ignore_errors=True)  # the round is over for this node
    else:
        _write_private(session_file, session.to_json())
    out["seconds"] = time.perf_counter() - started
    return SecAggMessage(
        stage=msg.stage, run=msg.run, round=msg.round, group=msg.group, member=member,
        base_path="", members_dir="", nodes_dir="", fields=out,
    )


def _check_reveal(state_dir: Path, member: str, trained_from: str, survivors: list[str]) -> None:
    """Help unmask an update for one set of survivors only, however often its round is re-run.

    A round that is re-run (the server crashed or aborted it after unmasking) trains the same
    update again from the same view, round and seed; a second sum over other survivors could
    be differenced against the first to expose one member's update. So the survivors of the
    first unmask this node answered for an update are kept under `trained_from`, and a later
    request that names other survivors is refused. Kept in secagg/revealed.json (the last
    _REVEALS_KEPT updates). A member that is gone for good leaves its round stuck until each
    remaining member agrees to drop the entry (by deleting that file).
    """
    earlier = _reveals(state_dir).get(trained_from)
    if earlier is not None and earlier != sorted(survivors):
        raise ProtocolViolation(
            f"member {member!r}: this update ({trained_from}) was already unmasked for survivors "
            f"{earlier}; refusing to unmask it again for {sorted(survivors)}"
        )


def _remember_reveal(state_dir: Path, trained_from: str, survivors: list[str]) -> None:
    seen = _reveals(state_dir)
    seen.pop(trained_from, None)
    seen[trained_from] = sorted(survivors)  # newest last
    kept = dict(list(seen.items())[-_REVEALS_KEPT:])
    _write_private(state_dir / "secagg" / "revealed.json", json.dumps(kept).encode())


def _reveals(state_dir: Path) -> dict[str, list[str]]:
    path = state_dir / "secagg" / "revealed.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _pinned_directory(state_dir: Path, offered: dict[str, bytes]) -> dict[str, Ed25519PublicKey]:
    """Identity keys seen so far, with `offered` pinned on first sight; a changed key is refused."""
    path = state_dir / "secagg" / "peers.json"
    pinned: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    changed = False
    for member, raw in sorted(offered.items()):
        if len(raw) != 32:
            raise ProtocolViolation(f"identity key of {member!r} is {len(raw)} bytes, expected 32")
        if member in pinned and pinned[member] != raw.hex():
            raise ProtocolViolation(f"identity key of {member!r} differs from the one pinned in {path}")
        if member not in pinned:
            pinned[member], changed = raw.hex(), True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, json.dumps(pinned, sort_keys=True, indent=1).encode())
    return {m: Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)) for m, h in pinned.items()}


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only file, written whole (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
