"""SecAgg+: exact sums under dropouts, uniform-looking masked vectors, refused bad messages."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import TypeVar

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.shamir import PRIME, Share
from privacy.secagg import (
    InvalidInput,
    ProtocolViolation,
    SecAggAborted,
    SecAggParams,
    neighbour_graph,
    ring_bits_for,
)
from privacy.secagg_member import MemberSession
from privacy.secagg_server import ServerSession
from privacy.secagg_wire import KeyAdvert, MaskedInput, UnmaskReply, pack, unpack

SEED = b"fedmoe-test-graph-seed"
T = TypeVar("T")


def consortium(
    n: int,
) -> tuple[tuple[str, ...], dict[str, Ed25519PrivateKey], dict[str, Ed25519PublicKey]]:
    members = tuple(sorted(f"org{i:02d}" for i in range(n)))
    keys = {m: Ed25519PrivateKey.generate() for m in members}
    return members, keys, {m: k.public_key() for m, k in keys.items()}


def make_params(
    members: tuple[str, ...], t: int, k: int, bits: int = 32, length: int = 64
) -> SecAggParams:
    return SecAggParams(
        round=3,
        members=members,
        threshold=t,
        neighbours=k,
        ring_bits=bits,
        vector_length=length,
        graph_seed=SEED,
    )


def random_inputs(
    params: SecAggParams, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    high = 1 << params.ring_bits
    return {
        m: torch.randint(0, high, (params.vector_length,), dtype=torch.int64, generator=generator)
        for m in params.members
    }


def run_round(
    params: SecAggParams,
    keys: Mapping[str, Ed25519PrivateKey],
    directory: Mapping[str, Ed25519PublicKey],
    inputs: Mapping[str, torch.Tensor],
    silent: Collection[str] = (),
    after_advert: Collection[str] = (),
    after_shares: Collection[str] = (),
    after_masked: Collection[str] = (),
    after_signing: Collection[str] = (),
) -> tuple[torch.Tensor, set[str]]:
    """One round as the round loop runs it; members in each collection stop answering from there."""
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in params.members}
    server = ServerSession(params, directory)
    adverts = {m: s.advertise() for m, s in sessions.items() if m not in silent}
    forwarded = server.receive_adverts(adverts)
    shares = {m: sessions[m].share_keys(forwarded[m]) for m in forwarded if m not in after_advert}
    inboxes = server.receive_shares(shares)
    masked = {
        m: sessions[m].masked_input(inputs[m], inboxes[m]) for m in inboxes if m not in after_shares
    }
    survivors, _dropped = server.receive_masked(masked)
    server.receive_signatures(
        {m: sessions[m].sign_survivors(survivors) for m in survivors if m not in after_masked}
    )
    requests = server.unmask_requests()
    replies = {
        m: sessions[m].unmask(r.signatures)
        for m, r in requests.items()
        if m not in after_signing
    }
    return server.finish(replies), survivors


def plain_sum(
    inputs: Mapping[str, torch.Tensor], members: Collection[str], bits: int
) -> torch.Tensor:
    total = torch.zeros_like(next(iter(inputs.values())))
    for m in members:
        total = (total + inputs[m]) & ((1 << bits) - 1)
    return total


# ---------------------------------------------------------------- exactness


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 20), st.integers(1, 2000), st.integers(1, 62), st.data())
def test_unmasked_sum_is_exact(n: int, length: int, bits: int, data: st.DataObject) -> None:
    members, keys, directory = consortium(n)
    k = data.draw(st.integers(2, n))
    degree = min(2 * math.ceil(k / 2), n - 1)
    t = data.draw(st.integers((degree + 1) // 2 + 1, degree + 1))
    params = make_params(members, t, k, bits, length)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    inputs = random_inputs(params, generator)
    # one member may drop after sharing keys when the neighbourhoods can afford it
    spare = degree + 1 - t
    dropped = [members[data.draw(st.integers(0, n - 1))]] if spare >= 1 and n - 1 >= t else []
    total, survivors = run_round(params, keys, directory, inputs, after_shares=dropped)
    assert survivors == set(members) - set(dropped)
    assert torch.equal(total, plain_sum(inputs, survivors, bits))


def test_graph_is_symmetric_deterministic_and_complete_for_large_k() -> None:
    members = tuple(f"m{i}" for i in range(30))
    graph = neighbour_graph(members, 5, SEED)
    assert graph == neighbour_graph(members, 5, SEED)
    assert graph != neighbour_graph(members, 5, b"another-seed-of-16+")
    for member, around in graph.items():
        assert len(around) == 6 and member not in around
        assert all(member in graph[o] for o in around)
    complete = neighbour_graph(members[:6], 5, SEED)
    assert all(len(around) == 5 for around in complete.values())


def test_ring_bits_for() -> None:
    assert ring_bits_for(10, 127) == (2 * 10 * 127).bit_length()
    assert 10 * 2 * 127 < 1 << ring_bits_for(10, 127)
    assert ring_bits_for(1, 0) == 1
    with pytest.raises(InvalidInput, match="> 62"):
        ring_bits_for(1000, 2**60)


# ---------------------------------------------------------------- privacy of one masked vector


def chi_square_top_byte(values: torch.Tensor, bits: int) -> float:
    counts = torch.bincount(values >> (bits - 8), minlength=256).double()
    expected = values.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_vector_looks_uniform() -> None:
    members, keys, directory = consortium(4)
    bits = 24
    params = make_params(members, 3, 3, bits, 1 << 16)
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in members}
    server = ServerSession(params, directory)
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    inboxes = server.receive_shares({m: sessions[m].share_keys(forwarded[m]) for m in members})
    # the update a member sends, quantized into the ring: centred, far from uniform
    quantized = (torch.randn(params.vector_length) * 1000).round().long() + (1 << (bits - 1))
    masked_zeros = sessions[members[0]].masked_input(
        torch.zeros(params.vector_length, dtype=torch.long), inboxes[members[0]]
    )
    masked_update = sessions[members[1]].masked_input(quantized, inboxes[members[1]])
    critical = 377.0  # chi-square, 255 degrees of freedom, p = 1e-6 (Wilson-Hilferty)
    assert chi_square_top_byte(quantized, bits) > critical
    for masked in (masked_zeros, masked_update):
        y = unpack(masked.packed, bits, params.vector_length)
        assert chi_square_top_byte(y, bits) < critical
        assert chi_square_top_byte(y & 0xFF, 8) < critical  # low byte too


# ---------------------------------------------------------------- dropouts


@pytest.fixture(scope="module")
def seven() -> tuple[
    SecAggParams, dict[str, Ed25519PrivateKey], dict[str, Ed25519PublicKey], dict[str, torch.Tensor]
]:
    members, keys, directory = consortium(7)
    params = make_params(members, 3, 4, 20, 500)  # degree 4: 5 holders per member, 3 needed
    return params, keys, directory, random_inputs(params)


Seven = tuple[
    SecAggParams, dict[str, Ed25519PrivateKey], dict[str, Ed25519PublicKey], dict[str, torch.Tensor]
]


def test_drop_after_advertising(seven: Seven) -> None:
    params, keys, directory, inputs = seven
    gone = params.members[2]
    total, survivors = run_round(params, keys, directory, inputs, after_advert=[gone])
    assert survivors == set(params.members) - {gone}
    assert torch.equal(total, plain_sum(inputs, survivors, params.ring_bits))


def test_drop_after_sharing_keys(seven: Seven) -> None:
    params, keys, directory, inputs = seven
    gone = {params.members[0], params.members[4]}
    total, survivors = run_round(params, keys, directory, inputs, after_shares=gone)
    assert survivors == set(params.members) - gone
    assert torch.equal(total, plain_sum(inputs, survivors, params.ring_bits))


def test_drop_after_masked_input_is_still_summed(seven: Seven) -> None:
    params, keys, directory, inputs = seven
    gone = {params.members[1]}
    total, survivors = run_round(params, keys, directory, inputs, after_masked=gone)
    assert survivors == set(params.members)
    assert torch.equal(total, plain_sum(inputs, params.members, params.ring_bits))


@pytest.mark.parametrize("seed", range(4))
def test_masked_inputs_added_as_they_arrive_unmask_to_the_same_sum_as_all_at_once(seed: int) -> None:
    """The server folds each masked input into a running sum as it arrives (add_masked): in any
    arrival order, with a member gone after sharing keys, a malformed input refused and a second
    input refused, the sum is bit for bit the one the server gets from all inputs at once."""
    members, keys, directory = consortium(8)
    params = make_params(members, 5, 7, 20, 300)
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in members}
    at_once, streaming = (ServerSession(params, directory, lenient=True) for _ in range(2))
    adverts = {m: s.advertise() for m, s in sessions.items()}
    forwarded = at_once.receive_adverts(adverts)
    assert streaming.receive_adverts(adverts) == forwarded
    shares = {m: sessions[m].share_keys(forwarded[m]) for m in members}
    inboxes = at_once.receive_shares(shares)
    assert streaming.receive_shares(shares) == inboxes
    inputs = random_inputs(params, torch.Generator().manual_seed(seed))
    gone, bad = members[2], members[5]
    masked = {m: sessions[m].masked_input(inputs[m], inboxes[m]) for m in members if m != gone}
    masked[bad] = MaskedInput(bad, params.round, masked[bad].packed[:-1])  # a byte short: refused
    arrival = list(masked)
    random.Random(seed).shuffle(arrival)
    for member in arrival:
        streaming.add_masked(member, masked[member])
    twice = next(m for m in arrival if m != bad)
    streaming.add_masked(twice, masked[twice])  # a second input: refused, not added twice
    survivors, dropped = at_once.receive_masked(masked)
    assert streaming.receive_masked() == (survivors, dropped) and survivors == set(members) - {gone, bad}
    assert set(streaming.refused) == {bad, twice} and set(at_once.refused) == {bad}
    signatures = {m: sessions[m].sign_survivors(survivors) for m in survivors}
    at_once.receive_signatures(signatures)
    streaming.receive_signatures(signatures)
    requests = at_once.unmask_requests()
    assert streaming.unmask_requests() == requests
    replies = {m: sessions[m].unmask(r.signatures) for m, r in requests.items()}
    total = streaming.finish(replies)
    assert torch.equal(total, at_once.finish(replies))
    assert torch.equal(total, plain_sum(inputs, survivors, params.ring_bits))


def test_drops_at_every_stage_and_before_advertising() -> None:
    members, keys, directory = consortium(10)
    params = make_params(members, 6, 9, 20, 300)  # complete graph: 10 holders, 6 needed
    inputs = random_inputs(params)
    m = params.members
    total, survivors = run_round(
        params,
        keys,
        directory,
        inputs,
        silent=[m[6]],
        after_advert=[m[0]],
        after_shares=[m[3]],
        after_masked=[m[5]],
    )
    assert survivors == set(m) - {m[0], m[3], m[6]}
    assert torch.equal(total, plain_sum(inputs, survivors, params.ring_bits))


def test_too_few_survivors_abort(seven: Seven) -> None:
    params, keys, directory, inputs = seven
    with pytest.raises(SecAggAborted, match="only 2 members sent masked inputs, threshold is 3"):
        run_round(params, keys, directory, inputs, after_shares=params.members[2:])
    with pytest.raises(SecAggAborted, match="only 2 members advertised"):
        run_round(params, keys, directory, inputs, silent=params.members[2:])


def test_too_few_shares_abort() -> None:
    members, keys, directory = consortium(3)
    params = make_params(members, 2, 2)  # complete graph of 3: 3 holders, 2 needed
    inputs = random_inputs(params)
    # two survivors that both sign, but one sends no unmask reply: one share of each secret is short
    with pytest.raises(SecAggAborted, match="1 shares of its"):
        run_round(
            params, keys, directory, inputs, after_shares=[members[0]], after_signing=[members[1]]
        )
    # a survivor that does not sign leaves too few signers: nobody is asked to unmask
    with pytest.raises(SecAggAborted, match="only 1 members signed the survivor list, 2 needed"):
        run_round(
            params, keys, directory, inputs, after_shares=[members[0]], after_masked=[members[1]]
        )


# ---------------------------------------------------------------- refusals


def started(
    n: int = 4,
) -> tuple[SecAggParams, dict[str, MemberSession], ServerSession, dict[str, Ed25519PrivateKey]]:
    members, keys, directory = consortium(n)
    params = make_params(members, 3, 3)
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in members}
    return params, sessions, ServerSession(params, directory), keys


def test_out_of_order_stages() -> None:
    params, sessions, server, _ = started()
    a, b = params.members[:2]
    with pytest.raises(
        ProtocolViolation, match=r"share_keys\(\) called out of order, expected advertise\(\)"
    ):
        sessions[a].share_keys({})
    with pytest.raises(ProtocolViolation, match=r"receive_masked\(\) called out of order"):
        server.receive_masked({})
    with pytest.raises(ProtocolViolation, match=r"sign_survivors\(\) called out of order"):
        sessions[b].sign_survivors([])
    with pytest.raises(ProtocolViolation, match="unmask"):
        sessions[b].unmask({})


def test_forged_advert_signature() -> None:
    params, sessions, server, _ = started()
    a, b = params.members[:2]
    advert = sessions[a].advertise()
    impostor = Ed25519PrivateKey.generate()
    forged = KeyAdvert(
        advert.member,
        advert.round,
        advert.c_pub,
        advert.s_pub,
        advert.b_commitment,
        impostor.sign(advert.signed_bytes(params.session_id)),
    )
    with pytest.raises(ProtocolViolation, match=f"member '{a}': advert signature does not verify"):
        server.receive_adverts({a: forged})
    sessions[b].advertise()
    with pytest.raises(ProtocolViolation, match="advert signature does not verify"):
        sessions[b].share_keys({a: forged})


def test_advert_for_another_round() -> None:
    params, sessions, server, keys = started()
    a = params.members[0]
    advert = sessions[a].advertise()
    replayed = KeyAdvert(a, params.round - 1, advert.c_pub, advert.s_pub, advert.b_commitment, b"")
    replayed = KeyAdvert(
        a,
        replayed.round,
        replayed.c_pub,
        replayed.s_pub,
        replayed.b_commitment,
        keys[a].sign(replayed.signed_bytes(params.session_id)),
    )
    with pytest.raises(ProtocolViolation, match="advert is for round 2, this is round 3"):
        server.receive_adverts({a: replayed})


def test_unknown_member() -> None:
    params, _, server, _ = started()
    outsider_key = Ed25519PrivateKey.generate()
    with pytest.raises(InvalidInput, match="not in round"):
        MemberSession(
            params, "zz-outsider", outsider_key, {"zz-outsider": outsider_key.public_key()}
        )
    advert = KeyAdvert("zz-outsider", params.round, bytes(32), bytes(32), bytes(32), bytes(64))
    with pytest.raises(ProtocolViolation, match="member 'zz-outsider' is not in round 3"):
        server.receive_adverts({"zz-outsider": advert})


def test_masked_input_from_member_that_shared_no_keys() -> None:
    params, sessions, server, _ = started()
    a = params.members[0]
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    server.receive_shares({m: sessions[m].share_keys(forwarded[m]) for m in params.members[1:]})
    with pytest.raises(
        ProtocolViolation, match=f"member '{a}' sent a masked input without sharing keys"
    ):
        server.receive_masked({a: MaskedInput(a, params.round, bytes(params.packed_bytes))})


def through_masking(n: int = 4) -> tuple[SecAggParams, dict[str, MemberSession], ServerSession]:
    params, sessions, server, _ = started(n)
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    inboxes = server.receive_shares(
        {m: sessions[m].share_keys(forwarded[m]) for m in params.members}
    )
    inputs = random_inputs(params)
    server.receive_masked(
        {m: sessions[m].masked_input(inputs[m], inboxes[m]) for m in params.members}
    )
    return params, sessions, server


def through_unmask(
    n: int, t: int, *, lenient: bool = True, gone: str | None = None
) -> tuple[SecAggParams, dict[str, torch.Tensor], ServerSession, dict[str, UnmaskReply]]:
    """Everybody holds everybody's shares (degree n-1); `gone` shares keys, then drops."""
    members, keys, directory = consortium(n)
    params = make_params(members, t, n - 1)
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in members}
    server = ServerSession(params, directory, lenient=lenient)
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    inboxes = server.receive_shares({m: sessions[m].share_keys(forwarded[m]) for m in members})
    inputs = random_inputs(params)
    survivors, _ = server.receive_masked(
        {m: sessions[m].masked_input(inputs[m], inboxes[m]) for m in members if m != gone}
    )
    server.receive_signatures({m: sessions[m].sign_survivors(survivors) for m in survivors})
    replies = {m: sessions[m].unmask(r.signatures) for m, r in server.unmask_requests().items()}
    return params, {m: x for m, x in inputs.items() if m != gone}, server, replies


