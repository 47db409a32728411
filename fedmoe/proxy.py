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

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("fedmoe.proxy")
FLEET_PREFIX = "/v1/fleet/"
REFUSED = "fedmoe proxy: only the Fleet API (POST /v1/fleet/...) is served to members; the Control API is the operator's"
MAX_BODY = 512 * 1024 * 1024  # bytes of one request; Fleet messages are far smaller
UPSTREAM_TIMEOUT = 600.0  # seconds for the SuperLink to answer one request
# hop-by-hop headers (RFC 9110 7.6.1), those the proxy's own client sets, and forwarding headers a
# member could forge (the proxy sets its own)
_DROPPED = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
            "content-length", "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}


FabSigner = Callable[[bytes], tuple[bytes, "str | None"]]  # get-fab reply -> (reply, why unsigned)


def fleet_proxy(upstream: str, ca: Path, transport: httpx.AsyncBaseTransport | None = None,
                sign_fab: FabSigner | None = None) -> Starlette:
    """An ASGI app forwarding Fleet API requests to `upstream` (https://127.0.0.1:PORT), whose
    certificate is checked against the consortium CA (`transport`: tests replace the network).
    `sign_fab` signs the operator's own app on its way to a SuperNode (fedmoe/app_signing.py)."""
    client = httpx.AsyncClient(base_url=upstream, verify=ssl.create_default_context(cafile=str(ca)),
                               timeout=UPSTREAM_TIMEOUT, transport=transport)

    async def forward(request: Request) -> Response:
        path, raw = request.url.path, request.scope.get("raw_path", b"")
        if (request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path or b"%" in raw
                or request.url.query):
            return PlainTextResponse(REFUSED + "\n", status_code=403)
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return PlainTextResponse(f"fedmoe proxy: request over {MAX_BODY} bytes\n", status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY:
            return PlainTextResponse(f"fedmoe proxy: request over {MAX_BODY} bytes\n", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED]
        headers.append(("x-forwarded-for", request.client.host if request.client else "unknown"))
        try:
            reply = await client.send(client.build_request("POST", path, headers=headers, content=body))
        except (UnicodeError, httpx.InvalidURL) as exc:
            return PlainTextResponse(f"fedmoe proxy: malformed request ({type(exc).__name__})\n", status_code=400)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"fedmoe proxy: the SuperLink is not reachable ({type(exc).__name__})\n", status_code=502)
        kept = [(k, v) for k, v in reply.headers.multi_items() if k.lower() not in _DROPPED | {"content-encoding"}]
        content = reply.content
        if sign_fab is not None and path == FLEET_PREFIX + "get-fab" and reply.status_code == 200:
            content, why = sign_fab(content)
            if why is not None:
                log.warning("fedmoe proxy: app bundle sent unsigned (SuperNodes with trusted entities refuse it): %s", why)
        response = Response(content, status_code=reply.status_code)
        response.raw_headers = [(b"content-length", str(len(content)).encode())] + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in kept]
        return response

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])])


def start_proxy(host: str, port: int, upstream: str, cert: Path, key: Path, ca: Path,
                sign_fab: FabSigner | None = None) -> uvicorn.Server:
    """Serve the proxy with TLS on host:port in a background thread; returns once it listens."""
    config = uvicorn.Config(fleet_proxy(upstream, ca, sign_fab=sign_fab), host=host, port=port, ssl_certfile=str(cert),
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
