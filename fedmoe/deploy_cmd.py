"""A real deployment with Flower's own processes: `fedmoe certs`, `serve` (operator: SuperLink),
`join` (member daemon: SuperNode), `submit` (the fedmoe app to a SuperLink) and `report`.

    fedmoe certs  --out certs -m acme -m globex --hostname link.example.org
    fedmoe serve  --certs certs --state .fedmoe/operator --port 9092 --metrics-port 9400
    fedmoe join   --superlink link.example.org:9092 --member acme --data /data/acme \\
                  --ca ca.pem --key auth_key --state-dir /var/lib/fedmoe --base /models/base
    fedmoe submit --flwr-home .fedmoe/operator/flwr-home -c workspace=/srv/consortium -c num-rounds=20
    fedmoe report --run-dir /srv/consortium/runs/default --out report/

`serve` and `join` are supervisors: they check their inputs (one-line error naming the file),
start `flower-superlink` / `flower-supernode` as a child, and on SIGTERM or SIGINT stop the child
and everything it started (by PID), then exit 0. Flower's state (registered nodes, runs) is in
the SuperLink's `--database`; fedmoe's (committed rounds, ledger) in the workspace.

Flower's side (executables, connection config, argv, `flwr` calls) is in `fedmoe.flower_deploy`,
the supervision of the child processes in `fedmoe.processes`.

This module is also runnable as `python -m fedmoe.deploy_cmd ...` (the tests use that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedmoe.flower_deploy import (
    CONNECTION,
    NODE_REFUSED,
    DeployError,
    flower_env,
    register_member,
    submit,
    unregister_member,
    superlink_argv,
    supernode_argv,
    write_connection,
)
from fedmoe.app_signing import app_key_path, ensure_app_key, load_app_key, sign_fab_reply, trusted_entities_path
from fedmoe.processes import Child, sigterm_interrupts, supervise, wait_for_port
from fedmoe.report import report_command
from server.binding import REGISTRY_ENV, forget_registration, load_registry, record_registration
from privacy.certs import CertError, CertLayout, check_ca, check_member_key, check_readable, issue

console = Console(stderr=True)
app = typer.Typer(help="fedmoe deployment: certificates, operator server, member daemon, reports.",
                  no_args_is_help=True)

EXIT_REFUSED = 3  # fedmoe join: refused by the SuperLink (key not registered)


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=code)


# ------------------------------------------------------------------ commands
def certs_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the consortium's keys and certificates.")] = Path("certs"),
    member: Annotated[list[str], typer.Option("--member", "-m", help="Member name (repeatable).")] = [],  # noqa: B006
    hostname: Annotated[list[str], typer.Option("--hostname", help="Extra DNS name/IP of the SuperLink (repeatable).")] = [],  # noqa: B006
    consortium: Annotated[str, typer.Option(help="Organization name in the CA.")] = "fedmoe",
    days: Annotated[int, typer.Option(help="Validity of new certificates in days.")] = 825,
    register_file: Annotated[list[Path], typer.Option("--register", help="A member's <name>.registration.json from `fedmoe keys` (repeatable).")] = [],  # noqa: B006
    revoke_member: Annotated[list[str], typer.Option("--revoke", help="Remove a member's keys; `fedmoe serve` unregisters its node (repeatable).")] = [],  # noqa: B006
) -> None:
    """Create the consortium CA and the operator's TLS certificate (what is missing; the
    certificate is reissued when --hostname adds a name), register members' public keys from
    their registration files, revoke members. `-m NAME` creates a member's keys here instead
    (the operator then holds them: for one-machine setups and tests)."""
    from privacy.roster import Registration, operator_side_identities, register, revoke

    try:
        issued = issue(out, member, hostnames=hostname, consortium=consortium, days=days)
        layout = issued.layout
        if ensure_app_key(layout):
            console.print(f"app-signing key {app_key_path(layout)}: the Fleet API proxy signs the operator's app with it; "
                          f"hand {trusted_entities_path(layout)} to every member")
        if member:
            console.print(f"[yellow]note:[/yellow] -m creates {', '.join(member)}'s private keys on this machine; "
                          "a member that runs `fedmoe keys` on its own machine hands over only public keys")
            operator_side_identities(layout, member)
        for path in register_file:
            registration = Registration.from_file(path)
            changed = register(layout, registration)
            console.print(f"member {registration.member}: {'registered' if changed else 'already registered'}")
        for name in revoke_member:
            found = revoke(layout, name)
            console.print(f"member {name}: {'revoked (restart `fedmoe serve` to unregister its node)' if found else 'was not registered'}")
    except CertError as exc:
        raise _fail(str(exc)) from None
    console.print(f"wrote {len(issued.written)} file(s), kept {len(issued.kept)} under {layout.root}")
    for path in issued.reissued:
        console.print(f"reissued {path}: the SuperLink's names changed (restart `fedmoe serve`)")
    table = Table(title="hand over")
    table.add_column("to")
    table.add_column("files")
    table.add_column("secret?")
    table.add_row("nobody (keep offline)", str(layout.ca_key), "yes")
    table.add_row("operator (fedmoe serve --certs)", f"{layout.root / 'operator'}/", "server.key")
    for name in layout.registered_members():
        table.add_row(f"member {name} (fedmoe join)", f"{layout.member_dir(name)}/", "auth_key")
    console.print(table)
    console.print("Send each member its folder over a channel you trust; the operator registers the public keys "
                  f"in {layout.root / 'operator' / 'members'} (fedmoe serve does it at start). Every member needs "
                  f"the current {layout.root / 'operator' / 'roster.json'} (signed by the CA) for secure aggregation.")


def keys_command(
    member: Annotated[str, typer.Option(help="This member's name in the consortium.")],
    state_dir: Annotated[Path, typer.Option(help="This member's node state dir (where `fedmoe join` keeps state).")],
) -> None:
    """Member: create this member's keys on its own machine and the registration file (public
    halves only) to hand the operator."""
    from privacy.roster import member_keys

    try:
        registration, path = member_keys(member, state_dir.resolve())
    except CertError as exc:
        raise _fail(str(exc)) from None
    console.print(f"member {member}: SuperNode key {state_dir / 'keys' / 'auth_key'}, identity key "
                  f"{state_dir / 'identity-ed25519.pem'} (private: never leave this machine)")
    console.print(f"hand {path} to the operator (`fedmoe certs --register`); you get back ca.pem and roster.json, "
                  f"then `fedmoe join --key {state_dir / 'keys' / 'auth_key'} --state-dir {state_dir} --ca ca.pem ...`")
    console.print(f"identity fingerprint (check it with the operator): {registration.identity.hex()[:16]}")


def serve_command(
    certs: Annotated[Path, typer.Option(help="Folder from `fedmoe certs` (operator/ is used).")] = Path("certs"),
    member_keys: Annotated[Path | None, typer.Option(help="Folder of members' public keys <name>.pub (default <certs>/operator/members).")] = None,
    state: Annotated[Path, typer.Option(help="Operator state: SuperLink database, FLWR_HOME, logs.")] = Path(".fedmoe/operator"),
    host: Annotated[str, typer.Option(help="Address the members' Fleet API proxy binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTPS port members connect to (the Fleet API proxy).")] = 9092,
    superlink_port: Annotated[int, typer.Option(help="Loopback port of the SuperLink itself (all APIs; 0: --port + 1).")] = 0,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port of the ServerApp during runs (0: off).")] = 9400,
    metrics_addr: Annotated[str, typer.Option(help="Address the metrics endpoint binds.")] = "127.0.0.1",
    price_gpu_hour: Annotated[float, typer.Option(help="Price of a GPU-hour, for the cost metrics.")] = 0.0,
    price_million_tokens: Annotated[float, typer.Option(help="Price per million training tokens.")] = 0.0,
    log_file: Annotated[Path | None, typer.Option(help="SuperLink log (default: terminal).")] = None,
    app_dir: Annotated[Path | None, typer.Option("--app", help="The operator's fedmoe project folder: only app bundles identical to it are signed for members (default: this checkout, else the current folder).")] = None,
) -> None:
    """Operator: start the SuperLink with TLS, node authentication and persistent state; register
    every member key in <certs>/operator/members/; stop cleanly on SIGTERM."""
    from server.metrics import Prices

    layout = CertLayout(certs.resolve())
    keys_dir = (member_keys or layout.root / "operator" / "members").resolve()
    state = state.resolve()
    try:
        check_readable(layout.server_cert, "server certificate")
        check_readable(layout.server_key, "server key", private=True)
        check_ca(layout.operator_ca)
        keys = {p.stem: p for p in sorted(keys_dir.glob("*.pub"))} if keys_dir.is_dir() else {}
        if not keys:
            raise DeployError(f"{keys_dir}: no member public keys <name>.pub (run `fedmoe certs -m NAME`)")
        for name, path in keys.items():
            check_readable(path, f"member {name!r} public key")
        check_readable(app_key_path(layout), "app-signing key (run `fedmoe certs` again to create it)", private=True)
        source = Path(__file__).resolve().parents[1]
        app_key = load_app_key(app_key_path(layout))
        app_dir = (app_dir or (source if (source / "pyproject.toml").is_file() else Path.cwd())).resolve()
        if not (app_dir / "pyproject.toml").is_file():
            raise DeployError(f"--app {app_dir}: no pyproject.toml (the fedmoe project folder)")
        state.mkdir(parents=True, exist_ok=True)
        if not os.access(state, os.W_OK):
            raise DeployError(f"state folder {state}: not writable")
        prices = Prices(gpu_hour=price_gpu_hour, million_tokens=price_million_tokens)
        flwr_home = state / "flwr-home"
        superlink_port = superlink_port or port + 1
        if superlink_port == port:
            raise DeployError(f"--superlink-port {superlink_port}: must differ from --port")
        address = f"127.0.0.1:{superlink_port}"  # the SuperLink listens on loopback only
        write_connection(flwr_home, address, layout.operator_ca)
        registry = state / "members.json"  # member -> node id, as registered (server/binding.py)
        extra = {**prices.as_env(), "FEDMOE_METRICS_ADDR": metrics_addr, REGISTRY_ENV: str(registry)}
        if metrics_port:
            extra["FEDMOE_METRICS_PORT"] = str(metrics_port)
        env = flower_env(flwr_home, extra)
        sigterm_interrupts()
        child = Child.start("flower-superlink", superlink_argv(layout, state / "superlink.db", "127.0.0.1", superlink_port),
                            env, log_file)
    except (CertError, DeployError) as exc:
        raise _fail(str(exc)) from None
    try:
        wait_for_port("127.0.0.1", superlink_port, 60, child)
        from fedmoe.proxy import start_proxy

        start_proxy(host, port, f"https://127.0.0.1:{superlink_port}", layout.server_cert, layout.server_key,
                    layout.operator_ca, sign_fab=lambda body: sign_fab_reply(body, app_dir, app_key))
        known = load_registry(registry) if registry.is_file() else {}
        for name in sorted(set(known) - set(keys)):  # revoked: `fedmoe certs --revoke` removed its key
            unregister_member(flwr_home, known[name])
            forget_registration(registry, name)
            console.print(f"member {name}: key revoked, node {known[name]} unregistered")
        for name, path in keys.items():
            node = register_member(flwr_home, path, name)
            if node is not None:
                record_registration(registry, name, node)
                console.print(f"member {name}: registered (node {node})")
            elif name in known:
                console.print(f"member {name}: already registered (node {known[name]})")
            else:
                console.print(f"member {name}: its key was registered before {registry} recorded node ids, so "
                              f"its replies will be refused; unregister it (`flwr supernode unregister`) and serve again")
    except (DeployError, RuntimeError) as exc:
        child.stop()
        raise _fail(str(exc), code=1) from None
    except KeyboardInterrupt:
        child.stop()
        raise typer.Exit(code=0) from None
    console.print(f"SuperLink ready: members connect to https://{host}:{port} (Fleet API only, through fedmoe's proxy); "
                  f"the SuperLink itself listens on https://{address} (pid {child.process.pid}); "
                  f"submit with `FLWR_HOME={flwr_home} fedmoe submit` or `flwr run . {CONNECTION}`"
                  + (f"; metrics on :{metrics_port} during runs" if metrics_port else ""))
    # the model hub is its own process (`fedmoe hub`): it restarts and scales apart from the SuperLink
    code = supervise(child)
    raise typer.Exit(code=code)


def join_command(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")],
    member: Annotated[str, typer.Option(help="This member's name (as in `fedmoe certs`).")],
    data: Annotated[Path, typer.Option(help="Private training data: a .txt/.jsonl/.json/.csv/.parquet file or a folder of them (text, instruction pairs, chat).")],
    ca: Annotated[Path, typer.Option(help="The consortium CA certificate (ca.pem).")],
    key: Annotated[Path, typer.Option(help="This member's SuperNode private key (auth_key, 0600).")],
    state_dir: Annotated[Path, typer.Option(help="Node-local state: view, error feedback, token cache, metrics.")],
    base: Annotated[Path | None, typer.Option(help="The frozen base model directory (checked by sha256 each round); with --hub, where to pull it (default <state-dir>/base).")] = None,
    hub: Annotated[str | None, typer.Option(help="The operator's model hub host:port: fetch and verify the base from it.")] = None,
    operator_key: Annotated[Path | None, typer.Option(help="With --hub: the operator's public key (`fedmoe ledger public-key`).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    metrics_port: Annotated[int, typer.Option(help="Prometheus port of this daemon (0: off).")] = 9401,
    metrics_addr: Annotated[str, typer.Option(help="Address the metrics endpoint binds.")] = "127.0.0.1",
    clientapp_port: Annotated[int, typer.Option(help="Local port of the SuperNode's ClientApp runtime API.")] = 9094,
    flwr_home: Annotated[Path | None, typer.Option(help="Flower's home for this node (default <state-dir>/flwr-home).")] = None,
    log_file: Annotated[Path | None, typer.Option(help="SuperNode log (default: terminal).")] = None,
    roster: Annotated[Path | None, typer.Option(help="The consortium's roster.json, signed by the CA (default: beside --ca).")] = None,
    secagg_min_group: Annotated[int, typer.Option(help="Smallest group whose sum this member helps unmask.")] = 3,
    trusted_entities: Annotated[Path | None, typer.Option(help="The operator's app-signing key (trusted-entities.yaml; default: beside --ca): run only apps it signed.")] = None,
    data_column: Annotated[str, typer.Option(help="The plain-text field of .jsonl/.json/.csv/.parquet records.")] = "text",
    data_pipeline: Annotated[bool, typer.Option(help="Drop duplicates and junk before training (report: <state-dir>/data-quality.json).")] = True,
    curriculum_levels: Annotated[int, typer.Option(min=1, max=10, help="With the pipeline: difficulty levels opened easy to hard, one more every 2 rounds (1: none).")] = 3,
    base_quantization: Annotated[str, typer.Option(click_type=click.Choice(["none", "int8", "nf4"]), help="Hold the frozen base in int8 or nf4 on this member (none: as the operator made it).")] = "none",
    dp: Annotated[list[str] | None, typer.Option(help="Record-level DP-SGD: node config dp-* keys as KEY=VALUE, e.g. --dp target-epsilon=8 (README 'Differential privacy').")] = None,
) -> None:
    """Member daemon: check data, certificates, keys and roster, then run a SuperNode with them
    as node config; stop cleanly on SIGTERM."""
    sigterm_interrupts()
    try:
        if secagg_min_group < 2:
            raise DeployError(f"--secagg-min-group {secagg_min_group}: must be >= 2")

        dp_keys = {"dp": "on", **{f"dp-{k}": v for k, _, v in (kv.partition("=") for kv in dp)}} if dp else {}
        from privacy.dp import DPConfig, DPConfigError  # torch and peft: only for this command

        try:  # refused here, in one line, rather than in every round
            DPConfig.from_node_config(dp_keys)
        except DPConfigError as exc:
            raise DeployError(f"--dp: {exc}") from None
        if hub:
            from fedmoe.hub_cmd import base_from_hub

            base = base_from_hub(hub, member, state_dir, ca, operator_key, base)
        elif base is None:
            raise DeployError("give --base (the base model folder) or --hub (fetch it from the operator's hub)")
        child, state = _start_supernode(superlink, member, data, ca, key, state_dir, base, device,
                                        clientapp_port, flwr_home, log_file, roster, secagg_min_group,
                                        trusted_entities or ca.parent / "trusted-entities.yaml",
                                        {"data-column": data_column, "data-pipeline": "on" if data_pipeline else "off",
                                         "curriculum-levels": str(curriculum_levels),
                                         "base-quantization": base_quantization, **dp_keys})
    except (CertError, DeployError) as exc:
        raise _fail(str(exc)) from None
    try:
        if metrics_port:
            from client.metrics import serve_daemon_metrics

            try:
                serve_daemon_metrics(state, member, metrics_port, metrics_addr)
            except OSError as exc:
                console.print(f"[yellow]warning:[/yellow] metrics endpoint :{metrics_port} not started: {exc}")
    except KeyboardInterrupt:
        child.stop()
        raise typer.Exit(code=0) from None
    console.print(f"member {member}: SuperNode started (pid {child.process.pid}) towards {superlink}")

    code = supervise(child)
    if code and child.said(NODE_REFUSED):
        console.print(f"[red]error:[/red] the SuperLink at {superlink} refused member {member!r}: "
                      "its public key is not registered there (Flower exit code 305)")
        raise typer.Exit(code=EXIT_REFUSED)
    if code:
        console.print(f"[red]error:[/red] flower-supernode exited with code {code}")
    raise typer.Exit(code=code)


def _check_roster(member: str, roster: Path, ca: Path, key: Path, state_dir: Path) -> Path:
    """The member's identity key in its state dir (moved there from beside --key when `fedmoe
    certs -m` made it) and, when the roster is there, that it verifies and registers that key."""
    from client.secure import check_registered
    from privacy.roster import IDENTITY
    from privacy.secagg import ProtocolViolation

    own, handed = state_dir / IDENTITY, key.parent / IDENTITY
    if not own.exists() and handed.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        own.write_bytes(handed.read_bytes())
        os.chmod(own, 0o600)
    if not roster.is_file():
        console.print(f"[yellow]warning:[/yellow] no roster at {roster}: this member will refuse secure aggregation "
                      "until it has the consortium's roster.json (from the operator's `fedmoe certs`)")
        return roster.resolve()
    try:
        check_registered(roster, ca, member, state_dir)  # what the ClientApp checks at every stage
    except ProtocolViolation as exc:
        raise DeployError(str(exc)) from None
    return roster.resolve()


def _start_supernode(superlink: str, member: str, data: Path, ca: Path, key: Path, state_dir: Path, base: Path,
                     device: str, clientapp_port: int, flwr_home: Path | None, log_file: Path | None,
                     roster: Path | None, secagg_min_group: int, trusted: Path, options: dict[str, str]) -> tuple[Child, Path]:
    from model.corpus import DataError
    from model.member_data import read_documents

    if ":" not in superlink or not superlink.rsplit(":", 1)[1].isdigit():
        raise DeployError(f"--superlink {superlink!r}: expected host:port")
    data, base, state_dir = data.resolve(), base.resolve(), state_dir.resolve()
    if not data.exists():
        raise DeployError(f"data {data}: not found")
    if not os.access(data, os.R_OK):
        raise DeployError(f"data {data}: not readable by this user")
    try:
        texts = read_documents(data, options["data-column"])  # the same reader the ClientApp uses: a bad file is named now
    except DataError as exc:
        raise DeployError(f"data: {exc}") from None
    if not texts:
        raise DeployError(f"data {data}: no documents")
    ca, key = check_ca(ca), check_member_key(key)
    if not (base / "config.json").is_file():
        raise DeployError(f"base {base}: not a model directory (no config.json)")
    state_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(state_dir, os.W_OK):
        raise DeployError(f"state dir {state_dir}: not writable")
    roster = _check_roster(member, roster or ca.parent / "roster.json", ca, key, state_dir)
    config = {"data-path": str(data), "member": member, "state-dir": str(state_dir), "base-path": str(base),
              "device": device, "ca": str(ca), "roster": str(roster), "secagg-min-group": str(secagg_min_group), **options}
    env = flower_env((flwr_home or state_dir / "flwr-home").resolve())
    argv = supernode_argv(superlink, ca, key, config, clientapp_port)
    if trusted.is_file():
        argv += ["--trusted-entities", str(trusted.resolve())]
    else:
        console.print(f"[yellow]warning:[/yellow] no {trusted}: this SuperNode runs any app bundle the SuperLink serves, "
                      "signed or not (pass the operator's trusted-entities.yaml)")
    return Child.start("flower-supernode", argv, env, log_file), state_dir


def submit_command(
    flwr_home: Annotated[Path, typer.Option(help="FLWR_HOME written by `fedmoe serve` (<state>/flwr-home).")] = Path(".fedmoe/operator/flwr-home"),
    app_dir: Annotated[Path, typer.Option("--app", help="The fedmoe project folder (its pyproject.toml).")] = Path("."),
    connection: Annotated[str, typer.Option(help="SuperLink connection in FLWR_HOME/config.toml.")] = CONNECTION,
    config: Annotated[list[str], typer.Option("--config", "-c", help="Run-config key=value (repeatable).")] = [],  # noqa: B006
    stream: Annotated[bool, typer.Option(help="Follow the run's log.")] = False,
) -> None:
    """Operator: submit the fedmoe app to the SuperLink (`flwr run`); prints the run id."""
    values: dict[str, object] = {}
    for pair in config:
        k, sep, v = pair.partition("=")
        if not sep:
            raise _fail(f"--config {pair!r}: expected key=value")
        try:
            values[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            values[k.strip()] = v
    if "workspace" in values:
        values["workspace"] = str(Path(str(values["workspace"])).expanduser().resolve())
    try:
        run_id = submit(flwr_home.resolve(), app_dir.resolve(), values, connection=connection, stream=stream)
    except DeployError as exc:
        raise _fail(str(exc), code=1) from None
    console.print(f"submitted run {run_id}")
    print(run_id)


app.command("keys")(keys_command)
app.command("certs")(certs_command)
app.command("serve")(serve_command)
app.command("join")(join_command)
app.command("submit")(submit_command)
app.command("report")(report_command)

if __name__ == "__main__":
    app()
