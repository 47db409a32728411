"""The cryptographic primitives both sides of secure aggregation share.

X25519 key agreement, the pairwise mask seed, the AES-CTR mask PRG, the advert check and share
parsing, all built on `cryptography`'s primitives (privacy/secagg.py says why the protocol is
written here).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import shamir
from privacy.secagg import ProtocolViolation, SecAggParams, survivors_bytes
from privacy.secagg_wire import U64, KeyAdvert

_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


def _prg(seed: bytes, n: int) -> U64:
    # AES-256-CTR keystream under a one-use key, read as n little-endian uint64 (arithmetic in
    # uint64 wraps mod 2^64, and 2^ring_bits divides 2^64, so masking at the end is exact)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * n)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8")


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
        identity.verify(advert.signature, advert.signed_bytes(params.session_id))
    except InvalidSignature:
        raise ProtocolViolation(f"member {member!r}: advert signature does not verify") from None


def _exchange(private: X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point gives the all-zero secret
        raise ProtocolViolation(f"member {peer!r}: advertised an unusable X25519 key") from None


def _mask_seed(s_sk: X25519PrivateKey, other_s_pub: bytes, session_id: bytes) -> bytes:
    shared = _exchange(s_sk, other_s_pub, "peer")
    info = b"fedmoe-secagg-mask" + session_id
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(shared)


def _verify_survivors(
    signer: str,
    signature: bytes,
    survivors: Collection[str],
    params: SecAggParams,
    directory: Mapping[str, Ed25519PublicKey],
) -> None:
    """`signer`'s signature over the session's survivor list, or ProtocolViolation."""
    identity = directory.get(signer)
    if signer not in params.members or identity is None:
        raise ProtocolViolation(f"member {signer!r} is not in round {params.round}'s directory")
    if len(signature) != _SIGNATURE_BYTES:
        raise ProtocolViolation(f"member {signer!r}: survivor signature is {len(signature)} bytes")
    try:
        identity.verify(signature, survivors_bytes(params, signer, sorted(survivors)))
    except InvalidSignature:
        raise ProtocolViolation(
            f"member {signer!r}: its signature is not over this survivor list"
        ) from None


def _parse_share(data: bytes, x: int) -> shamir.Share | None:
    try:
        share = shamir.Share.from_bytes(data)
    except shamir.ShamirError:
        return None
    return share if share.x == x else None
