"""The consistency check and session binding: a server that lies about who survived, or replays
messages across sessions, learns nothing about a single member's input."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import shamir
from privacy.secagg import InvalidInput, ProtocolViolation, SecAggParams
from privacy.secagg_crypto import _mask_seed, _prg
from privacy.secagg_member import MemberSession
from privacy.secagg_server import ServerSession
from privacy.secagg_wire import UnmaskReply, unpack

from tests.privacy.test_secagg import consortium, make_params, random_inputs


def masked_round(n: int, t: int, **session_args: int) -> tuple[SecAggParams, dict[str, MemberSession], ServerSession, dict[str, torch.Tensor], dict[str, bytes]]:
    """Everybody advertised, shared and masked (complete graph); the server holds every y."""
    members, keys, directory = consortium(n)
    params = make_params(members, t, n - 1)
    sessions = {m: MemberSession(params, m, keys[m], directory, **session_args) for m in members}
    server = ServerSession(params, directory)
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    inboxes = server.receive_shares({m: sessions[m].share_keys(forwarded[m]) for m in members})
    inputs = random_inputs(params)
    masked = {m: sessions[m].masked_input(inputs[m], inboxes[m]) for m in members}
    server.receive_masked(masked)
    return params, sessions, server, inputs, {m: x.packed for m, x in masked.items()}


def probe(stories: Mapping[str, list[str]], target: str, n: int = 3, t: int = 2) -> int:
    """A server that tells each member its own survivor list, forwards every signature it got
    to everyone, and tries to strip every mask off `target`'s input with what is revealed
    (b of `target`, s of everybody else). Returns how many coordinates it recovered exactly.

    Without the consistency check, n=3, t=2 and the stories {a: [a], b: [a, b], c: [a, c]}
    give b_a from all three, s_b from a and c, s_c from a and b: x_a exactly."""
    params, sessions, _, inputs, packed = masked_round(n, t)
    signatures: dict[str, bytes] = {}
    for member, story in stories.items():
        try:
            signatures[member] = sessions[member].sign_survivors(story)
        except ProtocolViolation:
            pass
    replies: dict[str, UnmaskReply] = {}
    for member in signatures:
        try:
            replies[member] = sessions[member].unmask(signatures)
        except ProtocolViolation:
            pass
    b_shares = [shamir.Share.from_bytes(r.b_shares[target]) for r in replies.values() if target in r.b_shares]
    s_shares = {
        other: [shamir.Share.from_bytes(r.s_shares[other]) for r in replies.values() if other in r.s_shares]
        for other in params.members if other != target
    }
    if len(b_shares) < t or any(len(s) < t for s in s_shares.values()):
        return 0
    y = unpack(packed[target], params.ring_bits, params.vector_length).numpy().astype("<u8")
    y = y - _prg(shamir.combine(b_shares, t), params.vector_length)
    for other, shares in s_shares.items():
        s_sk = X25519PrivateKey.from_private_bytes(shamir.combine(shares, t))
        mask = _prg(_mask_seed(s_sk, sessions[target]._s_sk.public_key().public_bytes_raw(), params.session_id), params.vector_length)
        y = y - mask if target < other else y + mask
    y &= np.uint64((1 << params.ring_bits) - 1)
    return int((torch.from_numpy(y.astype(np.int64)) == inputs[target]).sum())


def test_different_survivor_lists_recover_nothing_of_a_single_member() -> None:
    a, b, c = consortium(3)[0]
    assert probe({a: [a], b: [a, b], c: [a, c]}, a) == 0  # the attack
    for story in stories_for((a, b, c)):  # and the ones that keep every list at the threshold
        assert probe(story, a) == 0, story


@contextmanager
def members_without_the_check() -> Iterator[None]:
    """Members as they were before the consistency check: each reveals whatever its own survivor
    list says (b for the listed, s for the rest) and checks no signature."""

    def naive_sign(self: MemberSession, survivors: list[str]) -> bytes:
        self._survivors = tuple(sorted(survivors))
        return b""

    def naive_unmask(self: MemberSession, signatures: Mapping[str, bytes]) -> UnmaskReply:
        alive = set(self._survivors)
        b_shares = {o: held[0] for o, held in self._held.items() if o in alive}
        s_shares = {o: held[1] for o, held in self._held.items() if o not in alive}
        return UnmaskReply(self.member, self.params.round, {**b_shares, self.member: self._own_b_share}, s_shares)

    saved = MemberSession.sign_survivors, MemberSession.unmask
    MemberSession.sign_survivors, MemberSession.unmask = naive_sign, naive_unmask  # type: ignore[method-assign]
    try:
        yield
    finally:
        MemberSession.sign_survivors, MemberSession.unmask = saved  # type: ignore[method-assign]


# the attack (a is told the others dropped, each of them that the third dropped), and
# an adversary that keeps every list at the threshold (n = 3, t = 2, target a)
STORIES = (("a", "b", "c"), ("a", "a b", "a c")), (("a", "b", "c"), ("a b", "a b", "a c")), (("a", "b", "c"), ("a c", "a b", "a c"))


def stories_for(members: tuple[str, ...]) -> list[dict[str, list[str]]]:
    """STORIES with the letters a, b, c replaced by `members`."""
    named = dict(zip("abc", members))
    return [{named[m]: [named[x] for x in told.split()] for m, told in zip(who, lists)} for who, lists in STORIES]


def test_the_probe_recovers_the_input_from_members_without_the_check() -> None:
    """The probe is a real attack: members that reveal whatever their own list says (the
    protocol before the consistency check) hand it the target's input, every coordinate."""
    a, b, c = consortium(3)[0]
    with members_without_the_check():
        assert probe({a: [a], b: [a, b], c: [a, c]}, a) == 64  # make_params' vector length
    assert [probe(story, a) for story in stories_for((a, b, c))] == [0, 0, 0]  # restored


