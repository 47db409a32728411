"""`fedmoe hub` (operator: the model hub over TLS) and `fedmoe pull` (member: a verified, resumable
download of a release or the base).

    fedmoe hub  --workspace /srv/consortium --run default --certs certs --port 9443
    fedmoe pull --hub link.example.org:9443 --member acme --state-dir /var/lib/fedmoe \\
                --ca ca.pem --operator-key operator.pub.pem --out models/latest

The hub serves the workspace's base (round 0) and the run's exported releases
(<workspace>/releases/<run>-round-N/) to the members in the CA-signed roster, each as far as its
entitlement allows (server/hub.py). A member signs each call with the identity key `fedmoe
keys` made in its state dir and checks every pulled byte against the manifest the operator
signed (`fedmoe ledger public-key` gives the operator's public key).
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

console = Console(soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=1)


def hub_command(
    workspace: Annotated[Path, typer.Option(help="The consortium workspace (base, releases, ledger, operator key).")] = Path(".fedmoe/demo"),
    run: Annotated[str, typer.Option(help="The run whose releases and ledger the hub serves.")] = "default",
    certs: Annotated[Path, typer.Option(help="Folder from `fedmoe certs`: the server certificate, CA and roster.")] = Path("certs"),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (TLS).")] = 9443,
    policy: Annotated[Path | None, typer.Option(help="Usage-rights policy TOML (default: the workspace's).")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port of the hub (0: off).")] = 9402,
    metrics_addr: Annotated[str, typer.Option(help="Address the metrics endpoint binds.")] = "127.0.0.1",
) -> None:
    """Operator: serve the base and the releases to members, each as far as its rights allow."""
    from privacy.certs import CertError, CertLayout, check_readable
    from server.hub import Hub, Roster, serve
    from server.ledger import OperatorKey, OperatorKeyError
    from server.rights import PolicyError
    from server.workspace import Workspace

    ws = Workspace(workspace.resolve())
    layout = CertLayout(certs.resolve())
    try:
        for path, what in ((layout.server_cert, "server certificate"), (layout.ca_cert, "CA certificate")):
            check_readable(path, what)
        check_readable(layout.server_key, "server key", private=True)
        key = OperatorKey.load(ws.operator_key)
        hub = Hub(ws, run, key, Roster(layout), policy.resolve() if policy else None)
        server, bound = serve(hub, f"{host}:{port}", certs=layout)
    except (CertError, OperatorKeyError, PolicyError, OSError) as exc:
        raise _fail(str(exc)) from None
    if metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(metrics_port, addr=metrics_addr)
        except OSError as exc:
            server.stop(grace=None)
            raise _fail(f"metrics port {metrics_addr}:{metrics_port}: {exc}") from None
    latest = hub.catalog.latest_round()
    console.print(f"hub on {host}:{bound} (TLS): run {run!r}, base {'ready' if 0 in hub.catalog.folders() else 'missing'}, "
                  f"newest release round {latest if latest else 'none yet'}; Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    console.print("hub stopped")


def pull_command(
    hub: Annotated[str, typer.Option(help="The hub's address host:port.")],
    member: Annotated[str, typer.Option(help="This member's name in the consortium.")],
    state_dir: Annotated[Path, typer.Option(help="This member's node state dir (its identity key from `fedmoe keys`).")],
    ca: Annotated[Path, typer.Option(help="The consortium CA certificate (ca.pem).")],
    operator_key: Annotated[Path, typer.Option(help="The operator's public key (`fedmoe ledger public-key`).")],
    out: Annotated[Path, typer.Option(help="Folder to create with the pulled files.")],
    round: Annotated[int | None, typer.Option("--round", min=0, help="Release round to pull (default: the newest you may pull).")] = None,
    base: Annotated[bool, typer.Option("--base", help="Pull the base model (what `fedmoe join` trains on).")] = False,
    server_name: Annotated[str | None, typer.Option(help="TLS name to expect when it differs from the address.")] = None,
) -> None:
    """Member: download a release (or the base) into a folder, verified, resuming an interrupted pull."""
    if base and round not in (None, 0):
        raise _fail(f"--base and --round {round}: choose one")
    manifest = pull_verified(hub, member, state_dir, ca, operator_key, out, 0 if base else round, server_name)
    what = "base model" if manifest["round"] == 0 else f"release of round {manifest['round']}"
    console.print(f"{what} pulled into [bold]{escape(str(out))}[/bold]: {len(manifest['files'])} files, every sha256 and the "
                  "operator's signature verified")


def pull_verified(hub: str, member: str, state_dir: Path, ca: Path, operator_key: Path, out: Path,
                  rnd: int | None, server_name: str | None = None) -> dict:
    """Connect as `member`, pick the round (None: the newest it may pull), pull with a progress bar."""
    import grpc

    from client.pull import PullError, pull, refusal
    from privacy.certs import CertError, check_readable

    try:
        operator_pem = check_readable(operator_key, "operator public key").read_bytes()
        client = _client(hub, member, state_dir, ca, server_name)
        if rnd is None:
            listed = client.releases()
            rnd = max((r.round for r in listed.releases), default=0)
            console.print(f"{member}: entitlement {listed.tier}; newest release you may pull: "
                          f"{'the base model only' if rnd == 0 else f'round {rnd}'} (the consortium is at round {listed.latest_round})")
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("base model" if rnd == 0 else f"round {rnd}", total=None)
            return pull(client, rnd, out, operator_pem, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except grpc.RpcError as exc:
        raise _fail(refusal(exc)) from None
    except (PullError, CertError, OSError) as exc:
        raise _fail(str(exc)) from None


def base_from_hub(hub: str, member: str, state_dir: Path, ca: Path, operator_key: Path | None, out: Path | None) -> Path:
    """For `fedmoe join --hub`: the base pulled into `out` (default <state-dir>/base) and verified;
    a folder pulled before is kept when its signed manifest still verifies."""
    from client.pull import PullError, verify_pulled

    if operator_key is None:
        raise _fail("--hub needs --operator-key (the operator's public key, `fedmoe ledger public-key`)")
    out = (out or state_dir / "base").resolve()
    if out.exists():
        try:
            if verify_pulled(out, operator_key.read_bytes()).get("round") == 0:
                console.print(f"member {member}: base at {out} (pulled before; signature and every sha256 verified again)")
                return out
        except (PullError, OSError):
            pass
        raise _fail(f"{out} exists and is not a base pulled from the hub (or its signature no longer verifies); "
                    "remove it or point --base elsewhere")
    pull_verified(hub, member, state_dir, ca, operator_key, out, 0)
    console.print(f"member {member}: base pulled from {hub} into {out}, every sha256 and the operator's signature verified")
    return out


class BillError(ValueError):
    """The hub's usage statement does not prove what it charges."""


