"""`fedmoe certs` (privacy/certs.py) and the input checks of `fedmoe join` / `fedmoe serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from privacy.certs import CertError, CertLayout, check_member_key, issue

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_issue_writes_a_ca_a_server_certificate_and_member_keys_with_safe_permissions(tmp_path: Path) -> None:
    issued = issue(tmp_path / "certs", ["acme", "globex"], hostnames=["link.example.org", "10.0.0.7"])
    layout = issued.layout
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    # the server certificate is signed by the CA and names every address members will dial
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.7"}
    for private in (layout.ca_key, layout.server_key, layout.member_key("acme"), layout.member_key("globex")):
        assert _mode(private) == 0o600, private
    for public in (layout.ca_cert, layout.server_cert, layout.operator_ca, layout.member_ca("acme"),
                   layout.member_public_key("acme"), layout.registered_key("acme")):
        assert _mode(public) == 0o644, public
    assert layout.registered_members() == ["acme", "globex"]


def test_member_keys_are_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    layout = issue(tmp_path / "certs", ["acme"]).layout
    key = serialization.load_ssh_private_key(layout.member_key("acme").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert layout.registered_key("acme").read_text().startswith("ecdsa-sha2-nistp256 ")
    assert try_load_public_key(layout.registered_key("acme"))  # what `flwr supernode register` reads
    assert check_member_key(layout.member_key("acme")) == layout.member_key("acme").resolve()


def test_running_again_keeps_everything_and_adds_new_members_under_the_same_ca(tmp_path: Path) -> None:
    first = issue(tmp_path / "certs", ["acme"])
    before = {p: p.read_bytes() for p in first.written}
    second = issue(tmp_path / "certs", ["acme", "initech"])
    assert all(p.read_bytes() == data for p, data in before.items())
    assert {p.name for p in second.written} == {"auth_key", "auth_key.pub", "initech.pub", "ca.pem"}
    assert second.layout.member_ca("initech").read_bytes() == first.layout.ca_cert.read_bytes()


@pytest.mark.parametrize("name", ["../evil", "a b", "", "x" * 65])
def test_bad_member_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertError, match="member"):
        issue(tmp_path / "certs", [name])


def test_member_key_checks_name_the_file_and_the_problem(tmp_path: Path) -> None:
    layout = issue(tmp_path / "certs", ["acme"]).layout
    with pytest.raises(CertError, match="not found"):
        check_member_key(tmp_path / "missing")
    loose = tmp_path / "loose"
    loose.write_bytes(layout.member_key("acme").read_bytes())
    loose.chmod(0o644)
    with pytest.raises(CertError, match=r"loose: permissions 0o644 are too open"):
        check_member_key(loose)
    edwards = tmp_path / "ed25519"
    edwards.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    edwards.chmod(0o600)
    with pytest.raises(CertError, match="needs an EC"):
        check_member_key(edwards)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmoe.deploy_cmd", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}, timeout=120, check=False)


def _member_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder with one document and a (config-only) base folder, what `join` checks."""
    data, base = tmp_path / "data", tmp_path / "base"
    data.mkdir()
    (data / "docs.jsonl").write_text('{"text": "hello"}\n')
    base.mkdir()
    (base / "config.json").write_text("{}")
    return data, base