def test_consistent_lists_unmask_and_the_sum_is_exact() -> None:
    params, sessions, server, inputs, _ = masked_round(4, 3)
    survivors = list(params.members)
    forwarded = server.receive_signatures({m: s.sign_survivors(survivors) for m, s in sessions.items()})
    replies = {m: sessions[m].unmask(r.signatures) for m, r in server.unmask_requests().items()}
    total = server.finish(replies)
    expected = sum(inputs.values()) & ((1 << params.ring_bits) - 1)
    assert set(forwarded) == set(survivors) and torch.equal(total, expected)


def test_a_member_refuses_to_sign_a_list_it_cannot_stand_behind() -> None:
    params, sessions, _, _, _ = masked_round(5, 3, min_survivors=4)
    a, b, c, d, _e = params.members
    with pytest.raises(ProtocolViolation, match=f"member '{a}': survivor list leaves out this member"):
        sessions[a].sign_survivors([b, c, d, _e])
    with pytest.raises(ProtocolViolation, match=f"member '{b}': survivor list names 'nobody'"):
        sessions[b].sign_survivors([b, c, "nobody"])
    with pytest.raises(ProtocolViolation, match="survivor list has 3 members; this member unmasks no sum of fewer than 4"):
        sessions[c].sign_survivors([a, b, c])  # >= t = 3, but under the member's own minimum
    with pytest.raises(ProtocolViolation, match=r"sign_survivors\(\) called out of order"):
        sessions[c].sign_survivors([a, b, c, d])  # a refusal ends the session: no second try


def test_unmask_needs_enough_valid_signatures_over_the_list_it_signed() -> None:
    params, sessions, _, _, _ = masked_round(5, 3)
    members = list(params.members)
    a, b, c, d, e = members
    signed = {m: sessions[m].sign_survivors(members if m != e else [a, b, e]) for m in members}
    over_all = {m: signed[m] for m in (a, b, c, d)}
    with pytest.raises(ProtocolViolation, match=f"member '{e}': its signature is not over this survivor list"):
        sessions[a].unmask({**over_all, e: signed[e]})  # e signed another list
    with pytest.raises(ProtocolViolation, match=f"member '{b}': 2 members signed the survivor list, 3 needed"):
        sessions[b].unmask({b: signed[b], c: signed[c]})
    with pytest.raises(ProtocolViolation, match=f"member '{c}': its own signature is missing"):
        sessions[c].unmask({a: signed[a], b: signed[b], d: signed[d]})
    forged = Ed25519PrivateKey.generate().sign(b"anything")
    with pytest.raises(ProtocolViolation, match=f"member '{a}': its signature is not over this survivor list"):
        sessions[d].unmask({**over_all, a: forged})
    # e signed [a, b, e] and is shown signatures over that list from a and b only -- which a and
    # b never made: the forwarded signatures over the full list do not verify for it
    with pytest.raises(ProtocolViolation, match="its signature is not over this survivor list"):
        sessions[e].unmask({a: signed[a], b: signed[b], e: signed[e]})


def test_a_signed_list_decides_what_is_revealed() -> None:
    params, sessions, _, _, _ = masked_round(4, 3)
    a, b, c, d = params.members
    survivors = [a, b, c]  # d "dropped" (it masked, but the list is the server's word)
    signatures = {m: sessions[m].sign_survivors(survivors) for m in survivors}
    reply = sessions[a].unmask(signatures)
    assert set(reply.b_shares) == {a, b, c} and set(reply.s_shares) == {d}
    with pytest.raises(ProtocolViolation, match=f"member '{a}': unmask already answered"):
        sessions[a].unmask(signatures)


def test_messages_are_bound_to_their_session() -> None:
    members, keys, directory = consortium(3)
    params = make_params(members, 2, 2)
    other = replace(params, session="run-b/0")
    assert params.session_id != other.session_id
    assert params.session_id != replace(params, members=members[:2] + ("zz",)).session_id
    advert = MemberSession(params, members[0], keys[members[0]], directory).advertise()
    server = ServerSession(other, directory)  # same round, same keys, another run or group
    with pytest.raises(ProtocolViolation, match="advert signature does not verify"):
        server.receive_adverts({members[0]: advert})


def test_a_group_with_members_outside_the_directory_is_refused() -> None:
    members, keys, directory = consortium(3)
    invented = make_params(tuple(sorted(members[:1] + ("zz-fake",))), 2, 1)
    with pytest.raises(InvalidInput, match="group member 'zz-fake' is not in the directory"):
        MemberSession(invented, members[0], keys[members[0]], directory)


def test_a_signature_counts_for_its_signer_only_and_shared_keys_are_refused() -> None:
    params, sessions, _, _, _ = masked_round(4, 3)
    a, b, c, d = params.members
    signed = {m: sessions[m].sign_survivors(list(params.members)) for m in (a, b, c)}
    # d never signed: a's signature passed off as d's does not verify
    with pytest.raises(ProtocolViolation, match=f"member '{d}': its signature is not over this survivor list"):
        sessions[b].unmask({**signed, d: signed[a]})
    members, keys, directory = consortium(3)
    twin = {**directory, members[2]: directory[members[1]]}  # two names, one key
    with pytest.raises(InvalidInput, match="two group members share one identity key"):
        MemberSession(make_params(members, 2, 2), members[0], keys[members[0]], twin)
