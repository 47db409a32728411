"""The members' Fleet API proxy: Fleet requests pass as they are, everything else is refused."""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.testclient import TestClient

from fedmoe.proxy import fleet_proxy
from privacy.certs import issue


def _proxy(tmp_path: Path, seen: list[httpx.Request]) -> TestClient:
    ca = issue(tmp_path / "certs", []).layout.operator_ca

    def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"reply:" + request.content, headers={"content-type": "application/protobuf"})

    return TestClient(fleet_proxy("https://127.0.0.1:9", ca, httpx.MockTransport(superlink)))


def test_fleet_requests_are_forwarded_with_their_authentication_headers(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    client = _proxy(tmp_path, seen)
    signed = {"flwr-public-key": "cHVi", "flwr-timestamp": "2026-12-02T00:00:00", "flwr-signature": "c2ln"}
    reply = client.post("/v1/fleet/pull-messages", content=b"\x08\x01", headers=signed)
    assert reply.status_code == 200 and reply.content == b"reply:\x08\x01"
    [forwarded] = seen
    assert forwarded.url == "https://127.0.0.1:9/v1/fleet/pull-messages"
    assert all(forwarded.headers[k] == v for k, v in signed.items())
    assert forwarded.headers["host"] == "127.0.0.1:9"  # the SuperLink's own, not the members' name


def test_the_control_api_and_anything_but_fleet_posts_are_refused(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    client = _proxy(tmp_path, seen)
    for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                         ("GET", "/v1/fleet/get-run"), ("POST", "/v1/fleet/../control/list-runs"),
                         ("POST", "/v1/fleet/%2e%2e/control/start-run"), ("POST", "/"), ("POST", "/v1/fleetx/a")]:
        reply = client.request(method, path, content=b"x")
        assert reply.status_code == 403 and "only the Fleet API" in reply.text, (method, path)
    assert not seen  # nothing reached the SuperLink


def _fab(files: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(".info/CONTENT", b"listing")
    return buffer.getvalue()


def test_only_the_operators_own_app_is_signed_and_flower_verifies_the_signature(tmp_path: Path) -> None:
    import yaml
    from flwr.proto.fab_pb2 import GetFabResponse
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    from fedmoe.app_signing import ensure_app_key, load_app_key, sign_fab_reply, trusted_entities_path, app_key_path

    layout = issue(tmp_path / "certs", []).layout
    assert ensure_app_key(layout) and not ensure_app_key(layout)
    key = load_app_key(app_key_path(layout))
    trusted = yaml.safe_load(trusted_entities_path(layout).read_text())
    source = tmp_path / "app"
    (source / "client").mkdir(parents=True)
    (source / "pyproject.toml").write_text('[project]\nname = "fedmoe"\ndependencies = ["torch", "flwr"]\n')
    (source / "client" / "app.py").write_text("app = 1\n")

    def reply_for(files: dict[str, bytes]) -> tuple[Fab, str | None]:
        body = GetFabResponse()
        body.fab.content = _fab(files)
        signed, why = sign_fab_reply(body.SerializeToString(), source, key)
        parsed = GetFabResponse()
        parsed.ParseFromString(signed)
        return Fab(parsed.fab.hash_str, parsed.fab.content, dict(parsed.fab.verifications)), why

    # the operator's app, pyproject reformatted the way `flwr build` does: signed, and Flower's check passes
    same = {"pyproject.toml": b'[project]\nname = "fedmoe"\ndependencies = [\n    "torch",\n    "flwr",\n]\n',
            "client/app.py": b"app = 1\n"}
    fab, why = reply_for(same)
    assert why is None and _verify_fab(fab, trusted)
    # a signature by another key does not pass for the members' trusted entity
    other = tmp_path / "other"
    ensure_app_key(issue(other, []).layout)
    assert not _verify_fab(fab, yaml.safe_load(trusted_entities_path(issue(other, []).layout).read_text()))
    # one changed line, an extra module, another dependency: sent unsigned, with the reason
    for files, reason in [({**same, "client/app.py": b"app = 1\nsteal()\n"}, "client/app.py differs"),
                          ({**same, "client/evil.py": b"steal()\n"}, "client/evil.py is not in the operator's app"),
                          ({**same, "pyproject.toml": b'[project]\nname = "fedmoe"\ndependencies = ["evil"]\n'}, "pyproject.toml differs"),
                          ({**same, "../x.py": b""}, "is not in the operator's app")]:
        fab, why = reply_for(files)
        assert why is not None and reason in why and "valid_license" not in fab.verifications, files


def test_forged_forwarding_headers_odd_encodings_and_queries_do_not_pass(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    client = _proxy(tmp_path, seen)
    reply = client.post("/v1/fleet/pull-messages", content=b"x", headers={"X-Forwarded-For": "10.6.6.6", "Forwarded": "for=10.6.6.6"})
    assert reply.status_code == 200
    assert seen[-1].headers["x-forwarded-for"] == "testclient" and "forwarded" not in seen[-1].headers
    for path in ["/v1/fleet/%252e%252e/%252e%252e/v1/control/list-runs", "/v1/fleet/pull-messages?x=1"]:
        assert client.post(path, content=b"x").status_code == 403, path
    odd = client.post("/v1/fleet/pull-messages", content=b"x", headers={"X-Foo": b"\xe9"})
    assert odd.status_code == 400 and "malformed request" in odd.text
    assert len(seen) == 1  # only the first request reached the SuperLink


def test_a_corrupt_app_signing_key_is_one_line_at_serve(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from fedmoe.app_signing import app_key_path, ensure_app_key
    from privacy.roster import member_keys, register

    layout = issue(tmp_path / "certs", []).layout
    ensure_app_key(layout)
    register(layout, member_keys("acme", tmp_path / "acme")[0])
    app_key_path(layout).write_text("not a key\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "fedmoe.deploy_cmd", "serve", "--certs", str(layout.root),
                             "--state", str(tmp_path / "state")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "app-signing key" in lines[0], result.stderr