def verify_bill(usage, operator_pem: bytes, member: str, today: dt.date | None = None) -> list[dict]:  # noqa: ANN001  (hub_pb2.Usage)
    """`member`'s debits of the current period, each proven included (once) in the usage log under
    a head the operator signed, and adding up to what the hub says was used; BillError naming what
    fails. Limits: it proves every listed debit is in the log, not that the log holds no other
    debit of this member (a head-to-head consistency check across calls would show a log that
    was rewritten; fedmoe keeps no earlier head on the member's side yet)."""
    import json

    from cryptography.exceptions import InvalidSignature

    from server.ledger import LedgerError, load_public_key
    from server.ledger.merkle import verify_inclusion
    from server.usage import head_bytes, period_start

    if usage.member != member:
        raise BillError(f"the statement is {usage.member!r}'s, not {member!r}'s")
    if usage.period_days < 1 or usage.period_start != period_start(usage.period_days, today):
        raise BillError(f"the statement's period {usage.period_start!r} is not the current {usage.period_days}-day period")
    if usage.log_size == 0:
        if usage.debits or usage.used_tokens:
            raise BillError("debits without a signed usage-log head")
        return []
    try:
        load_public_key(operator_pem, "operator public key").verify(
            usage.log_signature, head_bytes(usage.log_size, usage.log_root, usage.log_time))
    except (LedgerError, InvalidSignature) as exc:  # InvalidSignature has no message
        raise BillError(f"the usage log's head is not signed by the operator's key ({type(exc).__name__})") from None
    root = bytes.fromhex(usage.log_root)
    entries, last = [], -1
    for debit in usage.debits:
        if debit.index <= last:
            raise BillError(f"debit {debit.index} is listed twice or out of order")
        last = debit.index
        if not verify_inclusion(debit.entry, debit.index, usage.log_size, list(debit.proof), root):
            raise BillError(f"debit {debit.index} is not in the usage log the head commits to")
        entry = json.loads(debit.entry)
        if entry.get("member") != usage.member or entry.get("period") != usage.period_start:
            raise BillError(f"debit {debit.index} is for {entry.get('member')!r} in {entry.get('period')!r}, not this bill")
        entries.append(entry)
    total = sum(e["prompt_tokens"] + e["completion_tokens"] for e in entries)
    if total != usage.used_tokens:
        raise BillError(f"the debits add up to {total} tokens, the hub charges {usage.used_tokens}")
    return entries