def test_join_refuses_missing_or_corrupt_inputs_with_one_line(tmp_path: Path) -> None:
    layout = CertLayout(issue(tmp_path / "certs", ["acme"]).layout.root)
    data, base = _member_inputs(tmp_path)

    def join(**over: str) -> subprocess.CompletedProcess[str]:
        args = {"superlink": "127.0.0.1:1", "member": "acme", "data": str(data), "ca": str(layout.member_ca("acme")),
                "key": str(layout.member_key("acme")), "state-dir": str(tmp_path / "state"), "base": str(base),
                "metrics-port": "0", **over}
        return _cli("join", *[x for k, v in args.items() for x in (f"--{k}", v)])

    cases = {
        "data": ({"data": str(tmp_path / "nope")}, "error: data " + str(tmp_path / "nope") + ": not found"),
        "key": ({"key": str(tmp_path / "nokey")}, "error: member key " + str(tmp_path / "nokey") + ": not found"),
        "ca": ({"ca": str(tmp_path / "noca.pem")}, "error: CA certificate " + str(tmp_path / "noca.pem") + ": not found"),
        "base": ({"base": str(tmp_path)}, "not a model directory"),
    }
    for what, (over, message) in cases.items():
        result = join(**over)
        assert result.returncode == 2, (what, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (what, result.stderr)
    (data / "broken.jsonl").write_text('{"text": oops\n')
    result = join()
    assert result.returncode == 2 and "broken.jsonl: line 1" in result.stderr, result.stderr


def test_serve_refuses_without_member_keys(tmp_path: Path) -> None:
    layout = issue(tmp_path / "certs", []).layout
    result = _cli("serve", "--certs", str(layout.root), "--state", str(tmp_path / "state"))
    assert result.returncode == 2
    assert "no member public keys" in result.stderr


def test_member_side_keys_register_and_revoke_through_the_signed_roster(tmp_path: Path) -> None:
    from privacy.certs import load_cert
    from privacy.roster import Registration, member_keys, register, revoke, roster_path, verify_roster

    layout = issue(tmp_path / "certs", []).layout
    acme, acme_file = member_keys("acme", tmp_path / "acme-node")
    globex, _ = member_keys("globex", tmp_path / "globex-node")
    # the member's private keys stay on its machine; the registration holds public halves only
    assert _mode(tmp_path / "acme-node" / "keys" / "auth_key") == 0o600
    assert _mode(tmp_path / "acme-node" / "identity-ed25519.pem") == 0o600
    assert "PRIVATE" not in acme_file.read_text() and Registration.from_file(acme_file) == acme
    assert register(layout, acme) and register(layout, globex) and not register(layout, acme)
    ca = load_cert(layout.ca_cert)
    roster = verify_roster(roster_path(layout).read_bytes(), ca, "roster")
    assert roster == {"acme": acme.identity, "globex": globex.identity}
    assert layout.registered_members() == ["acme", "globex"]
    # another key under a registered name is refused, not swapped in
    impostor, _ = member_keys("acme", tmp_path / "impostor")
    with pytest.raises(CertError, match="registered with another node key"):
        register(layout, impostor)
    # a roster edited after signing, or signed by another CA, does not verify
    edited = roster_path(layout).read_text().replace(globex.identity.hex(), impostor.identity.hex())
    with pytest.raises(CertError, match="signature does not verify with the consortium CA"):
        verify_roster(edited.encode(), ca, "roster")
    other = issue(tmp_path / "other", []).layout
    with pytest.raises(CertError, match="signature does not verify"):
        verify_roster(roster_path(layout).read_bytes(), load_cert(other.ca_cert), "roster")
    # revocation removes the node key (serve unregisters the node) and the roster entry
    assert revoke(layout, "globex") and not revoke(layout, "globex")
    assert layout.registered_members() == ["acme"]
    assert verify_roster(roster_path(layout).read_bytes(), ca, "roster") == {"acme": acme.identity}


def test_a_registration_file_is_checked_field_by_field(tmp_path: Path) -> None:
    from privacy.roster import Registration, member_keys

    good, path = member_keys("acme", tmp_path / "node")
    cases = {
        '{"member": "../x", "auth_key": "%s", "identity": "%s"}' % (good.auth_key, good.identity.hex()): "is not a member name",
        '{"member": "acme", "auth_key": "%s", "identity": "00ff"}' % good.auth_key: "is 2 bytes, expected 32",
        '{"member": "acme", "auth_key": "ssh-rsa AAAA", "identity": "%s"}' % good.identity.hex(): "auth_key is not an OpenSSH public key",
        '{"member": "acme"}': "unreadable",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(CertError, match=message):
            Registration.from_file(path)


def test_the_server_certificate_is_reissued_when_a_name_is_added(tmp_path: Path) -> None:
    first = issue(tmp_path / "certs", [], hostnames=["link.example.org"]).layout
    before = first.server_cert.read_bytes()
    again = issue(tmp_path / "certs", [], hostnames=["link.example.org"])
    assert not again.reissued and first.server_cert.read_bytes() == before
    added = issue(tmp_path / "certs", [], hostnames=["operator"])
    assert added.reissued == [first.server_cert]
    cert = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    names = {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    assert {"link.example.org", "operator", "localhost", "127.0.0.1"} <= names  # old names kept


def test_join_refuses_a_roster_that_does_not_register_this_member(tmp_path: Path) -> None:
    from privacy.roster import member_keys, register, roster_path

    layout = issue(tmp_path / "certs", []).layout
    register(layout, member_keys("globex", tmp_path / "globex")[0])
    member_keys("acme", tmp_path / "acme")
    data, base = _member_inputs(tmp_path)
    result = _cli("join", "--superlink", "127.0.0.1:1", "--member", "acme", "--data", str(data), "--ca", str(layout.operator_ca),
                  "--key", str(tmp_path / "acme" / "keys" / "auth_key"), "--state-dir", str(tmp_path / "acme"),
                  "--base", str(base), "--metrics-port", "0", "--roster", str(roster_path(layout)))
    assert result.returncode == 2 and "does not list member 'acme'" in result.stderr, result.stderr


def test_names_paths_and_shared_keys_are_refused_where_the_roster_is_built(tmp_path: Path) -> None:
    import json as _json

    from privacy.certs import load_cert
    from privacy.roster import Registration, member_keys, register, revoke, roster_path, sign_roster, verify_roster
    from privacy.certs import _load_key

    layout = issue(tmp_path / "certs", []).layout
    acme, path = member_keys("acme", tmp_path / "acme")
    register(layout, acme)
    # a second name with acme's identity (or node) key: refused, so one signature never counts twice
    with pytest.raises(CertError, match="its identity key is already registered to 'acme'"):
        register(layout, Registration("evil", member_keys("evil", tmp_path / "evil")[0].auth_key, acme.identity))
    with pytest.raises(CertError, match="its node key is already registered to 'acme'"):
        register(layout, Registration("evil", acme.auth_key, member_keys("evil2", tmp_path / "evil2")[0].identity))
    with pytest.raises(CertError, match="have the same identity key"):
        verify_roster(sign_roster(_load_key(layout.ca_key), {"acme": acme.identity, "evil": acme.identity}),
                      load_cert(layout.ca_cert), "roster")
    # a look-alike name with a trailing newline, a list for a name, a path for --revoke
    with pytest.raises(CertError, match="not a member name"):
        sign_roster(_load_key(layout.ca_key), {"acme\n": acme.identity})
    with pytest.raises(CertError, match="not a member name"):
        verify_roster(_json.dumps({"members": {"acme\n": acme.identity.hex()}}).encode(), load_cert(layout.ca_cert), "roster")
    path.write_text(_json.dumps({"member": ["x"], "auth_key": acme.auth_key, "identity": acme.identity.hex()}))
    with pytest.raises(CertError, match="unreadable"):
        Registration.from_file(path)
    (layout.root / "operator" / "keep.pub").write_text("keep")
    with pytest.raises(CertError, match="not a member name"):
        revoke(layout, "../keep")
    assert (layout.root / "operator" / "keep.pub").is_file()
    assert verify_roster(roster_path(layout).read_bytes(), load_cert(layout.ca_cert), "roster") == {"acme": acme.identity}


def test_keys_then_register_through_the_cli_hands_over_public_halves_only(tmp_path: Path) -> None:
    made = _cli("keys", "--member", "acme", "--state-dir", str(tmp_path / "acme"))
    assert made.returncode == 0, made.stderr
    registration = tmp_path / "acme" / "keys" / "acme.registration.json"
    assert str(registration) in made.stderr.replace("\n", "") and "PRIVATE" not in registration.read_text()
    done = _cli("certs", "--out", str(tmp_path / "certs"), "--register", str(registration))
    assert done.returncode == 0 and "member acme: registered" in done.stderr, done.stderr
    layout = CertLayout(tmp_path / "certs")
    assert layout.registered_members() == ["acme"] and not layout.member_dir("acme").exists()  # no member keys here
    assert (layout.root / "operator" / "trusted-entities.yaml").is_file()
    bad = _cli("certs", "--out", str(tmp_path / "certs"), "--revoke", "../ca/ca")
    assert bad.returncode == 2 and len([line for line in bad.stderr.splitlines() if line.strip()]) == 1, bad.stderr
