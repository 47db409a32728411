"""Members run only the operator's own app: FABs signed on the way out, verified by each SuperNode.

A SuperNode executes whatever app bundle (FAB) the SuperLink hands it, next to the member's
private data. Flower's SuperNode can refuse unsigned bundles (`--trusted-entities`: Ed25519
keys; a FAB must carry a signature by one of them over sha256(FAB) and a timestamp), but
open-source Flower 1.41 stores no signatures for an app submitted with `flwr run` (only apps
from Flower's hub carry them). So fedmoe signs where the FAB leaves the operator: the Fleet API
proxy (fedmoe/proxy.py) signs a `get-fab` reply with the operator's app key only when every
file of the FAB is byte-identical to the operator's own checkout of fedmoe (pyproject.toml:
identical as TOML, since `flwr build` reformats it). A bundle anyone else submitted, or the
operator's app with one line changed, goes out unsigned, and every member's SuperNode refuses
to run it ("The FAB could not be verified").

    <certs>/operator/app-signing.key        Ed25519 (OpenSSH), 0600: the proxy's signing key
    <certs>/operator/trusted-entities.yaml  its public key, for every member (`fedmoe join`)

Written here because no library signs Flower FABs for local apps; Flower's own message format
(`create_message_to_sign`) and verification are used as they are.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import tomllib
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.proto.fab_pb2 import GetFabResponse  # type: ignore[attr-defined]
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

from privacy.certs import CertError, CertLayout

KEY_ID = "fedmoe-operator"


def app_key_path(layout: CertLayout) -> Path:
    return layout.root / "operator" / "app-signing.key"


def trusted_entities_path(layout: CertLayout) -> Path:
    return layout.root / "operator" / "trusted-entities.yaml"


def ensure_app_key(layout: CertLayout) -> bool:
    """Create the app-signing key and the members' trusted-entities file if missing; True if new."""
    private, public = app_key_path(layout), trusted_entities_path(layout)
    created = not private.exists()
    if created:
        key = Ed25519PrivateKey.generate()
        private.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    line = load_app_key(private).public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    text = f"{KEY_ID}: '{line.decode()} {KEY_ID}'\n"
    members = layout.root / "members"
    for folder in [public.parent, *(sorted(p for p in members.iterdir() if p.is_dir()) if members.is_dir() else [])]:
        (folder / public.name).write_text(text)  # `-m` members' folders get their copy, as with roster.json
    return created


def load_app_key(path: Path) -> Ed25519PrivateKey:
    """The operator's app-signing key; CertError naming the file for anything else."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"app-signing key {path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CertError(f"app-signing key {path}: not an Ed25519 key")
    return key


def mismatch(fab: bytes, source: Path) -> str | None:
    """Why the FAB is not the operator's checkout at `source`, or None when it is."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        names = [n for n in archive.namelist() if not n.endswith("/") and not n.startswith(".info/")]
        for name in names:
            local = (source / name).resolve()
            if not local.is_relative_to(source.resolve()) or not local.is_file():
                return f"{name} is not in the operator's app"
            data = archive.read(name)
            if name == "pyproject.toml":
                if tomllib.loads(data.decode()) != tomllib.loads(local.read_text()):
                    return "pyproject.toml differs from the operator's"
            elif data != local.read_bytes():
                return f"{name} differs from the operator's"
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, OSError, ValueError) as exc:
        return f"not a readable app bundle ({exc})"
    return None if names else "an empty bundle"


def sign_fab_reply(body: bytes, source: Path, key: Ed25519PrivateKey) -> tuple[bytes, str | None]:
    """A get-fab reply with the operator's signature added when its FAB is the operator's app;
    (the reply as it was, why not) otherwise."""
    reply = GetFabResponse()
    try:
        reply.ParseFromString(body)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError family
        return body, f"unreadable get-fab reply ({type(exc).__name__})"
    why = mismatch(reply.fab.content, source)
    if why is not None:
        return body, why
    signed_at = int(time.time())
    signature = key.sign(create_message_to_sign(hashlib.sha256(reply.fab.content).digest(), signed_at))
    reply.fab.verifications["valid_license"] = KEY_ID
    reply.fab.verifications[KEY_ID] = json.dumps(
        {"signature": base64.urlsafe_b64encode(signature).decode().rstrip("="), "signed_at": signed_at}
    )
    return reply.SerializeToString(), None
