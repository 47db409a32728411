"""Who is calling the hub, and whether a release manifest is the operator's.

Members authenticate to the hub with short-lived tokens signed by the Ed25519 identity key they
registered (privacy/roster.py), not with TLS client certificates:
- the keys already exist: every member made its identity key on its own machine and the
  consortium CA signed the roster that lists it; the CA issues no client certificates, and
  adding them would be a second registration to keep in step with the first;
- revocation is the roster's: `fedmoe certs --revoke` re-signs the roster without the member,
  and the hub, which reads the roster on every change, refuses it from the next call;
- a token survives a TLS-terminating proxy in front of the hub, where a client certificate ends.

A token is one call's: it names the member, the hub it is for (the consortium CA's SHA-256
fingerprint, so a token for one consortium's hub is worthless at another's), the gRPC method,
a random nonce and an expiry at most TOKEN_LIFETIME after its issue. The hub accepts each nonce
once (server/hub.py keeps them until they expire), so even whoever sees a token inside TLS (a
terminating proxy) cannot spend it again.

    authorization: fedmoe-v1 <base64url(JSON claims)>.<base64url(signature)>
    signature = Ed25519(member identity key, TOKEN_DOMAIN + claims JSON)

A release manifest is canonical JSON signed with the operator's Ed25519 key (the ledger's key):
Ed25519(operator key, MANIFEST_DOMAIN + manifest JSON). Members check it with the operator's
public key (`fedmoe ledger public-key`) before they use any pulled byte.

No library issues or checks tokens of this shape for an Ed25519 key in a CA-signed roster (JWT
libraries want their own key distribution); `cryptography` gives the primitives.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.certs import MEMBER_NAME

SCHEME = "fedmoe-v1"
TOKEN_DOMAIN = b"fedmoe-hub-token-v1\n"
MANIFEST_DOMAIN = b"fedmoe-release-manifest-v1\n"
TOKEN_LIFETIME = 60.0  # seconds a token is good for
CLOCK_SKEW = 30.0  # seconds a member's clock may run ahead of the hub's
MAX_TOKEN_BYTES = 2048


class AuthError(ValueError):
    """A token that does not prove who calls: the message says what is wrong with it."""


def hub_audience(ca_cert: x509.Certificate) -> str:
    """The hub a token is for: the consortium CA's SHA-256 fingerprint, hex."""
    return ca_cert.fingerprint(hashes.SHA256()).hex()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(member: str, key: Ed25519PrivateKey, audience: str, method: str, *, now: float | None = None) -> str:
    """The `authorization` value for one call of `method` by `member`."""
    issued = time.time() if now is None else now
    claims = json.dumps({"aud": audience, "exp": round(issued + TOKEN_LIFETIME, 3), "iat": round(issued, 3),
                         "member": member, "method": method, "nonce": secrets.token_hex(16)},
                        sort_keys=True, separators=(",", ":")).encode()
    return f"{SCHEME} {_b64(claims)}.{_b64(key.sign(TOKEN_DOMAIN + claims))}"


@dataclass(frozen=True)
class Caller:
    member: str
    method: str
    nonce: str  # the hub refuses a nonce it has seen before the token's expiry
    expires: float


def check_token(value: str | None, roster: Mapping[str, bytes], audience: str, method: str,
                *, now: float | None = None) -> Caller:
    """The member a token proves, or AuthError: `roster` maps registered members to their raw
    Ed25519 keys (privacy/roster.verify_roster, the CA's signature already checked)."""
    if not value:
        raise AuthError(f"no token: send `authorization: {SCHEME} ...` signed with your identity key (fedmoe pull does)")
    if len(value) > MAX_TOKEN_BYTES:
        raise AuthError(f"token of {len(value)} bytes, at most {MAX_TOKEN_BYTES}")
    scheme, _, body = value.partition(" ")
    if scheme != SCHEME or body.count(".") != 1:
        raise AuthError(f"not a {SCHEME} token")
    encoded, signature = body.split(".")
    try:
        claims_bytes, signature_bytes = _unb64(encoded), _unb64(signature)
        claims = json.loads(claims_bytes)
    except (ValueError, binascii.Error, RecursionError):
        raise AuthError("token is not base64url JSON") from None
    if not isinstance(claims, dict) or set(claims) != {"aud", "exp", "iat", "member", "method", "nonce"}:
        raise AuthError("token claims must be exactly aud, exp, iat, member, method, nonce")
    member = claims["member"]
    if not isinstance(member, str) or not MEMBER_NAME.match(member):
        raise AuthError("token names no valid member")
    key = roster.get(member)
    if key is None:
        raise AuthError(f"member {member!r} is not in the consortium's roster (never registered, or revoked)")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature_bytes, TOKEN_DOMAIN + claims_bytes)
    except (InvalidSignature, ValueError):
        raise AuthError(f"token for {member!r} is not signed with its registered identity key") from None
    if claims["aud"] != audience:
        raise AuthError(f"token for {member!r} is for another consortium's hub")
    if claims["method"] != method:
        raise AuthError(f"token for {member!r} was made for {str(claims['method'])[:80]!r}, not {method!r}")
    issued, expires = claims["iat"], claims["exp"]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (issued, expires)):
        raise AuthError("token times must be numbers")
    clock = time.time() if now is None else now
    if not (issued - CLOCK_SKEW <= clock <= expires and expires - issued <= TOKEN_LIFETIME + 1e-3):
        raise AuthError(f"token for {member!r} has expired or is not yet valid (check the member's clock)")
    nonce = claims["nonce"]
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise AuthError(f"token for {member!r} has no valid nonce")
    return Caller(member, method, nonce, float(expires))


# ---------------------------------------------------------------- release manifests


def manifest_bytes(manifest: Mapping[str, object]) -> bytes:
    """The canonical JSON a manifest is signed as."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: Mapping[str, object], sign) -> tuple[bytes, bytes]:  # noqa: ANN001  (OperatorKey.sign)
    raw = manifest_bytes(manifest)
    return raw, sign(MANIFEST_DOMAIN + raw)


def verify_manifest(raw: bytes, signature: bytes, operator_public_pem: bytes) -> dict:
    """The manifest, if `signature` is the operator's over exactly `raw`; AuthError otherwise."""
    try:
        key = serialization.load_pem_public_key(operator_public_pem)
    except (ValueError, TypeError) as exc:
        raise AuthError(f"the operator's public key is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuthError("the operator's public key is not Ed25519")
    try:
        key.verify(signature, MANIFEST_DOMAIN + raw)
    except InvalidSignature:
        raise AuthError("the release manifest's signature does not verify with the operator's key: not used") from None
    manifest = json.loads(raw)
    if not isinstance(manifest, dict):
        raise AuthError("the release manifest is not a JSON object")
    return manifest


def key_id(public_pem: bytes) -> str:
    """SHA-256 of the raw Ed25519 public key, hex (server/ledger's key id)."""
    key = serialization.load_pem_public_key(public_pem)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
