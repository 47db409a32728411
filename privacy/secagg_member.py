"""One member's side of a secure-aggregation round (privacy/secagg.py has the protocol).

MemberSession advertises keys, shares its secrets with its neighbours, masks its input and
answers the server's unmask request; it can be saved to JSON between stage messages.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Collection, Mapping
from dataclasses import replace

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import shamir
from privacy.secagg import (
    InvalidInput,
    ProtocolViolation,
    SecAggAborted,
    SecAggParams,
    _frame,
    _unframe,
    neighbour_graph,
    survivors_bytes,
)
from privacy.secagg_crypto import (
    _KEY_BYTES,
    _exchange,
    _mask_seed,
    _parse_share,
    _prg,
    _verify_advert,
    _verify_survivors,
)
from privacy.secagg_wire import KeyAdvert, MaskedInput, UnmaskReply, _ring_array, pack

_NONCE_BYTES = 12
_SHARE_DOMAIN = b"fedmoe-secagg-share-v1"

_MEMBER_STAGES = ("advertise", "share_keys", "masked_input", "sign_survivors", "unmask", "done")


class MemberSession:
    """One member's side of one round; call the stage methods in order, each once."""

    def __init__(
        self,
        params: SecAggParams,
        member_id: str,
        identity_key: Ed25519PrivateKey,
        directory: Mapping[str, Ed25519PublicKey],
        *,
        min_survivors: int = 0,
    ) -> None:
        """`directory`: the identity keys of the consortium's registration, never what the server
        says; `min_survivors`: the smallest survivor list this member signs (at least t)."""
        if member_id not in params.members:
            raise InvalidInput(f"member {member_id!r} is not in round {params.round}")
        known = directory.get(member_id)
        if (
            known is None
            or known.public_bytes_raw() != identity_key.public_key().public_bytes_raw()
        ):
            raise InvalidInput(f"member {member_id!r}: identity key does not match the directory's")
        strangers = [m for m in params.members if m not in directory]
        if strangers:
            raise InvalidInput(
                f"member {member_id!r}: group member {strangers[0]!r} is not in the directory"
            )
        keys = [directory[m].public_bytes_raw() for m in params.members]
        if len(set(keys)) != len(keys):
            raise InvalidInput(f"member {member_id!r}: two group members share one identity key")
        self.params = params
        self.member = member_id
        self.min_survivors = min_survivors
        self._identity = identity_key
        self._directory = directory
        self._neighbours = frozenset(
            neighbour_graph(params.members, params.neighbours, params.graph_seed)[member_id]
        )
        self._x = params.members.index(member_id) + 1  # this member's Shamir coordinate
        self._stage = 0
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(shamir.SECRET_BYTES)
        self._adverts: dict[str, KeyAdvert] = {}
        self._own_b_share = b""
        # inbox sender -> (its b share, its s_sk share) held here
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._survivors: tuple[str, ...] = ()

    def advertise(self) -> KeyAdvert:
        """Stage 1: this round's public keys and the commitment to b, signed by the identity key."""
        self._enter("advertise")
        advert = KeyAdvert(
            member=self.member,
            round=self.params.round,
            c_pub=self._c_sk.public_key().public_bytes_raw(),
            s_pub=self._s_sk.public_key().public_bytes_raw(),
            b_commitment=hashlib.sha256(self._b).digest(),
            signature=b"",
        )
        return replace(
            advert, signature=self._identity.sign(advert.signed_bytes(self.params.session_id))
        )

    def share_keys(self, adverts: Mapping[str, KeyAdvert]) -> dict[str, bytes]:
        """Stage 2: Shamir shares of b and s_sk, encrypted to each neighbour that advertised."""
        self._enter("share_keys")
        for sender, advert in adverts.items():
            if sender not in self._neighbours:
                raise ProtocolViolation(
                    f"member {self.member!r}: got an advert of {sender!r}, not a neighbour"
                )
            _verify_advert(advert, sender, self.params, self._directory)
        self._adverts = dict(adverts)
        holders = sorted(adverts)
        if len(holders) + 1 < self.params.threshold:
            raise SecAggAborted(
                f"member {self.member!r}: {len(holders)} neighbours advertised, "
                f"{self.params.threshold - 1} needed to hold its shares"
            )
        xs = [self._x] + [self._coordinate(h) for h in holders]
        s_raw = self._s_sk.private_bytes_raw()
        b_shares = shamir.split(self._b, self.params.threshold, xs)
        s_shares = shamir.split(s_raw, self.params.threshold, xs)
        self._own_b_share = b_shares[0].to_bytes()
        out: dict[str, bytes] = {}
        for holder, b_share, s_share in zip(holders, b_shares[1:], s_shares[1:], strict=True):
            key = self._share_key(holder)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            plaintext = _frame(
                self.member,
                holder,
                self.params.session_id,
                b_share.to_bytes(),
                s_share.to_bytes(),
            )
            out[holder] = nonce + AESGCM(key).encrypt(
                nonce, plaintext, self._share_ad(self.member, holder)
            )
        return out

    def masked_input(self, x: torch.Tensor, inbox: Mapping[str, bytes]) -> MaskedInput:
        """Stage 3: keep the shares addressed here; mask x with b and with every inbox sender.

        A bad `x` (the caller's mistake) is refused before the stage advances, so it can be retried.
        """
        self._expect("masked_input")
        values = _ring_array(x, self.params.ring_bits, f"member {self.member!r}: input")
        if values.shape[0] != self.params.vector_length:
            raise InvalidInput(
                f"member {self.member!r}: input has length {values.shape[0]}, "
                f"expected {self.params.vector_length}"
            )
        self._enter("masked_input")
        for sender, ciphertext in inbox.items():
            if sender not in self._adverts:
                raise ProtocolViolation(
                    f"member {self.member!r}: inbox holds shares of {sender!r}, "
                    "whose advert it never got"
                )
            self._held[sender] = self._open_share(sender, ciphertext)
        if len(self._held) + 1 < self.params.threshold:
            raise SecAggAborted(
                f"member {self.member!r}: {len(self._held)} neighbours shared keys, "
                f"{self.params.threshold - 1} needed"
            )
        n = values.shape[0]
        y = values + _prg(self._b, n)
        for other in sorted(self._held):
            mask = _prg(_mask_seed(self._s_sk, self._adverts[other].s_pub, self.params.session_id), n)
            if self.member < other:
                y += mask
            else:
                y -= mask
        y &= np.uint64((1 << self.params.ring_bits) - 1)
        return MaskedInput(
            self.member,
            self.params.round,
            pack(torch.from_numpy(y.astype(np.int64)), self.params.ring_bits),
        )

    def sign_survivors(self, survivors: Collection[str]) -> bytes:
        """Stage 4, the consistency check: sign the one survivor list this member is shown.

        Refused: a list naming strangers, leaving this member out, naming a neighbour whose
        shares never arrived here, or shorter than max(t, this member's minimum group size).
        """
        self._enter("sign_survivors")
        alive = sorted(set(survivors))
        for other in alive:
            if other not in self.params.members:
                raise ProtocolViolation(
                    f"member {self.member!r}: survivor list names {other!r}, "
                    f"not in round {self.params.round}"
                )
            if other != self.member and other in self._neighbours and other not in self._held:
                raise ProtocolViolation(
                    f"member {self.member!r}: survivor list names {other!r}, "
                    "whose shares never arrived here"
                )
        if self.member not in alive:
            raise ProtocolViolation(
                f"member {self.member!r}: survivor list leaves out this member, which sent its input"
            )
        smallest = max(self.params.threshold, self.min_survivors)
        if len(alive) < smallest:
            raise ProtocolViolation(
                f"member {self.member!r}: survivor list has {len(alive)} members; "
                f"this member unmasks no sum of fewer than {smallest}"
            )
        self._survivors = tuple(alive)
        return self._identity.sign(survivors_bytes(self.params, self.member, alive))

    def unmask(self, signatures: Mapping[str, bytes]) -> UnmaskReply:
        """Stage 5: given every signer's signature over the list this member signed, reveal b
        shares of the survivors and s_sk shares of the neighbours that dropped; never both, once.

        What to reveal comes from the signed list alone; the signatures must be valid, from
        survivors, this member's own among them, and at least max(`params.min_signers`, this
        member's minimum group size) of them.
        """
        if self._stage == _MEMBER_STAGES.index("done"):
            raise ProtocolViolation(
                f"member {self.member!r}: unmask already answered; shares are revealed once"
            )
        self._enter("unmask")
        alive = set(self._survivors)
        strangers = sorted(set(signatures) - alive)
        if strangers:
            raise ProtocolViolation(
                f"member {self.member!r}: {strangers[0]!r} signed, but is not on the survivor list"
            )
        if self.member not in signatures:
            raise ProtocolViolation(f"member {self.member!r}: its own signature is missing")
        needed = max(self.params.min_signers, self.min_survivors)  # each signer vouches it sent its input
        if len(signatures) < needed:
            raise ProtocolViolation(
                f"member {self.member!r}: {len(signatures)} members signed the survivor list, "
                f"{needed} needed"
            )
        for signer, signature in sorted(signatures.items()):
            _verify_survivors(signer, signature, self._survivors, self.params, self._directory)
        b_shares = {o: held[0] for o, held in self._held.items() if o in alive}
        b_shares[self.member] = self._own_b_share
        s_shares = {o: held[1] for o, held in self._held.items() if o not in alive}
        return UnmaskReply(self.member, self.params.round, b_shares, s_shares)

    @property
    def survivors(self) -> tuple[str, ...]:
        """The survivor list this member signed (empty before the consistency check)."""
        return self._survivors

    # -- persistence: a member daemon keeps the session on its own disk between stage messages

    def to_json(self) -> bytes:
        """The session's secrets and progress as canonical JSON (hex for bytes); node-local only.

        The identity key and the directory are not included: the caller supplies them again to
        `from_json`. Whoever reads this file can unmask this member, so the caller writes it
        owner-only and deletes it when the round ends.
        """
        p = self.params
        data = {
            "version": 2,
            "params": {
                "session": p.session,
                "round": p.round, "members": list(p.members), "threshold": p.threshold,
                "neighbours": p.neighbours, "ring_bits": p.ring_bits,
                "vector_length": p.vector_length, "graph_seed": p.graph_seed.hex(),
            },
            "member": self.member,
            "stage": self._stage,
            "c_sk": self._c_sk.private_bytes_raw().hex(),
            "s_sk": self._s_sk.private_bytes_raw().hex(),
            "b": self._b.hex(),
            "own_b_share": self._own_b_share.hex(),
            "adverts": {
                m: [a.c_pub.hex(), a.s_pub.hex(), a.b_commitment.hex(), a.signature.hex()]
                for m, a in sorted(self._adverts.items())
            },
            "held": {m: [b.hex(), s.hex()] for m, (b, s) in sorted(self._held.items())},
            "survivors": list(self._survivors),
            "min_survivors": self.min_survivors,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(
        cls,
        raw: bytes,
        identity_key: Ed25519PrivateKey,
        directory: Mapping[str, Ed25519PublicKey],
    ) -> MemberSession:
        """A session saved by `to_json`; InvalidInput for anything that is not one."""
        try:
            data = json.loads(raw)
            if data["version"] != 2:
                raise ValueError(f"version {data['version']!r}")
            p = data["params"]
            params = SecAggParams(
                round=int(p["round"]), members=tuple(p["members"]), threshold=int(p["threshold"]),
                neighbours=int(p["neighbours"]), ring_bits=int(p["ring_bits"]),
                vector_length=int(p["vector_length"]), graph_seed=bytes.fromhex(p["graph_seed"]),
                session=str(p["session"]),
            )
            session = cls(
                params, str(data["member"]), identity_key, directory,
                min_survivors=int(data["min_survivors"]),
            )
            session._stage = int(data["stage"])
            if not 0 <= session._stage < len(_MEMBER_STAGES):
                raise ValueError(f"stage {session._stage}")
            session._c_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(data["c_sk"]))
            session._s_sk = X25519PrivateKey.from_private_bytes(bytes.fromhex(data["s_sk"]))
            session._b = bytes.fromhex(data["b"])
            session._own_b_share = bytes.fromhex(data["own_b_share"])
            session._adverts = {
                m: KeyAdvert(m, params.round, *(bytes.fromhex(v) for v in fields))
                for m, fields in data["adverts"].items()
            }
            session._held = {
                m: (bytes.fromhex(b), bytes.fromhex(s)) for m, (b, s) in data["held"].items()
            }
            session._survivors = tuple(str(m) for m in data["survivors"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"saved secure-aggregation session is unreadable: {exc}") from None
        return session

    @property
    def stage(self) -> str:
        """The stage method to call next ("done" once unmask has answered)."""
        return _MEMBER_STAGES[self._stage]

    # -- helpers

    def _expect(self, stage: str) -> None:
        expected = _MEMBER_STAGES[self._stage]
        if stage != expected:
            raise ProtocolViolation(
                f"member {self.member!r}: {stage}() called out of order, expected {expected}()"
            )

    def _enter(self, stage: str) -> None:
        # any refusal after this point ends the session: a half-done stage is never retried
        self._expect(stage)
        self._stage += 1

    def _coordinate(self, member: str) -> int:
        return self.params.members.index(member) + 1

    def _share_key(self, other: str) -> bytes:
        shared = _exchange(self._c_sk, self._adverts[other].c_pub, other)
        info = b"fedmoe-secagg-share" + self.params.session_id
        return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(
            shared
        )

    def _share_ad(self, sender: str, receiver: str) -> bytes:
        return _frame(_SHARE_DOMAIN, self.params.session_id, sender, receiver)

    def _open_share(self, sender: str, ciphertext: bytes) -> tuple[bytes, bytes]:
        bad = ProtocolViolation(
            f"member {self.member!r}: share ciphertext from {sender!r} does not decrypt"
        )
        if len(ciphertext) <= _NONCE_BYTES:
            raise bad
        try:
            plaintext = AESGCM(self._share_key(sender)).decrypt(
                ciphertext[:_NONCE_BYTES],
                ciphertext[_NONCE_BYTES:],
                self._share_ad(sender, self.member),
            )
        except InvalidTag:
            raise bad from None
        fields = _unframe(plaintext, 5)
        if fields is None or fields[:3] != [
            sender.encode(),
            self.member.encode(),
            self.params.session_id,
        ]:
            raise ProtocolViolation(
                f"member {self.member!r}: share from {sender!r} is not addressed to it this round"
            )
        for share in fields[3:]:
            if _parse_share(share, self._x) is None:
                raise ProtocolViolation(
                    f"member {self.member!r}: share from {sender!r} is malformed"
                )
        return fields[3], fields[4]