def _client(hub: str, member: str, state_dir: Path, ca: Path, server_name: str | None = None):  # noqa: ANN202
    """This member's authenticated connection: its identity key from `fedmoe keys`, TLS verified with the CA."""
    from client.pull import HubClient
    from privacy.certs import check_readable, load_cert
    from privacy.hub_auth import hub_audience
    from privacy.roster import IDENTITY, identity_key

    key_path = check_readable(state_dir / IDENTITY, "identity key (run `fedmoe keys` first)", private=True)
    return HubClient.connect(hub, member, identity_key(key_path), hub_audience(load_cert(ca)),
                             ca_pem=check_readable(ca, "CA certificate").read_bytes(), server_name=server_name)


def generate_command(
    hub: Annotated[str, typer.Option(help="The hub's address host:port.")],
    member: Annotated[str, typer.Option(help="This member's name in the consortium.")],
    state_dir: Annotated[Path, typer.Option(help="This member's node state dir (its identity key).")],
    ca: Annotated[Path, typer.Option(help="The consortium CA certificate (ca.pem).")],
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=0, max=512, help="At most this many new tokens (0: the hub's default, 64).")] = 0,
) -> None:
    """Member: text from the newest release you may use, hosted by the hub and metered per token."""
    import grpc

    from client.pull import refusal
    from privacy.certs import CertError

    try:
        last = None
        for chunk in _client(hub, member, state_dir, ca).generate(prompt, max_new_tokens):
            if chunk.text:
                console.out(chunk.text, end="", highlight=False)
            last = chunk
        console.out("")
    except grpc.RpcError as exc:
        raise _fail(refusal(exc)) from None
    except (CertError, OSError) as exc:
        raise _fail(str(exc)) from None
    if last is not None:
        console.print(f"debited {last.prompt_tokens} prompt + {last.completion_tokens} completion tokens "
                      f"(release of round {last.release_round})")


def usage_command(
    hub: Annotated[str, typer.Option(help="The hub's address host:port.")],
    member: Annotated[str, typer.Option(help="This member's name in the consortium.")],
    state_dir: Annotated[Path, typer.Option(help="This member's node state dir (its identity key).")],
    ca: Annotated[Path, typer.Option(help="The consortium CA certificate (ca.pem).")],
    operator_key: Annotated[Path, typer.Option(help="The operator's public key (`fedmoe ledger public-key`).")],
) -> None:
    """Member: this period's usage and quota, every debit checked against the signed usage log."""
    import grpc

    from client.pull import refusal
    from privacy.certs import CertError

    try:
        usage = _client(hub, member, state_dir, ca).usage()
        debits = verify_bill(usage, operator_key.read_bytes(), member)
    except grpc.RpcError as exc:
        raise _fail(refusal(exc)) from None
    except (CertError, OSError, BillError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"{usage.member}: {usage.tier}, {usage.share:.2%} credited as of round {usage.as_of_round}; "
                  f"used {usage.used_tokens:,} of {usage.quota_tokens:,} tokens since {usage.period_start} "
                  f"({len(debits)} generations, each verified in the usage log of {usage.log_size} entries)")


