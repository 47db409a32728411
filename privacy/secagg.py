"""Secure aggregation (SecAgg+-style): the server learns only the sum of members' ring vectors.

Bonawitz et al. (CCS'17) with the sparse neighbour graph of Bell et al. (CCS'20). Each member i
holds x_i, an int64 vector of ring elements in [0, 2^ring_bits) (quantized and shifted by the
caller), and uploads

    y_i = x_i + PRG(b_i) + sum_{j in masking neighbours} (+PRG(s_ij) if i < j else -PRG(s_ij))

mod 2^ring_bits. The pairwise masks cancel in the sum; the self-mask b_i and the mask key s_i are
Shamir-shared t-of-(neighbours+1) among i's neighbours and itself, so the server can remove b_i of
every survivor and rebuild the pairwise masks of every member that dropped after masking began.
Each honest member reveals, per neighbour, one share or the other, never both, and only once.

One round, as the stage messages the round loop carries (the server only routes and checks):

    member                               server
    advertise()            -> KeyAdvert  receive_adverts()   -> each member's neighbours' adverts
    share_keys(adverts)    -> ciphertexts receive_shares()   -> inboxes (receiver -> sender -> ct)
    masked_input(x, inbox) -> MaskedInput receive_masked()   -> (survivors, dropped);
                                          unmask_requests()  -> one UnmaskRequest per survivor
    unmask(survivors, dropped) -> UnmaskReply  finish(replies) -> sum of survivors' x

Who counts after each stage (the *active* sets; each must keep >= threshold members or the round
aborts with SecAggAborted):
  A1  members whose advert arrived and verified;
  A2  members of A1 whose share ciphertexts arrived: only these are masked with. The server gives
      each member of A2 an inbox holding exactly its A2 neighbours, and a member masks with
      exactly the senders in its inbox, so both ends of a pair agree;
  A3  members of A2 whose masked input arrived: the survivors, whose x is in the sum. A2 - A3 are
      the dropped, whose pairwise masks the server rebuilds from their mask keys' shares. A
      survivor that then sends no unmask reply is still in the sum: its b comes from the others.

Threat model: an honest-but-curious server, plus member-side refusals of the active attacks that
are cheap to see (forged or replayed adverts, both shares of one member asked for, asked twice).
The threshold must exceed half of each member's share holders, so no inconsistent story told to
different holders can collect both shares of the same member.

Written here, not taken from Flower: Flower's SecAgg+ runs only inside its legacy Strategy API
with its own fixed quantization, while fedmoe's round loop and codec quantize themselves.
`cryptography` gives the primitives (X25519, Ed25519, HKDF, AES-GCM, AES-CTR); no library gives
the protocol. Pure code: no Flower, no I/O, no pickle; messages are frozen dataclasses of
str/int/bytes that the shells marshal.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import secrets
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import shamir

MAX_RING_BITS = 62  # sums of two ring elements stay below 2^63: no int64 overflow anywhere
_KEY_BYTES = 32
_NONCE_BYTES = 12
_SIGNATURE_BYTES = 64
_ADVERT_DOMAIN = b"fedmoe-secagg-advert-v1"
_SHARE_DOMAIN = b"fedmoe-secagg-share-v1"
_GRAPH_DOMAIN = b"fedmoe-secagg-graph-v1"
_MAX_SHARE_SUBSETS = 4096  # threshold-size subsets tried when a secret's shares disagree

U64 = npt.NDArray[np.uint64]


class SecAggError(Exception):
    """Base of every secure-aggregation error."""


class InvalidInput(SecAggError, ValueError):
    """Parameters, keys or a vector the caller passed that the protocol cannot use."""


class ProtocolViolation(SecAggError):
    """A message that breaks the protocol: out of order, forged, for another round, or unsafe."""


class SecAggAborted(SecAggError):
    """Too few members (or shares) remain for the round to finish safely."""


# ---------------------------------------------------------------- parameters and the graph


@dataclass(frozen=True)
class SecAggParams:
    round: int
    members: tuple[str, ...]  # sorted ids of the round's members
    threshold: int  # t: shares needed to rebuild a member's secret; also the minimum survivors
    neighbours: int  # k: target degree of the neighbour graph (O(log n) in SecAgg+)
    ring_bits: int  # sums are mod 2^ring_bits
    vector_length: int
    graph_seed: bytes  # the same for everyone in the round

    def __post_init__(self) -> None:
        if self.round < 0:
            raise InvalidInput(f"round {self.round} is negative")
        if len(self.members) < 2:
            raise InvalidInput(
                f"secure aggregation needs at least 2 members, got {len(self.members)}"
            )
        if list(self.members) != sorted(set(self.members)) or not all(self.members):
            raise InvalidInput("members must be distinct non-empty ids in sorted order")
        if len(self.members) > shamir.MAX_X:
            raise InvalidInput(f"{len(self.members)} members exceed the {shamir.MAX_X} supported")
        if self.neighbours < 1:
            raise InvalidInput(f"neighbours {self.neighbours} is below 1")
        holders = self.degree + 1
        if not holders // 2 < self.threshold <= holders:
            raise InvalidInput(
                f"threshold {self.threshold} must be in {holders // 2 + 1}..{holders}: more than "
                f"half of each member's {holders} share holders "
                f"(itself and {self.degree} neighbours)"
            )
        if not 1 <= self.ring_bits <= MAX_RING_BITS:
            raise InvalidInput(f"ring_bits {self.ring_bits} is not in 1..{MAX_RING_BITS}")
        if self.vector_length < 1:
            raise InvalidInput(f"vector_length {self.vector_length} is below 1")
        if len(self.graph_seed) < 16:
            raise InvalidInput(f"graph_seed is {len(self.graph_seed)} bytes, need at least 16")

    @property
    def degree(self) -> int:
        """Every member's number of neighbours in `neighbour_graph`."""
        return _degree(len(self.members), self.neighbours)

    @property
    def packed_bytes(self) -> int:
        """Size of a MaskedInput's payload."""
        return math.ceil(self.vector_length * self.ring_bits / 8)


