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
    masked_input(x, inbox) -> MaskedInput receive_masked()   -> (survivors, dropped)
    sign_survivors(survivors) -> signature receive_signatures() -> every signature, to each signer
    unmask(signatures)     -> UnmaskReply finish(replies)    -> sum of survivors' x

(The server may take masked inputs one at a time as they arrive, add_masked(), then close the
stage with receive_masked(): it keeps only their running sum.)

Who counts after each stage (the *active* sets; each must keep >= threshold members or the round
aborts with SecAggAborted):
  A1  members whose advert arrived and verified;
  A2  members of A1 whose share ciphertexts arrived: only these are masked with. The server gives
      each member of A2 an inbox holding exactly its A2 neighbours, and a member masks with
      exactly the senders in its inbox, so both ends of a pair agree;
  A3  members of A2 whose masked input arrived: the survivors, whose x is in the sum. A2 - A3 are
      the dropped, whose pairwise masks the server rebuilds from their mask keys' shares. A
      survivor that then sends no unmask reply is still in the sum: its b comes from the others.
  A4  members of A3 that signed the survivor list (the consistency check of Bonawitz et al.):
      only these are asked to unmask.

The consistency check. A server that tells each member a different survivor list can collect
b_i from some holders and s_i from others and strip every mask off one member's input (with 3
members and t = 2: tell one member that the other two dropped, and each of those that the
third dropped). So each survivor signs the one survivor list it is shown (once per session),
and unmasks only when it is shown valid signatures over that same list from more than half of
the group's members and at least t of them; it derives what to reveal from that list, not from
anything else the server says. Two members shown different lists would need two disjoint sets
of honest signers, each more than half of the group: there are not enough. A member also
refuses to sign a list shorter than max(t, its own minimum group size), so a server cannot
unmask a sum of fewer members than the member agreed to be hidden among.

Everything signed, encrypted or derived is bound to the session (`SecAggParams.session_id`: the
caller's session name -- fedmoe uses the run and the group --, the round, the graph seed, the
parameters and the member list), so nothing from one group or run can be replayed into another.

Threat model: an honest-but-curious server that may also lie about who survived, plus
member-side refusals of the active attacks that are cheap to see (forged or replayed adverts,
lists of survivors that differ, asked twice). Identity keys come from the consortium's
registration (the caller's directory), so a server cannot invent members. The threshold must
exceed half of each member's share holders.

Written here, not taken from Flower: Flower's SecAgg+ runs only inside its legacy Strategy API
with its own fixed quantization, while fedmoe's round loop and codec quantize themselves.
`cryptography` gives the primitives (X25519, Ed25519, HKDF, AES-GCM, AES-CTR); no library gives
the protocol. Pure code: no Flower, no I/O, no pickle; messages are frozen dataclasses of
str/int/bytes that the shells marshal.

The protocol lives in five modules, one idea each:
  secagg.py         this core: parameters, errors, the neighbour graph, ring sizing, and the
                    canonical framing every signed, hashed or encrypted byte string uses;
  secagg_wire.py    the stage messages and the bit-packing of ring vectors;
  secagg_crypto.py  key agreement, mask seeds, the mask PRG, advert checks, share parsing;
  secagg_member.py  MemberSession, a member's side of one round;
  secagg_server.py  ServerSession, the server's side of one round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from privacy import shamir

MAX_RING_BITS = 62  # sums of two ring elements stay below 2^63: no int64 overflow anywhere
_GRAPH_DOMAIN = b"fedmoe-secagg-graph-v1"
_SESSION_DOMAIN = b"fedmoe-secagg-session-v1"
_SURVIVORS_DOMAIN = b"fedmoe-secagg-survivors-v1"


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
    session: str = ""  # the caller's name for this session (fedmoe: run and group), bound into every key

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
    def session_id(self) -> bytes:
        """What every signature, share encryption and mask seed of the session is bound to."""
        return hashlib.sha256(
            _frame(
                _SESSION_DOMAIN, self.session, _round_bytes(self.round), self.graph_seed,
                _round_bytes(self.threshold), _round_bytes(self.neighbours),
                _round_bytes(self.ring_bits), _round_bytes(self.vector_length), *self.members,
            )
        ).digest()

    @property
    def min_signers(self) -> int:
        """Signatures over the survivor list a member needs before it unmasks: more than half of
        the group (two lists cannot both gather that many honest signers) and at least t."""
        return max(self.threshold, len(self.members) // 2 + 1)

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


# ---------------------------------------------------------------- canonical encoding


def _round_bytes(round: int) -> bytes:
    return round.to_bytes(8, "big")


def survivors_bytes(params: SecAggParams, signer: str, survivors: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency check: the session, its own name (a signature
    counts for its signer only) and the sorted survivor list."""
    return _frame(_SURVIVORS_DOMAIN, params.session_id, signer, *sorted(survivors))


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
