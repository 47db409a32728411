"""A member's side of secure aggregation: its identity key, its masked input, the five stages.

After TRAIN the node keeps its update (pre-scaled, compressed, as ring elements) on its own disk
and answers the server's stage messages (advertise, share, mask, unmask) with
privacy/secagg_member.py's MemberSession, which it saves between messages: a stage may be served by
another process (a simulation actor, a fresh ClientApp process of a SuperNode). Everything
stays under the node's state dir, owner-only, and the round's files are deleted after unmask.

Member-side checks beyond the protocol's: a stage message must be for the run and round this
node trained; every member of a group must be in the consortium's roster (identity keys from
the registration, `roster.json`, never what the server forwards), this node's own key among
them, so a server-invented group of one victim and fake members is refused; a node takes part
in one group per round; it signs no survivor list shorter than its own minimum group size; and
a round is unmasked for one set of survivors only, even when the server re-runs it.

The roster of a SuperNode is the file `fedmoe certs` hands each member (node config `roster`,
default <state-dir>/roster.json); without one the node refuses secure aggregation. The
embedded simulation's consortium is this machine's: its roster is the identity keys of the
workspace's own simulated members, read from their key files (each created on first need).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aggregation.codec_config import CodecConfig
from aggregation.secure import TOKENS, SecureLayout
from protos.messages import ProtocolError, SecAggMessage, RUN_NAME, TrainInstruction, member_name, secagg_session
from model.io import atomic_write_bytes, load_tensors, save_tensors
from privacy.certs import CertError, load_cert
from privacy.distributed_dp import skellam_share
from privacy.roster import IDENTITY, verify_roster
from privacy.roster import identity_key as roster_identity
from privacy.secagg import ProtocolViolation, SecAggError, SecAggParams
from privacy.secagg_member import MemberSession
from privacy.secagg_wire import KeyAdvert

if TYPE_CHECKING:  # peft: a ClientApp process answering a stage never imports it (client/node_config.py)
    from model.lora import LoraMoE

_SESSION_ROUNDS_KEPT = 256  # rounds per run whose sessions a member remembers (client/secure.py _claim_session)
_REVEALS_KEPT = 256  # updates whose unmask survivors a member remembers (a re-run is of a recent round)


def identity_key(state_dir: Path) -> Ed25519PrivateKey:
    """The member's long-term Ed25519 key (state_dir/identity-ed25519.pem), created on first use."""
    try:
        return roster_identity(state_dir / IDENTITY)
    except CertError as exc:
        raise ValueError(str(exc)) from None


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def layout_for(lora: LoraMoE, ins: TrainInstruction) -> SecureLayout:
    from model.lora import expert_of

    shapes = lora.shapes()
    return SecureLayout(
        shapes=shapes,
        groups={name: expert_of(name) or TOKENS for name in shapes},
        codec=CodecConfig.parse(ins.codec, clip=ins.codec_clip or None),
        codec_seed=ins.codec_seed,
        budget=ins.local_steps * ins.batch_size * ins.seq_len,
    )


def round_dir(state_dir: Path, run: str, rnd: int) -> Path:
    """The round's folder; a run name that could leave the state dir is refused."""
    if not RUN_NAME.fullmatch(run) or rnd < 0:
        raise ProtocolViolation(f"run name {run!r} / round {rnd} cannot name a folder in the state dir")
    return state_dir / "secagg" / run / f"round-{rnd:05d}"


@dataclass(frozen=True)
class Noise:
    """Member-level DP (privacy/distributed_dp.py): the variance every unmasked sum carries and
    the leading elements of the ring input it goes on (the update; the counts follow)."""

    variance: float = 0.0
    elements: int = 0
    seed: int | None = None  # None: a fresh draw from the OS on every share

    def share(self, vector: torch.Tensor, threshold: int, ring_bits: int) -> torch.Tensor:
        """`vector` with this member's share (variance / threshold: any sum the operator can unmask
        has at least `threshold` inputs), drawn from the OS's randomness (or `seed`, itself drawn
        from it: keep_input), never from a seed the operator knows (the trainer's is), and reduced
        into the ring."""
        if self.variance <= 0:
            return vector
        if not 0 < self.elements <= vector.shape[0] or threshold < 1:
            raise ProtocolViolation(f"DP noise on {self.elements} of {vector.shape[0]} elements, threshold {threshold}")
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        secret = torch.Generator().manual_seed(seed)
        noisy = vector.clone()
        noisy[: self.elements] += skellam_share(self.variance / threshold, self.elements, secret)
        return noisy % (1 << ring_bits)


