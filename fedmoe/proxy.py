"""The members' door to the SuperLink: a TLS-terminating reverse proxy that passes the Fleet API only.

Flower 1.41 serves its Fleet API (what SuperNodes use), its Control API (submit runs, list
runs, register node keys) and its runtime paths on one HTTPS port, and open-source Flower has
no account authentication on the Control API: whoever reaches the port with the consortium CA
(which every member holds) can register a key or submit a run whose ClientApp then executes on
every member, next to its private data. So `fedmoe serve` binds the SuperLink to loopback and
puts this proxy on the public address: POST requests under /v1/fleet/ are forwarded as they
are (headers included: node authentication signs a timestamp, not the address), everything
else is answered 403 with one line saying why. The Control API stays on the operator's
machine (`flwr` through the loopback connection `fedmoe serve` writes).

Built on what Flower's own HTTP stack already installs (starlette, uvicorn, httpx) rather than
a proxy from the distribution, so every recipe (compose, Helm, systemd) that runs `fedmoe
serve` gets it without another package. Replies are read whole and passed on (Fleet messages
are bounded by the SuperLink's own limits).
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
REFUSED = "fedmoe proxy: only the Fleet API (POST /v1/fleet/...) is served to members; the Control API is the operator's"
# hop-by-hop headers (RFC 9110 7.6.1) and those the proxy's own client sets
_DROPPED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
            "content-length"}


def fleet_proxy(upstream: str, ca: Path, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """An ASGI app forwarding Fleet API requests to `upstream` (https://127.0.0.1:PORT), whose
    certificate is checked against the consortium CA (`transport`: tests replace the network)."""
    client = httpx.AsyncClient(base_url=upstream, verify=ssl.create_default_context(cafile=str(ca)), timeout=None,
                               transport=transport)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            return PlainTextResponse(REFUSED + "\n", status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED]
        outgoing = client.build_request("POST", path, params=request.query_params, headers=headers,
                                        content=await request.body())
        try:
            reply = await client.send(outgoing)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"fedmoe proxy: the SuperLink is not reachable ({type(exc).__name__})\n", status_code=502)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in _DROPPED | {"content-encoding"}}
        return Response(reply.content, status_code=reply.status_code, headers=kept)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])])


def start_proxy(host: str, port: int, upstream: str, cert: Path, key: Path, ca: Path) -> uvicorn.Server:
    """Serve the proxy with TLS on host:port in a background thread; returns once it listens."""
    config = uvicorn.Config(fleet_proxy(upstream, ca), host=host, port=port, ssl_certfile=str(cert),
                            ssl_keyfile=str(key), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="fleet-proxy")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the Fleet API proxy did not start on {host}:{port} (port in use?)")
        time.sleep(0.05)
    return server