def forge(replies: dict[str, UnmaskReply], liar: str, owner: str, delta: int, *, mask_key: bool = False) -> None:
    """`liar` adds `delta` to its share of `owner`'s self-mask seed (or mask key)."""
    reply = replies[liar]
    kind = reply.s_shares if mask_key else reply.b_shares
    share = Share.from_bytes(kind[owner])
    forged = {**kind, owner: Share(share.x, (share.y + delta) % PRIME).to_bytes()}
    replies[liar] = UnmaskReply(liar, reply.round, reply.b_shares if mask_key else forged, forged if mask_key else reply.s_shares)


def test_strict_server_refuses_a_tampered_unmask_share() -> None:
    params, _, server, replies = through_unmask(5, 3, lenient=False)
    a, b = params.members[:2]
    forge(replies, a, b, 1)
    with pytest.raises(ProtocolViolation, match=f"member '{b}': the shares of its self-mask seed disagree"):
        server.finish(replies)


def test_lenient_server_names_a_provable_liar_and_still_sums_exactly() -> None:
    # 9 holders, t=5: the owner's polynomial holds the 8 honest shares >= 2t-2, so the liar is known
    params, inputs, server, replies = through_unmask(9, 5)
    liar, victim = params.members[0], params.members[4]
    forge(replies, liar, victim, 12345)
    total = server.finish(replies)
    assert torch.equal(total, plain_sum(inputs, list(inputs), params.ring_bits))
    assert set(server.refused) == {liar}
    assert f"tampered share of {victim!r}'s self-mask seed" in server.refused[liar]
    assert server.tampered == {victim: "self-mask seed"}


