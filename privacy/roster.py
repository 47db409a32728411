"""The consortium's roster: every member's secure-aggregation identity key, signed by the CA.

Secure aggregation is only as good as the list of who may be in a group: a server that may
name any key could put one victim in a group with members it invented and read the victim's
update off the "sum". So a member takes group members' identity keys from this roster and from
nothing the server says. The roster is the registration made visible:

    member machine:  fedmoe keys --member NAME --state-dir DIR
                     -> DIR/keys/auth_key (SuperNode key), DIR/identity-ed25519.pem (secure
                        aggregation), DIR/keys/NAME.registration.json (public halves only)
    operator:        fedmoe certs --register NAME.registration.json
                     -> operator/members/NAME.pub (node authentication), operator/roster.json
                        (re-signed with the CA key)
    every member:    gets roster.json and ca.pem; its node verifies the roster's signature with
                     ca.pem before it accepts anybody in a group

    <certs>/operator/roster.json    {"members": {name: Ed25519 key hex}, "signature": hex}

The signature is ECDSA P-256 (SHA-256) by the consortium CA's key over the canonical JSON of
`members`, so the ServerApp, which never holds ca.key (kept offline), cannot add a member. What
this does not stop: whoever holds ca.key can sign any roster; members see every name in it
(the file is plain JSON) and should refuse a roster that names an organization they do not
know. A member whose roster is older than the newest registration refuses groups with the
newcomer (its round log names the stranger) until it gets the new roster. Written here because no library signs a JSON list with an
X.509 CA key in this shape; `cryptography` gives the primitives.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.certs import MEMBER_NAME, CertError, CertLayout, load_cert, _load_key

_DOMAIN = b"fedmoe-roster-v1\n"
IDENTITY = "identity-ed25519.pem"  # the member's secure-aggregation key, in its state dir
_IDENTITY_BYTES = 32


def roster_path(layout: CertLayout) -> Path:
    return layout.root / "operator" / "roster.json"


def _payload(members: Mapping[str, bytes]) -> bytes:
    return _DOMAIN + json.dumps({m: k.hex() for m, k in sorted(members.items())}, sort_keys=True, separators=(",", ":")).encode()


def _check_entries(entries: object, source: str) -> dict[str, bytes]:
    if not isinstance(entries, dict):
        raise CertError(f"{source}: 'members' must map member names to keys")
    out: dict[str, bytes] = {}
    seen: dict[bytes, str] = {}
    for name, raw in entries.items():
        if not isinstance(name, str) or not MEMBER_NAME.match(name):
            raise CertError(f"{source}: {str(name)[:80]!r} is not a member name")
        try:
            key = bytes.fromhex(raw)
        except (TypeError, ValueError):
            raise CertError(f"{source}: the key of {name!r} is not hex") from None
        if len(key) != _IDENTITY_BYTES:
            raise CertError(f"{source}: the key of {name!r} is {len(key)} bytes, expected {_IDENTITY_BYTES} (Ed25519)")
        if key in seen:
            raise CertError(f"{source}: {name!r} and {seen[key]!r} have the same identity key")
        out[name], seen[key] = key, name
    return out


def sign_roster(ca_key: ec.EllipticCurvePrivateKey, members: Mapping[str, bytes]) -> bytes:
    """The roster file's bytes: `members` (name -> raw Ed25519 key) signed by the CA key."""
    _check_entries({m: k.hex() for m, k in members.items()}, "roster")
    signature = ca_key.sign(_payload(members), ec.ECDSA(hashes.SHA256()))
    body = {"members": {m: k.hex() for m, k in sorted(members.items())}, "signature": signature.hex()}
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def verify_roster(raw: bytes, ca_cert: x509.Certificate, source: str) -> dict[str, bytes]:
    """A roster's members, its CA signature checked; CertError naming `source` otherwise."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CertError(f"{source}: not JSON ({exc})") from None
    if not isinstance(data, dict) or "members" not in data:
        raise CertError(f"{source}: no 'members' table")
    members = _check_entries(data["members"], source)
    public = ca_cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertError(f"{source}: the CA key is not EC, cannot check the roster")
    try:
        signature = bytes.fromhex(data.get("signature", ""))
        public.verify(signature, _payload(members), ec.ECDSA(hashes.SHA256()))
    except (TypeError, ValueError, InvalidSignature):
        raise CertError(f"{source}: the roster's signature does not verify with the consortium CA") from None
    return members


# ---------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    """What a member hands the operator: its name and the public halves of its two keys."""

    member: str
    auth_key: str  # OpenSSH public key line (SuperNode authentication, EC P-256)
    identity: bytes  # raw Ed25519 public key (secure aggregation)

    def to_bytes(self) -> bytes:
        body = {"member": self.member, "auth_key": self.auth_key, "identity": self.identity.hex()}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_file(cls, path: Path) -> Registration:
        try:
            data = json.loads(path.read_text())
            member, auth, identity = data["member"], data["auth_key"], data["identity"]
            if not all(isinstance(v, str) for v in (member, auth, identity)):
                raise TypeError("member, auth_key and identity must be strings")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CertError(f"registration {path}: unreadable ({exc})") from None
        [checked] = _check_entries({member: identity}, f"registration {path}").items()
        try:
            key = serialization.load_ssh_public_key(str(auth).encode())
        except (ValueError, TypeError, AttributeError) as exc:
            raise CertError(f"registration {path}: auth_key is not an OpenSSH public key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CertError(f"registration {path}: auth_key must be EC (Flower authenticates SuperNodes with EC keys)")
        return cls(checked[0], " ".join(str(auth).split()[:2]), checked[1])


def _roster(layout: CertLayout) -> dict[str, bytes]:
    path = roster_path(layout)
    if not path.is_file():
        return {}
    return verify_roster(path.read_bytes(), load_cert(layout.ca_cert), str(path))


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def write_roster(layout: CertLayout, members: Mapping[str, bytes]) -> Path:
    """Sign `members` with the CA key into operator/roster.json and each member folder's copy."""
    data = sign_roster(_load_key(layout.ca_key), members)
    _write_public(roster_path(layout), data)
    for member in members:
        if layout.member_dir(member).is_dir():
            _write_public(layout.member_dir(member) / "roster.json", data)
    return roster_path(layout)


