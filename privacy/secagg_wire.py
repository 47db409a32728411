"""The wire format of secure aggregation: the stage messages and packed ring vectors.

Messages are frozen dataclasses of str/int/bytes that the shells marshal; a masked vector
travels as exactly ceil(n*ring_bits/8) bytes. The protocol is explained in privacy/secagg.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from privacy.secagg import MAX_RING_BITS, InvalidInput, _frame, _round_bytes

_ADVERT_DOMAIN = b"fedmoe-secagg-advert-v1"

U64 = npt.NDArray[np.uint64]


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class KeyAdvert:
    member: str
    round: int
    c_pub: bytes  # X25519, encrypts the shares sent to this member
    s_pub: bytes  # X25519, agrees the pairwise mask seeds
    b_commitment: bytes  # sha256 of the self-mask seed, checked after reconstruction
    signature: bytes  # Ed25519 by the member's identity key over `signed_bytes`

    def signed_bytes(self, session_id: bytes) -> bytes:
        return _frame(
            _ADVERT_DOMAIN,
            session_id,
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
    survivors: frozenset[str]  # the server expects the self-mask share of these
    dropped: frozenset[str]  # and the mask-key share of these (the member derives both itself)
    signatures: Mapping[str, bytes]  # signer -> its signature over the survivor list (all sent)


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
    return torch.from_numpy(unpack_u64(data, bits, n).view(np.int64))  # < 2^62: the same bits


def unpack_u64(data: bytes, bits: int, n: int) -> U64:
    """`unpack` as a numpy uint64 vector, the form the server sums in (mod 2^64)."""
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
        return octets.view("<u8").reshape(n).astype(np.uint64, copy=False)
    # whole words plus one spare, so word+1 is always readable
    padded = data + bytes(-len(data) % 8 + 8)
    words = np.frombuffer(padded, dtype="<u8").astype(np.uint64)
    word, shift = _bit_positions(n, bits)
    low = words[word] >> shift
    high = np.where(shift > 0, words[word + 1] << ((np.uint64(64) - shift) & np.uint64(63)), 0)
    values: U64 = (low | high.astype(np.uint64)) & np.uint64((1 << bits) - 1)
    return values


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
