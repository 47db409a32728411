"""The consortium's keys and certificates: a CA, the operator's TLS server certificate and one
SuperNode authentication key pair per member.

    <out>/ca/ca.pem, ca.key                     the consortium CA (keep ca.key offline)
    <out>/operator/server.pem, server.key       the SuperLink's (later the hub's) TLS certificate
    <out>/operator/ca.pem                       the CA, for `flwr` on the operator's machine
    <out>/operator/members/<member>.pub         each member's public key, to register
    <out>/members/<member>/auth_key             the member's SuperNode private key (OpenSSH)
    <out>/members/<member>/auth_key.pub         its public key (OpenSSH, ecdsa-sha2-nistp256)
    <out>/members/<member>/ca.pem               the CA the member verifies the SuperLink with

Flower 1.41 authenticates SuperNodes with EC keys on a NIST curve: `flower-supernode
--auth-supernode-private-key` loads an OpenSSH private key, `flwr supernode register` an
OpenSSH public key. Every key here is EC P-256. Private keys are written 0600, everything else
0644; nothing that exists is overwritten, so running again adds members under the same CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: no trailing newline
PRIVATE, PUBLIC = 0o600, 0o644


class CertError(ValueError):
    """A name, hostname or existing file is not usable for the consortium's certificates."""


@dataclass(frozen=True)
class CertLayout:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "operator" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "operator" / "server.key"

    @property
    def operator_ca(self) -> Path:
        return self.root / "operator" / "ca.pem"

    def registered_key(self, member: str) -> Path:
        return self.root / "operator" / "members" / f"{member}.pub"

    def member_dir(self, member: str) -> Path:
        return self.root / "members" / member

    def member_key(self, member: str) -> Path:
        return self.member_dir(member) / "auth_key"

    def member_public_key(self, member: str) -> Path:
        return self.member_dir(member) / "auth_key.pub"

    def member_ca(self, member: str) -> Path:
        return self.member_dir(member) / "ca.pem"

    def registered_members(self) -> list[str]:
        folder = self.root / "operator" / "members"
        return sorted(p.stem for p in folder.glob("*.pub")) if folder.is_dir() else []


@dataclass(frozen=True)
class Issued:
    """What `issue` wrote (new) and found (kept), for the hand-over table."""

    layout: CertLayout
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    reissued: list[Path] = field(default_factory=list)  # replaced: the server's names changed


def _write(path: Path, data: bytes, mode: int, issued: Issued) -> None:
    """Create `path` with `mode` from the start (no window with wider permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # umask may have narrowed a public file
    issued.written.append(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertError(f"{path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: expected an EC private key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"{path}: not a readable PEM certificate ({exc})") from None


def _san(hostnames: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["127.0.0.1", "localhost", *hostnames]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
                raise CertError(f"hostname {host!r}: not a DNS name or IP address") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _ca(
    layout: CertLayout, consortium: str, days: int, issued: Issued
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if layout.ca_cert.exists() and layout.ca_key.exists():
        issued.kept.extend([layout.ca_cert, layout.ca_key])
        return _load_key(layout.ca_key), load_cert(layout.ca_cert)
    if layout.ca_cert.exists() or layout.ca_key.exists():
        raise CertError(
            f"{layout.root / 'ca'}: has only one of ca.pem and ca.key; remove it or restore the other"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{consortium} consortium CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(layout.ca_key, _pem_key(key), PRIVATE, issued)
    _write(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC, issued)
    return key, cert


def _server(
    layout: CertLayout,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    days: int,
    issued: Issued,
) -> None:
    if layout.server_cert.exists() and layout.server_key.exists():
        try:
            had = list(load_cert(layout.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            had = []  # a certificate without names: reissued with them
        wanted = _san([str(name.value) for name in had] + list(hostnames))  # names are only ever added
        if had and set(had) == set(wanted):
            issued.kept.extend([layout.server_cert, layout.server_key])
            return
        issued.reissued.append(layout.server_cert)  # a new name: a new certificate, the old names kept
        hostnames = [str(name.value) for name in wanted]
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, ([h for h in hostnames if h not in ("127.0.0.1", "localhost")] or ["localhost"])[0])]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # the new pair is written beside the old and renamed over it: a crash never leaves neither
    for path, data, mode in ((layout.server_key, _pem_key(key), PRIVATE),
                             (layout.server_cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC)):
        fresh = path.with_name(path.name + ".new")
        fresh.unlink(missing_ok=True)
        _write(fresh, data, mode, issued)
        os.replace(fresh, path)
        issued.written[-1] = path


def _member(layout: CertLayout, member: str, ca_pem: bytes, issued: Issued) -> None:
    if not MEMBER_NAME.match(member):
        raise CertError(f"member {member!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    private, public = layout.member_key(member), layout.member_public_key(member)
    if private.exists():
        issued.kept.append(private)
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(
            private,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            PRIVATE,
            issued,
        )
    openssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = openssh + f" fedmoe-{member}\n".encode()
    for path in (public, layout.registered_key(member)):
        if path.exists():
            if path.read_bytes().split()[:2] != line.split()[:2]:
                raise CertError(f"{path}: does not match {private}; remove the stale public key")
            issued.kept.append(path)
        else:
            _write(path, line, PUBLIC, issued)
    if layout.member_ca(member).exists():
        issued.kept.append(layout.member_ca(member))
    else:
        _write(layout.member_ca(member), ca_pem, PUBLIC, issued)


def issue(
    out: Path,
    members: Sequence[str],
    *,
    hostnames: Sequence[str] = (),
    consortium: str = "fedmoe",
    days: int = 825,
) -> Issued:
    """Create what is missing under `out`: CA, operator server certificate, member key pairs."""
    if days < 1:
        raise CertError(f"days {days}: must be >= 1")
    layout = CertLayout(out.resolve())
    issued = Issued(layout)
    ca_key, ca_cert = _ca(layout, consortium, days, issued)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _server(layout, ca_key, ca_cert, hostnames, days, issued)
    if layout.operator_ca.exists():
        issued.kept.append(layout.operator_ca)
    else:
        _write(layout.operator_ca, ca_pem, PUBLIC, issued)
    for member in members:
        _member(layout, member, ca_pem, issued)
    return issued


def check_readable(path: Path, what: str, *, private: bool = False) -> Path:
    """`path` resolved, or a one-line CertError naming what is wrong with it."""
    if not path.is_file():
        raise CertError(f"{what} {path}: not found")
    if not os.access(path, os.R_OK):
        raise CertError(f"{what} {path}: not readable by this user")
    if private and os.name == "posix" and path.stat().st_mode & 0o077:
        raise CertError(
            f"{what} {path}: permissions {oct(path.stat().st_mode & 0o777)} are too open; chmod 600 it"
        )
    return path.resolve()


def check_member_key(path: Path) -> Path:
    """A SuperNode private key Flower accepts: OpenSSH, EC on a NIST curve, unencrypted."""
    check_readable(path, "member key", private=True)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(
            f"member key {path}: not an unencrypted OpenSSH private key ({exc})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(
            f"member key {path}: Flower needs an EC (NIST P-256/384/521) key, got {type(key).__name__}"
        )
    return path.resolve()


def check_ca(path: Path) -> Path:
    check_readable(path, "CA certificate")
    load_cert(path)
    return path.resolve()
