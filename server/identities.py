"""Members' long-term Ed25519 identity keys for secure aggregation, pinned by the operator."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregation.codec import UpdateRejected


class Identities:
    """Members' long-term Ed25519 keys for secure aggregation, pinned on first sight.

    Kept in <workspace>/operator/identities.json (member -> hex). An operator may pre-register
    keys there (e.g. exchanged when a member joins); a member that later shows another key is
    refused for the round, since its secure-aggregation adverts could not be trusted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def pin(self, member: str, key: bytes) -> None:
        if len(key) != 32:
            raise UpdateRejected(f"member {member!r}: identity key is {len(key)} bytes, expected 32 (Ed25519)")
        known = self.keys.get(member)
        if known is not None and known != key.hex():
            raise UpdateRejected(f"member {member!r}: identity key differs from the one pinned in {self.path}")
        if known is None:
            self.keys[member] = key.hex()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.keys, sort_keys=True, indent=1) + "\n")
            tmp.replace(self.path)

    def directory(self) -> dict[str, Ed25519PublicKey]:
        return {m: Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)) for m, h in self.keys.items()}
