"""The ledger's Merkle tree: pure RFC 6962 functions over leaves (the root, inclusion and
consistency proofs, and their verification).

RFC 6962 §2.1 (= RFC 9162 §2.1) for the tree hash and the proofs; the verification algorithms are
those of RFC 9162 §2.1.3.2 and §2.1.4.2. The tree is written by hand because no well-kept Python
library implements RFC 6962 inclusion and consistency proofs to fit; it is short, and the tests
check it against a brute-force construction straight from the RFC.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH of the leaves whose leaf hashes are hashes[lo:hi]."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def _path(hashes: Sequence[bytes], m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return _path(hashes, m, lo, lo + k) + [_mth(hashes, lo + k, hi)]
    return _path(hashes, m - k, lo + k, hi) + [_mth(hashes, lo, lo + k)]


def _subproof(hashes: Sequence[bytes], m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if complete else [_mth(hashes, lo, hi)]
    k = _split(n)
    if m <= k:
        return _subproof(hashes, m, lo, lo + k, complete) + [_mth(hashes, lo + k, hi)]
    return _subproof(hashes, m - k, lo + k, hi, False) + [_mth(hashes, lo, lo + k)]


def prefix_roots(hashes: Sequence[bytes]) -> Iterator[bytes]:
    """MTH of hashes[:1], hashes[:2], ... in one pass (a stack of perfect subtrees)."""
    stack: list[tuple[int, bytes]] = []  # (leaf count, hash), counts strictly decreasing
    for h in hashes:
        stack.append((1, h))
        while len(stack) >= 2 and stack[-1][0] == stack[-2][0]:
            (n, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * n, node_hash(left, right)))
        acc = stack[-1][1]
        for _, left in reversed(stack[:-1]):
            acc = node_hash(left, acc)
        yield acc


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash of the leaves (SHA-256 of the empty string for no leaves)."""
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return _mth(hashes, 0, len(hashes))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path of leaf `index` in the tree of all `leaves`, from the leaf upwards."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"inclusion_proof: index {index} outside a tree of size {len(leaves)}")
    return _path([leaf_hash(leaf) for leaf in leaves], index, 0, len(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Proof that the tree of the first `old_size` leaves is a prefix of the tree of all."""
    if not 0 <= old_size <= len(leaves):
        raise ValueError(f"consistency_proof: old size {old_size} outside 0..{len(leaves)}")
    if old_size == 0:
        return []
    return _subproof([leaf_hash(leaf) for leaf in leaves], old_size, 0, len(leaves), True)


def _well_formed(proof: Sequence[bytes], *hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == 32 for h in (*proof, *hashes))


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    if not 0 <= index < size or not _well_formed(proof, root):
        return False
    fn, sn = index, size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and hmac.compare_digest(r, root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    if not 0 <= old_size <= new_size or not _well_formed(proof, old_root, new_root):
        return False
    if old_size == new_size:
        return not proof and hmac.compare_digest(old_root, new_root)
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof:
        return False
    path = list(proof)
    if (
        old_size & (old_size - 1) == 0
    ):  # the old tree is a complete subtree: its root starts the path
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and hmac.compare_digest(fr, old_root) and hmac.compare_digest(sr, new_root)