def _noise(path: Path) -> Noise:
    """The DP noise setting kept with the input (written before it: never missing beside one)."""
    try:
        fields = json.loads(path.read_text())
        seed = fields.get("seed")
        return Noise(float(fields["variance"]), int(fields["elements"]), None if seed is None else int(seed))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolViolation(f"{path}: unreadable ({exc}); this round's input cannot be masked") from None


def keep_input(state_dir: Path, run: str, rnd: int, vector: torch.Tensor, trained_from: str = "",
               noise: Noise = Noise()) -> None:
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
    # trained-from first: a node killed in between leaves no input, so it never answers a stage
    # of this round with half its state (the input's presence is what "trained" means below)
    atomic_write_bytes(folder / "trained-from", (trained_from or f"run {run} round {rnd}").encode())
    if noise.variance > 0:
        noise = replace(noise, seed=_noise_seed(state_dir, trained_from or f"run {run} round {rnd}"))
    atomic_write_bytes(folder / "noise.json", json.dumps(asdict(noise)).encode())  # before the input, too
    save_tensors(folder / "input.safetensors", {"x": vector})


def handle_stage(
    msg: SecAggMessage, state_dir: Path, member: str, roster: Mapping[str, Ed25519PublicKey], min_group: int = 2,
) -> SecAggMessage:
    """Answer one stage message; ProtocolViolation / ProtocolError for anything refused.

    `roster`: the consortium's registered identity keys; `min_group`: the smallest survivor
    list this member signs."""
    started = time.perf_counter()
    folder = round_dir(state_dir, msg.run, msg.round)
    if not (folder / "input.safetensors").is_file():
        raise ProtocolViolation(
            f"member {member!r}: secure-aggregation {msg.stage} for run {msg.run!r} round {msg.round}, "
            "which this node did not train"
        )
    key = identity_key(state_dir)
    session_file = folder / f"session-{msg.group}.json"
    _check_own_key(roster, member, key, "the roster")
    if msg.stage == "advertise":
        if any(folder.glob("session-*.json")) or (folder / "advertised").exists():
            # one group per round: the same input in two groups would let sums be differenced
            raise ProtocolViolation(f"member {member!r}: round {msg.round} already advertised")
        (folder / "advertised").touch()
        group = msg.strings("group")
        strangers = [m for m in group if m not in roster]
        if strangers:
            raise ProtocolViolation(f"member {member!r}: group member {strangers[0]!r} is not in the consortium's roster")
        params = SecAggParams(
            round=msg.round, members=tuple(group), threshold=int(msg.fields["threshold"]),  # type: ignore[call-overload]
            neighbours=int(msg.fields["neighbours"]), ring_bits=int(msg.fields["ring-bits"]),  # type: ignore[call-overload]
            vector_length=int(msg.fields["vector-length"]), graph_seed=msg.fields["graph-seed"],  # type: ignore[call-overload, arg-type]
            session=secagg_session(msg.run, msg.group),
        )
        session = MemberSession(params, member, key, roster, min_survivors=min_group)
        _claim_session(state_dir, member, msg.run, msg.round, params.session_id)
        advert = session.advertise()
        out: dict[str, object] = {"c-pub": advert.c_pub, "s-pub": advert.s_pub, "b-commitment": advert.b_commitment, "signature": advert.signature}
    else:
        if not session_file.is_file():
            raise ProtocolViolation(f"member {member!r}: {msg.stage} before advertise in round {msg.round}")
        session = MemberSession.from_json(session_file.read_bytes(), key, roster)
        if session.params.session != secagg_session(msg.run, msg.group):
            raise ProtocolViolation(f"member {member!r}: {msg.stage} for another session than the one advertised")
        try:
            out = _answer(msg, session, folder, state_dir, member)
        except (ProtocolViolation, ProtocolError, SecAggError, ValueError):
            session_file.unlink(missing_ok=True)  # a refusal ends the session: no second try at a stage
            raise
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


