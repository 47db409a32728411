"""The ledger's signatures: the operator's Ed25519 key, public-key helpers, signed tree heads and
the exact bytes each signature covers.

    tree head   ("fedmoe-sth-v1", size, root, time)
    record row  ("fedmoe-record-v1", index, leaf hash)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.ledger.errors import LedgerError, OperatorKeyError
from server.ledger.merkle import leaf_hash
from server.ledger.records import _HEX64

STH_DOMAIN = b"fedmoe-sth-v1"
RECORD_DOMAIN = b"fedmoe-record-v1"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(pem: bytes | Ed25519PublicKey, source: str = "public key") -> Ed25519PublicKey:
    if isinstance(pem, Ed25519PublicKey):
        return pem
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise OperatorKeyError(
            f"{source}: not a PEM public key ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise OperatorKeyError(f"{source}: not an Ed25519 public key ({type(key).__name__})")
    return key


@dataclass(frozen=True)
class OperatorKey:
    """The operator's Ed25519 signing key, kept as a PEM (PKCS#8) file only its owner can read."""

    private_key: Ed25519PrivateKey

    @classmethod
    def load(cls, path: Path) -> OperatorKey:
        if not path.is_file():
            raise OperatorKeyError(f"{path}: no operator key file")
        mode = path.stat().st_mode & 0o777
        if os.name == "posix" and mode & 0o077:
            raise OperatorKeyError(
                f"{path}: operator key is readable by others (mode {mode:o}); chmod 600 it"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise OperatorKeyError(
                f"{path}: not a PEM private key ({str(exc).splitlines()[0]})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise OperatorKeyError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> OperatorKey:
        """Load the key at `path`, or create one there (mode 0600, never over an existing file)."""
        if path.exists():
            return cls.load(path)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and refuses to replace a key created meanwhile
            except FileExistsError:
                return cls.load(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return cls(key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def _verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SignedTreeHead:
    """The operator's signed statement "the log has `size` records and this Merkle root"."""

    size: int
    root: str  # hex
    time: str  # ISO-8601 UTC
    signature: str  # hex Ed25519 signature over signed_bytes()
    key_id: str  # hex sha256 of the raw public key

    def signed_bytes(self) -> bytes:
        return sth_bytes(self.size, self.root, self.time)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        try:
            signature = bytes.fromhex(self.signature)
        except ValueError:
            return False
        return self.key_id == key_id_of(public_key) and _verify_signature(
            public_key, signature, self.signed_bytes()
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> SignedTreeHead:
        if not isinstance(obj, dict) or set(obj) != {f.name for f in fields(cls)}:
            raise LedgerError("tree head: expected keys size, root, time, signature, key_id")
        size, root_hex = obj["size"], obj["root"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LedgerError(f"tree head: size {size!r} is not an integer >= 0")
        if not isinstance(root_hex, str) or not _HEX64.fullmatch(root_hex):
            raise LedgerError(f"tree head: root {root_hex!r} is not 64 lowercase hex digits")
        for name in ("time", "signature", "key_id"):
            if not isinstance(obj[name], str):
                raise LedgerError(f"tree head: {name} {obj[name]!r} is not a string")
        return cls(**obj)


def sth_bytes(size: int, root_hex: str, time: str) -> bytes:
    """What a tree head's signature covers: domain, size, root, time, newline-separated."""
    return b"\n".join([STH_DOMAIN, str(size).encode(), root_hex.encode(), time.encode()])


def record_signing_bytes(index: int, leaf: bytes) -> bytes:
    """What a record row's signature covers: domain, position, leaf hash."""
    return b"\n".join([RECORD_DOMAIN, str(index).encode(), leaf_hash(leaf).hex().encode()])