def register(layout: CertLayout, registration: Registration) -> bool:
    """Add a member's public keys: operator/members/<name>.pub and its roster entry. True when
    something changed; a name registered with other keys is refused (revoke it first)."""
    pub = layout.registered_key(registration.member)
    line = f"{registration.auth_key} fedmoe-{registration.member}\n".encode()
    roster = _roster(layout)
    known = roster.get(registration.member)
    if pub.exists() and pub.read_bytes().split()[:2] != line.split()[:2]:
        raise CertError(f"member {registration.member!r} is registered with another node key ({pub}); revoke it first")
    if known is not None and known != registration.identity:
        raise CertError(f"member {registration.member!r} is in the roster with another identity key; revoke it first")
    if pub.exists() and known is not None:
        return False
    for name, key in roster.items():
        if key == registration.identity and name != registration.member:
            raise CertError(f"member {registration.member!r}: its identity key is already registered to {name!r}")
    for other in layout.registered_members():
        path = layout.registered_key(other)
        if other != registration.member and path.read_bytes().split()[:2] == line.split()[:2]:
            raise CertError(f"member {registration.member!r}: its node key is already registered to {other!r}")
    _write_public(pub, line)
    write_roster(layout, {**roster, registration.member: registration.identity})
    return True


def revoke(layout: CertLayout, member: str) -> bool:
    """Remove a member's node key and roster entry (`fedmoe serve` then unregisters its node).
    True when it was registered."""
    if not MEMBER_NAME.match(member):
        raise CertError(f"--revoke {member!r}: not a member name")
    pub = layout.registered_key(member)
    roster = _roster(layout)
    found = pub.exists() or member in roster
    pub.unlink(missing_ok=True)
    if member in roster:
        del roster[member]
        write_roster(layout, roster)
    return found


# ---------------------------------------------------------------- key creation


def _create(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` holding all of `data`, unless it exists (False: another process made it).

    A key is written to a temp file beside it, fsynced, linked into place (a link, unlike a
    rename, never replaces what is there) and the folder fsynced: a crash or a full disk leaves
    no key or the whole key, never a torn one that the next start would find and refuse.
    CertError (one line, naming `path`) when the disk refuses the write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        raise CertError(f"{path}: cannot write the key ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return True


def identity_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 identity at `path`, created (0600) when missing. Two processes that create it
    at once agree: a new key is linked into place only if none is there yet."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        _create(path, pem, 0o600)  # False: another process made it first, and that one is used
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        # never replaced by a new key: the roster registers this one, and a member with another
        # key is not the same member (the operator must register it again)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CertError(f"{path}: not a readable PEM private key ({reason}); restore it, or register a new key with the operator") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise CertError(f"{path}: not an Ed25519 private key")
    return loaded


def identity_public(path: Path) -> bytes:
    return identity_key(path).public_key().public_bytes_raw()


def member_keys(member: str, state_dir: Path) -> tuple[Registration, Path]:
    """On the member's machine: its SuperNode key pair (state_dir/keys/auth_key, .pub), its
    secure-aggregation identity (state_dir/identity-ed25519.pem), and the registration file to
    hand the operator (state_dir/keys/<member>.registration.json). Existing keys are kept."""
    if not MEMBER_NAME.match(member):
        raise CertError(f"member {member!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    private = state_dir / "keys" / "auth_key"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        _create(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), 0o600)
    try:
        loaded = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertError(f"{private}: not an OpenSSH private key ({exc})") from None
    line = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    _write_public(private.with_name("auth_key.pub"), f"{line} fedmoe-{member}\n".encode())
    registration = Registration(member, line, identity_public(state_dir / IDENTITY))
    out = state_dir / "keys" / f"{member}.registration.json"
    _write_public(out, registration.to_bytes())
    return registration, out


def operator_side_identities(layout: CertLayout, members: list[str]) -> Path:
    """For `fedmoe certs -m` (keys made on the operator's machine: tests, one-machine demos):
    an identity key in each member's folder, every one in the signed roster."""
    roster = _roster(layout)
    for member in members:
        identity = identity_public(layout.member_dir(member) / IDENTITY)
        if roster.get(member, identity) != identity:
            raise CertError(f"member {member!r} is in the roster with another identity key; revoke it first")
        roster[member] = identity
    return write_roster(layout, roster)