def _answer(msg: SecAggMessage, session: MemberSession, folder: Path, state_dir: Path, member: str) -> dict[str, object]:
    """The reply fields of a stage after advertise (share, mask, check, unmask)."""
    trained_from = (folder / "trained-from").read_text()
    if msg.stage == "share":
        senders = msg.strings("senders")
        columns = [msg.blobs(f) for f in ("c-pubs", "s-pubs", "b-commitments", "signatures")]
        if any(len(c) != len(senders) for c in columns) or len(set(senders)) != len(senders):
            raise ProtocolError("share: advert fields do not pair up")
        adverts = {s: KeyAdvert(s, msg.round, *parts) for s, *parts in zip(senders, *columns, strict=True)}
        ciphertexts = session.share_keys(adverts)
        out: dict[str, object] = {"receivers": sorted(ciphertexts), "ciphertexts": [ciphertexts[r] for r in sorted(ciphertexts)]}
    elif msg.stage == "mask":
        x = load_tensors(folder / "input.safetensors")["x"]
        noise = _noise(folder / "noise.json")
        x = noise.share(x, session.params.threshold, session.params.ring_bits)
        masked = session.masked_input(x, msg.pairs("senders", "ciphertexts"))
        out = {"packed": masked.packed}
    elif msg.stage == "check":
        survivors = msg.strings("survivors")
        _check_reveal(state_dir, member, trained_from, survivors)
        out = {"signature": session.sign_survivors(survivors)}
    else:
        reply = session.unmask(msg.pairs("signers", "signatures"))
        _check_reveal(state_dir, member, trained_from, list(session.survivors))
        _remember_reveal(state_dir, trained_from, list(session.survivors))
        out = {
            "b-owners": sorted(reply.b_shares), "b-shares": [reply.b_shares[o] for o in sorted(reply.b_shares)],
            "s-owners": sorted(reply.s_shares), "s-shares": [reply.s_shares[o] for o in sorted(reply.s_shares)],
        }
    return out


def _claim_session(state_dir: Path, member: str, run: str, rnd: int, session_id: bytes) -> None:
    """Advertise in a session once, ever. A server that re-runs a round under the same session
    could collect honest signatures over a survivor list in one attempt, stop, and replay them
    in the next with each member shown a different list; so every session this member advertised
    in is kept (secagg/sessions.json: per run, the last _SESSION_ROUNDS_KEPT rounds), and a session
    seen before, or for a round older than all of those, is refused."""
    path = state_dir / "secagg" / "sessions.json"
    try:
        seen: dict[str, dict[str, list[str]]] = json.loads(path.read_text()) if path.is_file() else {}
        rounds = seen.setdefault(run, {})
        remembered = sorted(int(r) for r in rounds)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ProtocolViolation(f"member {member!r}: {path} is unreadable ({exc}); refusing to advertise until it is fixed") from None
    if session_id.hex() in rounds.get(str(rnd), []):
        raise ProtocolViolation(f"member {member!r}: already advertised in this session of run {run!r} round {rnd}; a re-run needs a new session")
    if len(remembered) >= _SESSION_ROUNDS_KEPT and rnd < remembered[0]:
        raise ProtocolViolation(f"member {member!r}: round {rnd} of run {run!r} is older than every round it remembers")
    rounds.setdefault(str(rnd), []).append(session_id.hex())
    for old in sorted(rounds, key=int)[:-_SESSION_ROUNDS_KEPT]:
        del rounds[old]
    _write_private(path, json.dumps(seen, sort_keys=True).encode())