def test_tampered_mask_key_shares_of_a_dropped_member_still_unmask() -> None:
    params, inputs, server, replies = through_unmask(10, 6, gone="org09")
    forge(replies, params.members[3], "org09", 7, mask_key=True)
    total = server.finish(replies)
    assert torch.equal(total, plain_sum(inputs, list(inputs), params.ring_bits))
    assert server.tampered == {"org09": "mask key"}
    assert server.refused == {}  # 8 honest of 9 holders < 2t-2 = 10: the liar cannot be proven


def test_colluding_liars_cannot_get_an_honest_holder_named() -> None:
    # 6 holders, t=4, three colluding liars add E(x) = x (x - xa) (x - xb) to their shares: E(0) = 0,
    # so the forged polynomial passes the commitment and holds 5 shares (the liars and the two
    # honest holders at xa, xb) against the owner's 3. Trusting the larger one would name the
    # third honest holder; the 2t-2 rule names nobody.
    params, inputs, server, replies = through_unmask(6, 4)
    owner = params.members[5]
    liars = params.members[:3]
    xa, xb = 4, 5  # coordinates of members[3], members[4]
    for liar in liars:
        x = params.members.index(liar) + 1
        forge(replies, liar, owner, x * (x - xa) * (x - xb))
    total = server.finish(replies)
    assert torch.equal(total, plain_sum(inputs, list(inputs), params.ring_bits))
    assert server.refused == {}
    assert server.tampered == {owner: "self-mask seed"}