def _degree(n: int, k: int) -> int:
    return min(2 * math.ceil(k / 2), n - 1)


def neighbour_graph(members: Sequence[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """A symmetric graph in which every member has min(2*ceil(k/2), n-1) neighbours.

    A Harary-style ring: members are placed on a circle in an order drawn from `seed` (everyone
    computes the same order) and joined to the ceil(k/2) nearest on each side; with k >= n-1 the
    graph is complete. Neighbour tuples are sorted.
    """
    if len(set(members)) != len(members):
        raise InvalidInput("members are not distinct")
    if k < 1:
        raise InvalidInput(f"neighbours {k} is below 1")
    n = len(members)
    if 2 * math.ceil(k / 2) >= n - 1:
        return {m: tuple(sorted(o for o in members if o != m)) for m in members}
    order = sorted(members, key=lambda m: hashlib.sha256(_frame(_GRAPH_DOMAIN, seed, m)).digest())
    half = math.ceil(k / 2)
    graph: dict[str, tuple[str, ...]] = {}
    for index, member in enumerate(order):
        around = {order[(index + offset) % n] for offset in range(1, half + 1)}
        around |= {order[(index - offset) % n] for offset in range(1, half + 1)}
        graph[member] = tuple(sorted(around))
    return graph


def ring_bits_for(members: int, max_abs: int) -> int:
    """Ring width for summing `members` values in [-max_abs, max_abs] shifted to [0, 2*max_abs].

    The sum lies in [0, 2*members*max_abs], so that many bits hold it without wrapping.
    """
    if members < 1 or max_abs < 0:
        raise InvalidInput(f"need members >= 1 and max_abs >= 0, got {members} and {max_abs}")
    bits = max(1, (2 * members * max_abs).bit_length())
    if bits > MAX_RING_BITS:
        raise InvalidInput(
            f"{members} members of magnitude {max_abs} need {bits} bits > {MAX_RING_BITS}"
        )
    return bits


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class KeyAdvert:
    member: str
    round: int
    c_pub: bytes  # X25519, encrypts the shares sent to this member
    s_pub: bytes  # X25519, agrees the pairwise mask seeds
    b_commitment: bytes  # sha256 of the self-mask seed, checked after reconstruction
    signature: bytes  # Ed25519 by the member's identity key over `signed_bytes`

    def signed_bytes(self) -> bytes:
        return _frame(
            _ADVERT_DOMAIN,
            self.member,
            _round_bytes(self.round),
            self.c_pub,
            self.s_pub,
            self.b_commitment,
        )


@dataclass(frozen=True)
class MaskedInput:
    member: str
    round: int
    packed: bytes  # y, `ring_bits` bits per element (see `pack`)


@dataclass(frozen=True)
class UnmaskRequest:
    round: int
    survivors: frozenset[str]  # reveal the self-mask share of these
    dropped: frozenset[str]  # reveal the mask-key share of these


@dataclass(frozen=True)
class UnmaskReply:
    member: str
    round: int
    b_shares: Mapping[str, bytes]  # owner -> shamir.Share bytes of its self-mask seed
    s_shares: Mapping[str, bytes]  # owner -> shamir.Share bytes of its mask private key


# ---------------------------------------------------------------- ring vectors


def pack(values: torch.Tensor, bits: int) -> bytes:
    """Ring elements in [0, 2^bits) as exactly ceil(n*bits/8) bytes: element i at bit i*bits.

    Little-endian bit stream, built a 64-bit word at a time: element i lands in word
    (i*bits)//64 at shift (i*bits)%64 and, when it straddles the boundary, its high bits in
    the next word. No loop over elements.
    """
    array = _ring_array(values, bits, "values")
    n = array.shape[0]
    size = math.ceil(n * bits / 8)
    if bits % 8 == 0:
        return array.view(np.uint8).reshape(-1, 8)[:, : bits // 8].tobytes()
    word, shift = _bit_positions(n, bits)
    words = np.zeros(math.ceil(n * bits / 64), dtype=np.uint64)
    if n:
        # elements sharing a word occupy disjoint bits, so a sum per word is their OR
        starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
        words[word[starts]] = np.add.reduceat(array << shift, starts)
        straddle = shift + np.uint64(bits) > 64
        words[word[straddle] + 1] |= array[straddle] >> (np.uint64(64) - shift[straddle])
    return words.astype("<u8").tobytes()[:size]


def unpack(data: bytes, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: n int64 ring elements; refuses a wrong length or non-zero padding."""
    if not 1 <= bits <= MAX_RING_BITS:
        raise InvalidInput(f"bits {bits} is not in 1..{MAX_RING_BITS}")
    expected = math.ceil(n * bits / 8)
    if len(data) != expected:
        raise InvalidInput(f"packed vector is {len(data)} bytes, expected {expected}")
    if (n * bits) % 8 and data[-1] >> ((n * bits) % 8):
        raise InvalidInput("packed vector has non-zero padding bits")
    if bits % 8 == 0:
        octets = np.zeros((n, 8), dtype=np.uint8)
        octets[:, : bits // 8] = np.frombuffer(data, dtype=np.uint8).reshape(n, bits // 8)
        return torch.from_numpy(octets.view("<u8").reshape(n).astype(np.int64))
    # whole words plus one spare, so word+1 is always readable
    padded = data + bytes(-len(data) % 8 + 8)
    words = np.frombuffer(padded, dtype="<u8").astype(np.uint64)
    word, shift = _bit_positions(n, bits)
    low = words[word] >> shift
    high = np.where(shift > 0, words[word + 1] << ((np.uint64(64) - shift) & np.uint64(63)), 0)
    values = (low | high.astype(np.uint64)) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(values.astype(np.int64))


def _bit_positions(n: int, bits: int) -> tuple[U64, U64]:
    position = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    return position >> np.uint64(6), position & np.uint64(63)


def _ring_array(values: torch.Tensor, bits: int, what: str) -> U64:
    if not 1 <= bits <= MAX_RING_BITS:
        raise InvalidInput(f"bits {bits} is not in 1..{MAX_RING_BITS}")
    if values.dtype != torch.int64 or values.dim() != 1:
        raise InvalidInput(
            f"{what} must be a 1-D int64 tensor, got {values.dtype} of shape {tuple(values.shape)}"
        )
    array = values.detach().cpu().numpy()
    if array.size and (int(array.min()) < 0 or int(array.max()) >> bits):
        raise InvalidInput(f"{what} leave the ring [0, 2^{bits})")
    return array.astype("<u8")


def _prg(seed: bytes, n: int) -> U64:
    # AES-256-CTR keystream under a one-use key, read as n little-endian uint64 (arithmetic in
    # uint64 wraps mod 2^64, and 2^ring_bits divides 2^64, so masking at the end is exact)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * n)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8")


# ---------------------------------------------------------------- member side


_MEMBER_STAGES = ("advertise", "share_keys", "masked_input", "unmask", "done")


class MemberSession:
    """One member's side of one round; call the stage methods in order, each once."""

    def __init__(
        self,
        params: SecAggParams,
        member_id: str,
        identity_key: Ed25519PrivateKey,
        directory: Mapping[str, Ed25519PublicKey],
    ) -> None:
        if member_id not in params.members:
            raise InvalidInput(f"member {member_id!r} is not in round {params.round}")
        known = directory.get(member_id)
        if (
            known is None
            or known.public_bytes_raw() != identity_key.public_key().public_bytes_raw()
        ):
            raise InvalidInput(f"member {member_id!r}: identity key does not match the directory's")
        self.params = params
        self.member = member_id
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
        return replace(advert, signature=self._identity.sign(advert.signed_bytes()))

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
                _round_bytes(self.params.round),
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
            mask = _prg(_mask_seed(self._s_sk, self._adverts[other].s_pub, self.params.round), n)
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

    def unmask(self, survivors: Collection[str], dropped: Collection[str]) -> UnmaskReply:
        """Stage 4: b shares of survivors and s_sk shares of dropped members; never both, once."""
        if self._stage == _MEMBER_STAGES.index("done"):
            raise ProtocolViolation(
                f"member {self.member!r}: unmask already answered; shares are revealed once"
            )
        self._enter("unmask")
        alive, gone = set(survivors), set(dropped)
        for other in sorted(alive | gone):
            if other not in self.params.members:
                raise ProtocolViolation(
                    f"member {self.member!r}: unmask names {other!r}, "
                    f"not in round {self.params.round}"
                )
        both = alive & gone
        if both:
            raise ProtocolViolation(
                f"member {self.member!r}: asked to reveal both shares of {min(both)!r}"
            )
        if self.member in gone:
            raise ProtocolViolation(
                f"member {self.member!r}: unmask claims this member itself dropped"
            )
        for other in sorted((alive - {self.member}) | gone):
            if other not in self._held:
                raise ProtocolViolation(f"member {self.member!r}: holds no shares of {other!r}")
        b_shares = {o: self._held[o][0] for o in alive if o != self.member}
        if self.member in alive:
            b_shares[self.member] = self._own_b_share
        s_shares = {o: self._held[o][1] for o in gone}
        return UnmaskReply(self.member, self.params.round, b_shares, s_shares)

    # -- persistence: a member daemon keeps the session on its own disk between stage messages

    def to_json(self) -> bytes:
        """The session's secrets and progress as canonical JSON (hex for bytes); node-local only.

        The identity key and the directory are not included: the caller supplies them again to
        `from_json`. Whoever reads this file can unmask this member, so the caller writes it
        owner-only and deletes it when the round ends.
        """
        p = self.params
        data = {
            "version": 1,
            "params": {
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
            if data["version"] != 1:
                raise ValueError(f"version {data['version']!r}")
            p = data["params"]
            params = SecAggParams(
                round=int(p["round"]), members=tuple(p["members"]), threshold=int(p["threshold"]),
                neighbours=int(p["neighbours"]), ring_bits=int(p["ring_bits"]),
                vector_length=int(p["vector_length"]), graph_seed=bytes.fromhex(p["graph_seed"]),
            )
            session = cls(params, str(data["member"]), identity_key, directory)
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
        info = b"fedmoe-secagg-share" + _round_bytes(self.params.round)
        return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(
            shared
        )

    def _share_ad(self, sender: str, receiver: str) -> bytes:
        return _frame(_SHARE_DOMAIN, sender, receiver, _round_bytes(self.params.round))

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
            _round_bytes(self.params.round),
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


# ---------------------------------------------------------------- server side


_SERVER_STAGES = ("receive_adverts", "receive_shares", "receive_masked", "finish", "done")


class ServerSession:
    """The server's side of one round: routes messages, tracks who is active, unmasks the sum."""

    def __init__(
        self,
        params: SecAggParams,
        directory: Mapping[str, Ed25519PublicKey],
        *,
        lenient: bool = False,
    ) -> None:
        """`lenient`: a member whose message breaks the protocol is left out of the round (as
        if it had dropped at that stage) and named in `refused`, instead of failing the stage.
        The round loop runs lenient, so one misbehaving member cannot stop everybody's round."""
        missing = [m for m in params.members if m not in directory]
        if missing:
            raise InvalidInput(f"member {missing[0]!r} has no identity key in the directory")
        self.params = params
        self._directory = directory
        self._graph = neighbour_graph(params.members, params.neighbours, params.graph_seed)
        self._stage = 0
        self._adverts: dict[str, KeyAdvert] = {}  # A1
        self._shared: set[str] = set()  # A2
        self._masked: dict[str, U64] = {}  # A3 -> y
        self._lenient = lenient
        self.refused: dict[str, str] = {}  # member -> why its message was refused
        self.tampered: dict[str, str] = {}  # owner -> which of its secrets had disagreeing shares

    def _accept(self, member: str, check: Callable[[], None]) -> bool:
        """Run a per-member check; a violation is raised, or (lenient) recorded and skipped."""
        try:
            check()
        except ProtocolViolation as exc:
            if not self._lenient:
                raise
            self.refused[member] = str(exc)
            return False
        return True

    def receive_adverts(self, adverts: Mapping[str, KeyAdvert]) -> dict[str, dict[str, KeyAdvert]]:
        """Verify adverts; returns, for each advertiser, its advertising neighbours' adverts."""
        self._enter("receive_adverts")
        self._adverts = {
            member: advert
            for member, advert in sorted(adverts.items())
            if self._accept(
                member, lambda a=advert, m=member: _verify_advert(a, m, self.params, self._directory)
            )
        }
        self._require(len(self._adverts), "advertised keys")
        return {
            m: {j: self._adverts[j] for j in self._graph[m] if j in self._adverts}
            for m in sorted(self._adverts)
        }

    def receive_shares(
        self, per_member: Mapping[str, Mapping[str, bytes]]
    ) -> dict[str, dict[str, bytes]]:
        """Ciphertexts sender -> receiver in; inboxes receiver -> sender out, among senders only."""
        self._enter("receive_shares")

        def check(sender: str, ciphertexts: Mapping[str, bytes]) -> None:
            self._check_known(sender, self._adverts, "sent shares without a verified advert")
            expected = {j for j in self._graph[sender] if j in self._adverts}
            if set(ciphertexts) != expected:
                raise ProtocolViolation(
                    f"member {sender!r}: sent shares to {sorted(ciphertexts)}, "
                    f"expected {sorted(expected)}"
                )

        self._shared = {
            sender
            for sender, ciphertexts in sorted(per_member.items())
            if self._accept(sender, lambda s=sender, c=ciphertexts: check(s, c))
        }
        self._require(len(self._shared), "shared keys")
        return {
            receiver: {
                s: per_member[s][receiver] for s in self._graph[receiver] if s in self._shared
            }
            for receiver in sorted(self._shared)
        }

    def receive_masked(self, inputs: Mapping[str, MaskedInput]) -> tuple[set[str], set[str]]:
        """Masked inputs in; (survivors, dropped) out.

        Survivors sent a masked input; dropped members shared keys but sent none.
        """
        self._enter("receive_masked")
        for member, masked in sorted(inputs.items()):
            self._accept(member, lambda m=member, x=masked: self._take_masked(m, x))
        self._require(len(self._masked), "sent masked inputs")
        return set(self._masked), self._shared - set(self._masked)

    def _take_masked(self, member: str, masked: MaskedInput) -> None:
        self._check_known(member, self._shared, "sent a masked input without sharing keys")
        if masked.member != member or masked.round != self.params.round:
            raise ProtocolViolation(
                f"member {member!r}: masked input is labelled {masked.member!r}, "
                f"round {masked.round}"
            )
        if len(masked.packed) != self.params.packed_bytes:
            raise ProtocolViolation(
                f"member {member!r}: masked input is {len(masked.packed)} bytes, "
                f"expected {self.params.packed_bytes}"
            )
        try:
            y = unpack(masked.packed, self.params.ring_bits, self.params.vector_length)
        except InvalidInput as error:
            raise ProtocolViolation(f"member {member!r}: {error}") from None
        self._masked[member] = y.numpy().astype("<u8")

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """What to ask each survivor: b shares of itself and of its surviving inbox senders,
        s_sk shares of its inbox senders that dropped."""
        if self._stage != _SERVER_STAGES.index("finish"):
            raise ProtocolViolation(
                f"unmask_requests() called out of order, expected {_SERVER_STAGES[self._stage]}()"
            )
        requests: dict[str, UnmaskRequest] = {}
        for member in sorted(self._masked):
            senders = {s for s in self._graph[member] if s in self._shared}
            requests[member] = UnmaskRequest(
                self.params.round,
                frozenset((senders & set(self._masked)) | {member}),
                frozenset(senders - set(self._masked)),
            )
        return requests

    def finish(self, replies: Mapping[str, UnmaskReply]) -> torch.Tensor:
        """Rebuild survivors' b and dropped members' s_sk; the sum of survivors' x mod 2^ring_bits.

        Replies may be missing (members that went silent); each secret needs `threshold` shares.
        """
        requests = self.unmask_requests()
        self._enter("finish")
        b_shares: dict[str, dict[str, shamir.Share]] = {m: {} for m in self._masked}
        s_shares: dict[str, dict[str, shamir.Share]] = {
            m: {} for m in self._shared - set(self._masked)
        }
        def parse(holder: str, reply: UnmaskReply) -> None:
            self._check_known(holder, self._masked, "sent an unmask reply without a masked input")
            if reply.member != holder or reply.round != self.params.round:
                raise ProtocolViolation(
                    f"member {holder!r}: unmask reply is labelled {reply.member!r}, "
                    f"round {reply.round}"
                )
            parsed: list[tuple[dict[str, dict[str, shamir.Share]], str, shamir.Share]] = []
            for revealed, asked, into in (
                (reply.b_shares, requests[holder].survivors, b_shares),
                (reply.s_shares, requests[holder].dropped, s_shares),
            ):
                for owner, data in revealed.items():
                    share = _parse_share(data, self.params.members.index(holder) + 1)
                    if owner not in asked or share is None:
                        raise ProtocolViolation(
                            f"member {holder!r}: revealed an unasked or malformed share "
                            f"of {owner!r}"
                        )
                    parsed.append((into, owner, share))
            for into, owner, share in parsed:  # all of a reply, or (lenient) none of it
                into[owner][holder] = share

        for holder, reply in sorted(replies.items()):
            self._accept(holder, lambda h=holder, r=reply: parse(h, r))

        n = self.params.vector_length
        total = np.zeros(n, dtype=np.uint64)
        for member in sorted(self._masked):
            b = self._reconstruct(
                member,
                "self-mask seed",
                b_shares[member],
                _sha256,
                self._adverts[member].b_commitment,
            )
            total += self._masked[member]
            total -= _prg(b, n)
        for gone in sorted(s_shares):
            raw = self._reconstruct(
                gone, "mask key", s_shares[gone], _public_of, self._adverts[gone].s_pub
            )
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            for other in self._graph[gone]:
                if other in self._masked:  # `other` masked with `gone`: both shared keys
                    mask = _prg(_mask_seed(s_sk, self._adverts[other].s_pub, self.params.round), n)
                    # other added +mask if other < gone, else -mask; undo it
                    if other < gone:
                        total -= mask
                    else:
                        total += mask
        total &= np.uint64((1 << self.params.ring_bits) - 1)
        return torch.from_numpy(total.astype(np.int64))

    # -- helpers

    def _enter(self, stage: str) -> None:
        expected = _SERVER_STAGES[self._stage]
        if stage != expected:
            raise ProtocolViolation(f"{stage}() called out of order, expected {expected}()")
        self._stage += 1

    def _check_known(self, member: str, active: Collection[str], otherwise: str) -> None:
        if member not in self.params.members:
            raise ProtocolViolation(f"member {member!r} is not in round {self.params.round}")
        if member not in active:
            raise ProtocolViolation(f"member {member!r} {otherwise}")

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggAborted(
                f"round {self.params.round}: only {count} members {what}, "
                f"threshold is {self.params.threshold}"
            )

    def _reconstruct(
        self,
        owner: str,
        what: str,
        shares: Mapping[str, shamir.Share],
        fingerprint: Callable[[bytes], bytes],
        commitment: bytes,
    ) -> bytes:
        """The secret behind `shares`, checked against the owner's commitment.

        Tampered shares (some shares disagree with the others) do not cost the secret while the
        honest holders are at least `threshold`: candidate sets of shares -- all but one, then
        random threshold-size subsets -- are tried until one reproduces the commitment. Strict
        sessions raise on any tampering. Lenient ones go on, note the owner in `tampered`, and
        name a holder in `refused` only when it provably lied: its share lies off a polynomial
        that reproduces the commitment and holds at least 2t-2 shares. Fewer than t colluding
        holders (secrecy's own assumption) cannot build such a polynomial: one that differs
        from the owner's but agrees with it at 0 agrees with at most t-2 honest shares. So no
        honest holder is ever named; the price is that liars often go unnamed (a named liar
        keeps its own input in the sum: it is a survivor).
        """
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggAborted(
                f"member {owner!r}: {len(shares)} shares of its {what} arrived, {t} needed"
            )
        value = _combine_checked(list(shares.values()), t, fingerprint, commitment)
        if value is not None:
            return value
        holders = sorted(shares)
        if not self._lenient:
            raise ProtocolViolation(
                f"member {owner!r}: the shares of its {what} disagree (a tampered share)"
            )
        self.tampered.setdefault(owner, what)
        best: set[str] = set()
        for candidate in _share_candidates(holders, t, f"{owner}|{what}|{self.params.round}"):
            points = [shares[h] for h in candidate]
            found = _combine_checked(points, t, fingerprint, commitment)
            if found is None:
                continue
            on_curve = {h for h in holders if shamir.interpolate(points, shares[h].x) == shares[h].y}
            if len(on_curve) > len(best):
                value, best = found, on_curve
            if len(best) >= 2 * t - 2:  # provably the owner's polynomial
                for holder in holders:
                    if holder not in best:
                        why = f"member {holder!r} revealed a tampered share of {owner!r}'s {what}"
                        self.refused.setdefault(holder, why)
                break
        if value is None:
            raise SecAggAborted(
                f"member {owner!r}: no {t} of the {len(shares)} shares of its {what} match its "
                "commitment (tampered shares)"
            )
        return value


def _share_candidates(holders: Sequence[str], t: int, seed: str) -> Iterator[tuple[str, ...]]:
    """Sets of holders whose shares are tried together: all but one (a single liar), then up
    to _MAX_SHARE_SUBSETS random t-subsets, or every t-subset when there are fewer."""
    if len(holders) - 1 >= t:
        for left_out in holders:
            yield tuple(h for h in holders if h != left_out)
    if math.comb(len(holders), t) <= _MAX_SHARE_SUBSETS:
        yield from itertools.combinations(holders, t)
        return
    rng = random.Random(seed)
    for _ in range(_MAX_SHARE_SUBSETS):
        yield tuple(sorted(rng.sample(list(holders), t)))


# ---------------------------------------------------------------- shared primitives


def _verify_advert(
    advert: KeyAdvert, member: str, params: SecAggParams, directory: Mapping[str, Ed25519PublicKey]
) -> None:
    if member not in params.members:
        raise ProtocolViolation(f"member {member!r} is not in round {params.round}")
    if advert.member != member:
        raise ProtocolViolation(f"member {member!r}: advert is labelled {advert.member!r}")
    if advert.round != params.round:
        raise ProtocolViolation(
            f"member {member!r}: advert is for round {advert.round}, this is round {params.round}"
        )
    identity = directory.get(member)
    if identity is None:
        raise ProtocolViolation(f"member {member!r} is not in the key directory")
    sizes = (len(advert.c_pub), len(advert.s_pub), len(advert.b_commitment), len(advert.signature))
    if sizes != (_KEY_BYTES, _KEY_BYTES, 32, _SIGNATURE_BYTES):
        raise ProtocolViolation(f"member {member!r}: advert fields have sizes {sizes}")
    try:
        identity.verify(advert.signature, advert.signed_bytes())
    except InvalidSignature:
        raise ProtocolViolation(f"member {member!r}: advert signature does not verify") from None


def _exchange(private: X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point gives the all-zero secret
        raise ProtocolViolation(f"member {peer!r}: advertised an unusable X25519 key") from None


def _mask_seed(s_sk: X25519PrivateKey, other_s_pub: bytes, round: int) -> bytes:
    shared = _exchange(s_sk, other_s_pub, "peer")
    info = b"fedmoe-secagg-mask" + _round_bytes(round)
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(shared)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _public_of(raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()


def _combine_checked(
    shares: Sequence[shamir.Share],
    threshold: int,
    fingerprint: Callable[[bytes], bytes],
    commitment: bytes,
) -> bytes | None:
    try:
        value = shamir.combine(shares, threshold)
    except shamir.ShamirError:
        return None
    return value if fingerprint(value) == commitment else None


def _parse_share(data: bytes, x: int) -> shamir.Share | None:
    try:
        share = shamir.Share.from_bytes(data)
    except shamir.ShamirError:
        return None
    return share if share.x == x else None


def _round_bytes(round: int) -> bytes:
    return round.to_bytes(8, "big")


def _frame(*parts: bytes | str) -> bytes:
    """Canonical encoding: each part as 4-byte big-endian length then bytes (str as UTF-8)."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _unframe(data: bytes, count: int) -> list[bytes] | None:
    parts: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(data):
            return None
        size = int.from_bytes(data[offset : offset + 4], "big")
        offset += 4
        if offset + size > len(data):
            return None
        parts.append(data[offset : offset + size])
        offset += size
    return parts if offset == len(data) else None