def _noise_seed(state_dir: Path, trained_from: str) -> int:
    """The seed of this member's DP noise share for the update `trained_from` names: drawn once
    from the OS, then the same for every attempt at that round. A round the server re-runs after
    unmasking (a crash, or a claimed one) unmasks the same noisy sum again (the update is the same
    too), never a second draw of the noise that averaging two sums would halve. Kept in
    secagg/noise-seeds.json (the last _REVEALS_KEPT updates); unreadable, it is refused like the
    unmask record, since a fresh seed is exactly what must not happen."""
    path = state_dir / "secagg" / "noise-seeds.json"
    key = hashlib.sha256(trained_from.encode()).hexdigest()
    try:
        seeds = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(seeds, dict) or not all(isinstance(v, int) for v in seeds.values()):
            raise ValueError("not an object of seeds")
    except (OSError, ValueError) as exc:
        raise ProtocolViolation(f"{path}: DP noise seeds unreadable ({exc}); refusing to add noise until it is restored") from None
    if key not in seeds:
        seeds[key] = int.from_bytes(os.urandom(8), "little")
        kept = dict(list(seeds.items())[-_REVEALS_KEPT:])
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, json.dumps(kept).encode())
    return int(seeds[key])


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
    """The unmask record. Not a cache: a damaged one cannot be rebuilt (what it held is exactly
    what a server re-running a round must not learn a second time), and starting it empty would
    let that server difference two unmaskings of one update. So it refuses every unmask, one
    line naming the file; rounds that need no unmask from this node go on."""
    path = state_dir / "secagg" / "revealed.json"
    if not path.is_file():
        return {}
    try:
        seen = json.loads(path.read_text())
        if not isinstance(seen, dict) or not all(
            isinstance(v, list) and all(isinstance(m, str) for m in v) for v in seen.values()
        ):
            raise ValueError("not an object of survivor lists")
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ProtocolViolation(
            f"{path}: unmask record unreadable ({reason}); refusing to unmask until it is restored "
            "(it cannot be rebuilt: an empty one would let a re-run round unmask an update twice)"
        ) from None
    return dict(seen)


def load_roster(path: Path, ca: Path) -> dict[str, Ed25519PublicKey]:
    """The consortium's roster (privacy/roster.py), its signature checked with the CA at `ca`;
    one-line ProtocolViolation naming the file for anything else."""
    if not path.is_file():
        raise ProtocolViolation(
            f"no roster at {path}: secure aggregation needs the consortium's roster "
            "(roster.json from `fedmoe certs`; node config `roster`)"
        )
    try:
        members = verify_roster(path.read_bytes(), load_cert(ca), str(path))
    except (OSError, CertError) as exc:
        raise ProtocolViolation(str(exc)) from None
    return {m: Ed25519PublicKey.from_public_bytes(k) for m, k in members.items()}


def check_registered(path: Path, ca: Path, member: str, state_dir: Path) -> None:
    """That the roster at `path` verifies with the CA and registers this node's identity key."""
    _check_own_key(load_roster(path, ca), member, identity_key(state_dir), f"roster {path}")


def _check_own_key(roster: Mapping[str, Ed25519PublicKey], member: str, key: Ed25519PrivateKey, source: str) -> None:
    if member not in roster:
        raise ProtocolViolation(f"{source} does not list member {member!r} (ask the operator to register it)")
    if roster[member].public_bytes_raw() != public_bytes(key):
        raise ProtocolViolation(f"member {member!r}: {source} does not register this node's identity key")


def simulated_roster(nodes_dir: Path, members: Sequence[str]) -> dict[str, Ed25519PublicKey]:
    """The embedded consortium's roster: the identity keys of this workspace's own simulated
    members (nodes_dir/<member>/), each created on first need (safely from parallel actors:
    identity_key links a new key into place only if none is there). Names the server sends are
    never added."""
    return {m: identity_key(nodes_dir / m).public_key() for m in sorted(set(members))}


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only file, written whole: atomic_write_bytes' temp file is created 0600 (mkstemp),
    fsynced, renamed over `path`, and the folder fsynced."""
    atomic_write_bytes(path, data)