def test_a_liar_among_many_holders_is_survived_whichever_it_is() -> None:
    # 17 holders, t=12: C(17, 12) = 6188 subsets, more than are tried; all-but-one finds it
    params, inputs, server, replies = through_unmask(17, 12)
    forge(replies, params.members[0], params.members[16], 1)
    total = server.finish(replies)
    assert torch.equal(total, plain_sum(inputs, list(inputs), params.ring_bits))


def test_too_many_tampered_shares_abort() -> None:
    params, _, server, replies = through_unmask(6, 4)
    for i, liar in enumerate(params.members[:3]):  # three bad of six: no four shares agree
        forge(replies, liar, params.members[5], i + 1)
    with pytest.raises(SecAggAborted, match="no 4 of the 6 shares of its self-mask seed match"):
        server.finish(replies)


def test_params_validation() -> None:
    members = ("a", "b", "c", "d", "e")
    with pytest.raises(InvalidInput, match="threshold 2 must be in 3..5"):
        make_params(members, 2, 4)
    with pytest.raises(InvalidInput, match="threshold 6"):
        make_params(members, 6, 4)
    with pytest.raises(InvalidInput, match="sorted"):
        make_params(("b", "a", "c"), 2, 2)
    with pytest.raises(InvalidInput, match="ring_bits 63"):
        make_params(members, 3, 4, bits=63)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 63))
