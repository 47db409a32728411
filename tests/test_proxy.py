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
