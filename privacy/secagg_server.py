"""The server's side of a secure-aggregation round (privacy/secagg.py has the protocol).

ServerSession routes the stage messages, tracks who is still active, and rebuilds the secrets
that unmask the sum, surviving tampered shares where enough honest holders remain. Masked inputs
are folded into the group's running sum as they arrive (`add_masked`) and not kept: the server
holds one ring vector per group, however many members it has (the sum mod 2^64 does not depend
on the order, so it is the same sum, bit for bit, as adding them all at the end).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import shamir
from privacy.secagg import (
    InvalidInput,
    ProtocolViolation,
    SecAggAborted,
    SecAggParams,
    neighbour_graph,
)
from privacy.secagg_crypto import (
    _mask_seed,
    _parse_share,
    _prg,
    _verify_advert,
    _verify_survivors,
)
from privacy.secagg_wire import U64, KeyAdvert, MaskedInput, UnmaskReply, UnmaskRequest, unpack_u64

_MAX_SHARE_SUBSETS = 4096  # threshold-size subsets tried when a secret's shares disagree

_SERVER_STAGES = (
    "receive_adverts", "receive_shares", "receive_masked", "receive_signatures", "finish", "done",
)


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
        self._masked: set[str] = set()  # A3: who sent a masked input
        self._masked_sum: U64 | None = None  # A3's y summed mod 2^64 as they arrived (the ring is cut at finish)
        self._signatures: dict[str, bytes] = {}  # A4 -> its signature over the survivor list
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

    def add_masked(self, member: str, masked: MaskedInput) -> None:
        """One masked input, as it arrives: checked, added to the group's running sum, not kept."""
        self._expect("receive_masked")
        self._accept(member, lambda: self._take_masked(member, masked))

    def receive_masked(self, inputs: Mapping[str, MaskedInput] | None = None) -> tuple[set[str], set[str]]:
        """Masked inputs in (`inputs`, and those already added one by one); (survivors, dropped) out.

        Survivors sent a masked input; dropped members shared keys but sent none.
        """
        for member, masked in sorted((inputs or {}).items()):
            self.add_masked(member, masked)
        self._enter("receive_masked")
        self._require(len(self._masked), "sent masked inputs")
        return set(self._masked), self._shared - self._masked

    def _take_masked(self, member: str, masked: MaskedInput) -> None:
        self._check_known(member, self._shared, "sent a masked input without sharing keys")
        if member in self._masked:
            raise ProtocolViolation(f"member {member!r}: sent a second masked input")
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
            vector = unpack_u64(masked.packed, self.params.ring_bits, self.params.vector_length)
        except InvalidInput as error:
            raise ProtocolViolation(f"member {member!r}: {error}") from None
        if self._masked_sum is None:
            self._masked_sum = vector  # the first input becomes the running sum
        else:
            self._masked_sum += vector  # wraps mod 2^64, like the sum at finish used to
        self._masked.add(member)

    def receive_signatures(self, signatures: Mapping[str, bytes]) -> dict[str, bytes]:
        """The survivors' signatures over the survivor list in; every valid one out (to each
        signer, with its unmask request). Fewer than `params.min_signers` abort the round."""
        self._enter("receive_signatures")
        survivors = sorted(self._masked)

        def check(signer: str, signature: bytes) -> None:
            self._check_known(signer, self._masked, "signed the survivor list without a masked input")
            _verify_survivors(signer, signature, survivors, self.params, self._directory)

        self._signatures = {
            signer: signature
            for signer, signature in sorted(signatures.items())
            if self._accept(signer, lambda m=signer, x=signature: check(m, x))
        }
        if len(self._signatures) < self.params.min_signers:
            raise SecAggAborted(
                f"round {self.params.round}: only {len(self._signatures)} members signed the "
                f"survivor list, {self.params.min_signers} needed"
            )
        return dict(self._signatures)

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        """What each signer will reveal: b shares of itself and of its surviving inbox senders,
        s_sk shares of its inbox senders that dropped (it derives both from the signed list)."""
        if self._stage != _SERVER_STAGES.index("finish"):
            raise ProtocolViolation(
                f"unmask_requests() called out of order, expected {_SERVER_STAGES[self._stage]}()"
            )
        requests: dict[str, UnmaskRequest] = {}
        for member in sorted(self._signatures):
            senders = {s for s in self._graph[member] if s in self._shared}
            requests[member] = UnmaskRequest(
                self.params.round,
                frozenset((senders & set(self._masked)) | {member}),
                frozenset(senders - set(self._masked)),
                dict(self._signatures),
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
            self._check_known(holder, requests, "sent an unmask reply without signing the survivor list")
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
        total = self._masked_sum if self._masked_sum is not None else np.zeros(n, dtype=np.uint64)
        self._masked_sum = None  # the session is done with it: `total` becomes the sum
        for member in sorted(self._masked):
            b = self._reconstruct(
                member,
                "self-mask seed",
                b_shares[member],
                _sha256,
                self._adverts[member].b_commitment,
            )
            total -= _prg(b, n)
        for gone in sorted(s_shares):
            raw = self._reconstruct(
                gone, "mask key", s_shares[gone], _public_of, self._adverts[gone].s_pub
            )
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            for other in self._graph[gone]:
                if other in self._masked:  # `other` masked with `gone`: both shared keys
                    mask = _prg(_mask_seed(s_sk, self._adverts[other].s_pub, self.params.session_id), n)
                    # other added +mask if other < gone, else -mask; undo it
                    if other < gone:
                        total -= mask
                    else:
                        total += mask
        total &= np.uint64((1 << self.params.ring_bits) - 1)
        return torch.from_numpy(total.astype(np.int64))

    # -- helpers

    def _enter(self, stage: str) -> None:
        self._expect(stage)
        self._stage += 1

    def _expect(self, stage: str) -> None:
        expected = _SERVER_STAGES[self._stage]
        if stage != expected:
            raise ProtocolViolation(f"{stage}() called out of order, expected {expected}()")

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