def test_pack_round_trip(bits: int) -> None:
    for n in (1, 7, 1001):
        values = torch.randint(0, 1 << bits, (n,), dtype=torch.int64)
        values[0] = (1 << bits) - 1
        data = pack(values, bits)
        assert len(data) == math.ceil(n * bits / 8)
        assert torch.equal(unpack(data, bits, n), values)
    with pytest.raises(InvalidInput, match="leave the ring"):
        pack(torch.tensor([1 << bits]), bits)
    with pytest.raises(InvalidInput, match="expected"):
        unpack(data + b"\x00", bits, n)


# ---------------------------------------------------------------- cost


def test_member_side_cost_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    members, keys, directory = consortium(10)
    params = make_params(members, 4, 5, bits=32, length=200_000)  # degree 6: 7 holders, 4 needed
    inputs = random_inputs(params)
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in members}
    server = ServerSession(params, directory)
    stages = {"advertise": 0.0, "share_keys": 0.0, "masked_input": 0.0, "unmask": 0.0}

    def timed(stage: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = call()
        stages[stage] += time.perf_counter() - start
        return out

    adverts = {m: timed("advertise", s.advertise) for m, s in sessions.items()}
    forwarded = server.receive_adverts(adverts)
    shares = {
        m: timed("share_keys", partial(sessions[m].share_keys, forwarded[m])) for m in members
    }
    inboxes = server.receive_shares(shares)
    masked = {
        m: timed("masked_input", partial(sessions[m].masked_input, inputs[m], inboxes[m]))
        for m in members
    }
    survivors, _ = server.receive_masked(masked)
    server.receive_signatures(
        {m: timed("unmask", partial(sessions[m].sign_survivors, survivors)) for m in members}
    )
    replies = {
        m: timed("unmask", partial(sessions[m].unmask, r.signatures))
        for m, r in server.unmask_requests().items()
    }
    start = time.perf_counter()
    total = server.finish(replies)
    server_s = time.perf_counter() - start
    assert torch.equal(total, plain_sum(inputs, members, params.ring_bits))
    per_member_ms = 1000 * sum(stages.values()) / len(members)
    detail = ", ".join(f"{k} {1000 * v / len(members):.1f}" for k, v in stages.items())
    upload = len(masked[members[0]].packed) / (4 * params.vector_length)
    with capsys.disabled():
        print(
            f"\nsecagg n=10 k=5 (degree 6) t=4 len=200k ring=32: member-side crypto "
            f"{per_member_ms:.1f} ms per member ({detail}), server finish "
            f"{1000 * server_s:.1f} ms, upload {upload:.2f}x of int32"
        )
    assert per_member_ms < 5000


def test_tampered_share_ciphertext_and_wrong_round_input_are_refused() -> None:
    params, sessions, server, _ = started()
    a, b = params.members[:2]
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    inboxes = server.receive_shares(
        {m: sessions[m].share_keys(forwarded[m]) for m in params.members}
    )
    x = torch.zeros(params.vector_length, dtype=torch.int64)
    bad = bytearray(inboxes[a][b])
    bad[-1] ^= 1
    with pytest.raises(
        ProtocolViolation, match=f"member '{a}': share ciphertext from '{b}' does not"
    ):
        sessions[a].masked_input(x, {**inboxes[a], b: bytes(bad)})
    masked = sessions[b].masked_input(x, inboxes[b])
    with pytest.raises(
        ProtocolViolation, match=f"member '{b}': masked input is labelled '{b}', round 4"
    ):
        server.receive_masked({b: MaskedInput(b, params.round + 1, masked.packed)})


def test_shares_to_the_wrong_receivers_are_refused() -> None:
    params, sessions, server, _ = started()
    a, b = params.members[:2]
    forwarded = server.receive_adverts({m: s.advertise() for m, s in sessions.items()})
    shares = sessions[a].share_keys(forwarded[a])
    del shares[b]
    with pytest.raises(ProtocolViolation, match=f"member '{a}': sent shares to"):
        server.receive_shares({a: shares})