def demo_through_hub(ws, run_name: str, member: str | None, refused_member: str | None) -> None:  # noqa: ANN001
    """The demo's last step, as a member would do it: `member` pulls the newest release it may use
    from a hub on this machine (TLS, the demo's own CA), generates a line through it, and reads its
    verified bill; `refused_member` (the free rider) asks too and is refused."""
    import json
    import shutil

    import grpc

    from client.pull import HubClient, PullError, pull, refusal
    from privacy.certs import CertLayout, issue, load_cert
    from privacy.hub_auth import hub_audience
    from privacy.roster import IDENTITY, identity_key, operator_side_identities
    from server.hub import Hub, Roster, serve
    from server.ledger import OperatorKey

    if member is None:
        console.print("model hub: no member is entitled to a release yet (more rounds credit more members)")
        return
    layout = CertLayout(ws.operator_dir / "certs")
    issue(layout.root, [])  # the demo's CA and a TLS certificate for 127.0.0.1 (kept when there)
    asking = [m for m in (member, refused_member) if m]
    operator_side_identities(layout, asking)
    key = OperatorKey.load(ws.operator_key)
    server, port = serve(Hub(ws, run_name, key, Roster(layout)), "127.0.0.1:0", certs=layout)
    try:
        def client(name: str) -> HubClient:
            return HubClient.connect(f"127.0.0.1:{port}", name, identity_key(layout.member_dir(name) / IDENTITY),
                                     hub_audience(load_cert(layout.ca_cert)), ca_pem=layout.ca_cert.read_bytes())

        hub = client(member)
        rnd = max(r.round for r in hub.releases().releases)
        out = ws.root / "pulled" / f"{member}-round-{rnd}"
        shutil.rmtree(out, ignore_errors=True)  # the demo's own earlier pull (a --fresh run's round differs)
        manifest = pull(hub, rnd, out, key.public_key_pem())
        size = sum(f["size"] for f in manifest["files"]) / 2**20
        console.print(f"model hub (gRPC, TLS, 127.0.0.1:{port}): {member} pulled the release of round {rnd} "
                      f"({len(manifest['files'])} files, {size:.0f} MiB, operator's signature and every sha256 "
                      f"verified) into {out}")
        text = json.loads((ws.validation_dir / f"{member}.jsonl").open().readline())["text"]
        prompt = " ".join(text.split()[:6])
        pieces = list(hub.generate(prompt, 24))
        line = " ".join("".join(p.text for p in pieces).split())
        console.print(f"{member} asks the hub to continue {prompt!r}: {line!r}", highlight=False)
        usage = hub.usage()
        verify_bill(usage, key.public_key_pem(), member)
        console.print(f"metered: {pieces[-1].prompt_tokens} prompt + {pieces[-1].completion_tokens} completion tokens; "
                      f"{member} has used {usage.used_tokens:,} of its {usage.quota_tokens:,} tokens this period "
                      f"(bill verified against the signed usage log)")
        if refused_member:
            try:
                list(client(refused_member).generate(prompt, 24))
                console.print(f"[red]{refused_member} was NOT refused generation[/red]")
            except grpc.RpcError as exc:
                console.print(f"{refused_member} asks the hub too: {refusal(exc)}", highlight=False)
    except (grpc.RpcError, PullError, BillError) as exc:
        console.print(f"[red]model hub step failed:[/red] {escape(refusal(exc) if isinstance(exc, grpc.RpcError) else str(exc))}")
    finally:
        server.stop(grace=None)
