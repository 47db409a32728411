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

This module is also runnable as `python -m fedmoe.deploy_cmd ...` (the tests use that).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from privacy.certs import CertError, CertLayout, check_ca, check_member_key, check_readable, issue

console = Console(stderr=True)
app = typer.Typer(help="fedmoe deployment: certificates, operator server, member daemon, reports.",
                  no_args_is_help=True)

CONNECTION = "fedmoe"  # name of the SuperLink connection in the private FLWR_HOME/config.toml
NODE_REFUSED = "Failed to activate SuperNode"  # flower-supernode's log when the SuperLink refuses its key
EXIT_REFUSED = 3  # fedmoe join: refused by the SuperLink (key not registered)


class DeployError(RuntimeError):
    """A deployment input is missing or unusable; the message names it."""


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code=code)


# ------------------------------------------------------------------ processes and environment
def flower_bin(name: str) -> str:
    """A Flower executable, preferably from this interpreter's environment."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    from shutil import which

    found = which(name)
    if found is None:
        raise DeployError(f"{name}: not found next to {sys.executable} or on PATH (pip install 'flwr>=1.41,<1.42')")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every Flower process fedmoe starts: private FLWR_HOME, no telemetry, no
    dependency installation at run time, this environment's executables first on PATH."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    env.update(extra or {})
    return env


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc; just `pid` elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM `pid` (it stops its own children gracefully), then SIGKILL whatever of its tree is
    left after `timeout`. The tree is read before signalling: orphans are re-parented to init."""
    tree = process_tree(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    for q in tree + [r for p in tree if _alive(p) for r in process_tree(p)]:
        if _alive(q):
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Child:
    """A Flower process run by a fedmoe supervisor; its output goes to `log` (or our stdout)
    through a reader thread that keeps the last lines, so the supervisor can say why it ended
    (flower-supernode reports a refused key in its log, not in its exit status)."""

    name: str
    process: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=200))
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path | None) -> Child:
        process = subprocess.Popen(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        child = cls(name, process)
        child.reader = threading.Thread(target=child._pump, args=(log,), daemon=True, name=f"{name}-output")
        child.reader.start()
        return child

    def _pump(self, log: Path | None) -> None:
        assert self.process.stdout is not None
        sink = open(log, "ab") if log is not None else sys.stdout.buffer  # noqa: SIM115
        try:
            for line in iter(self.process.stdout.readline, b""):
                sink.write(line)
                sink.flush()
                self.tail.append(line.decode(errors="replace"))
        finally:
            if log is not None:
                sink.close()

    def said(self, text: str, wait: float = 3.0) -> bool:
        """Whether the child's output contained `text` (waits briefly for the output to drain)."""
        if self.reader is not None:
            self.reader.join(timeout=wait)
        return any(text in line for line in list(self.tail))

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            stop_tree(self.process.pid, timeout)
        return self.process.wait()


def supervise(child: Child, grace: float = 15.0) -> int:
    """Wait for `child`; SIGTERM/SIGINT stop it and its tree and return 0, else its exit code.

    The handler only records the signal: the main loop does the stopping, so no wait is re-entered
    from inside a signal handler (Popen.wait holds a non-reentrant lock).
    """
    requested: list[int] = []

    def handle(signum: int, _frame: Any) -> None:
        requested.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    tree: list[int] = []
    deadline = 0.0
    try:
        while True:
            try:
                code = child.process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if requested and not tree:
                console.print(f"{signal.Signals(requested[0]).name}: stopping {child.name} (pid {child.process.pid})")
                tree = process_tree(child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace
            elif tree and time.monotonic() > deadline:
                _kill(tree)
        if requested:  # what the child started (SuperExec, app processes) goes with it
            tree = tree or process_tree(child.process.pid)
            end = time.monotonic() + 5.0
            while time.monotonic() < end and any(_alive(p) for p in tree[1:]):
                time.sleep(0.2)
            _kill(tree[1:])
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0 if requested else code


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _sigterm_interrupts() -> None:
    """Until `supervise` takes over, SIGTERM interrupts start-up like Ctrl-C (the child is stopped)."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def wait_for_port(host: str, port: int, timeout: float, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise DeployError(f"{child.name} exited with code {child.process.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"{host}:{port}: nothing listening after {timeout:.0f}s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ Flower configuration
def write_connection(flwr_home: Path, address: str, ca: Path, name: str = CONNECTION) -> Path:
    """Add (or replace) the SuperLink connection `name` in `$FLWR_HOME/config.toml` (Flower 1.41's
    place for connections; `[tool.flwr.federations]` in pyproject is legacy) and make it default."""
    import tomli
    import tomli_w

    path = flwr_home / "config.toml"
    config: dict[str, Any] = tomli.loads(path.read_text()) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    superlink["default"] = name
    superlink[name] = {"address": address, "root-certificates": str(ca.resolve())}
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def node_config(values: Mapping[str, str]) -> str:
    """`--node-config` of flower-supernode: space-separated key='value' (TOML strings)."""
    for key, value in values.items():
        if "'" in value or "\n" in value:
            raise DeployError(f"node config {key}: {value!r} must not contain quotes or newlines")
    return " ".join(f"{k}='{v}'" for k, v in values.items())


def run_config_string(values: Mapping[str, object]) -> str:
    """`--run-config` of `flwr run`: space-separated TOML key=value pairs."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if "'" in str(value):
                raise DeployError(f"run config {key}: {value!r} must not contain single quotes")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def superlink_argv(layout: CertLayout, database: Path, host: str, port: int, log: Path | None = None) -> list[str]:
    argv = [
        flower_bin("flower-superlink"),
        "--ssl-certfile", str(layout.server_cert), "--ssl-keyfile", str(layout.server_key),
        "--ssl-ca-certfile", str(layout.operator_ca),
        "--enable-supernode-auth",
        "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]
    return argv + (["--log-file", str(log)] if log is not None else [])


def supernode_argv(superlink: str, ca: Path, key: Path, config: Mapping[str, str], clientapp_port: int) -> list[str]:
    return [
        flower_bin("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", node_config(config),
        "--host", "127.0.0.1", "--port", str(clientapp_port),  # the local ClientApp runtime API
    ]


def register_member(flwr_home: Path, public_key: Path, name: str, connection: str = CONNECTION) -> str:
    """Register one member's public key with the SuperLink (Control API); idempotent."""
    result = subprocess.run(
        [flower_bin("flwr"), "supernode", "register", str(public_key), connection, "--name", name, "--format", "json"],
        env=flower_env(flwr_home), capture_output=True, text=True, timeout=60, check=False,
    )
    text = result.stdout + result.stderr
    if result.returncode == 0 and '"success": true' in text:
        node = json.loads(text[text.index("{"): text.rindex("}") + 1]).get("node-id")
        return f"registered (node {node})"
    if "already" in text.lower() or "in use" in text.lower():
        return "already registered"
    last = [line for line in text.strip().splitlines() if line.strip()][-3:]
    raise DeployError(f"registering {public_key} failed: {' '.join(last)}")


# ------------------------------------------------------------------ commands
def certs_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the consortium's keys and certificates.")] = Path("certs"),
    member: Annotated[list[str], typer.Option("--member", "-m", help="Member name (repeatable).")] = [],  # noqa: B006
    hostname: Annotated[list[str], typer.Option("--hostname", help="Extra DNS name/IP of the SuperLink (repeatable).")] = [],  # noqa: B006
    consortium: Annotated[str, typer.Option(help="Organization name in the CA.")] = "fedmoe",
    days: Annotated[int, typer.Option(help="Validity of new certificates in days.")] = 825,
) -> None:
    """Create the consortium CA, the operator's TLS certificate and member key pairs (what is missing)."""
    try:
        issued = issue(out, member, hostnames=hostname, consortium=consortium, days=days)
    except CertError as exc:
        raise _fail(str(exc)) from None
    layout = issued.layout
    console.print(f"wrote {len(issued.written)} file(s), kept {len(issued.kept)} under {layout.root}")
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
                  f"in {layout.root / 'operator' / 'members'} (fedmoe serve does it at start).")


def serve_command(
    certs: Annotated[Path, typer.Option(help="Folder from `fedmoe certs` (operator/ is used).")] = Path("certs"),
    member_keys: Annotated[Path | None, typer.Option(help="Folder of members' public keys <name>.pub (default <certs>/operator/members).")] = None,
    state: Annotated[Path, typer.Option(help="Operator state: SuperLink database, FLWR_HOME, logs.")] = Path(".fedmoe/operator"),
    host: Annotated[str, typer.Option(help="Address the SuperLink binds (Fleet, Control and Runtime APIs).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink HTTPS port.")] = 9092,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port of the ServerApp during runs (0: off).")] = 9400,
    metrics_addr: Annotated[str, typer.Option(help="Address the metrics endpoint binds.")] = "127.0.0.1",
    price_gpu_hour: Annotated[float, typer.Option(help="Price of a GPU-hour, for the cost metrics.")] = 0.0,
    price_million_tokens: Annotated[float, typer.Option(help="Price per million training tokens.")] = 0.0,
    log_file: Annotated[Path | None, typer.Option(help="SuperLink log (default: terminal).")] = None,
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
        state.mkdir(parents=True, exist_ok=True)
        if not os.access(state, os.W_OK):
            raise DeployError(f"state folder {state}: not writable")
        prices = Prices(gpu_hour=price_gpu_hour, million_tokens=price_million_tokens)
        flwr_home = state / "flwr-home"
        address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        write_connection(flwr_home, address, layout.operator_ca)
        extra = {**prices.as_env(), "FEDMOE_METRICS_ADDR": metrics_addr}
        if metrics_port:
            extra["FEDMOE_METRICS_PORT"] = str(metrics_port)
        env = flower_env(flwr_home, extra)
        _sigterm_interrupts()
        child = Child.start("flower-superlink", superlink_argv(layout, state / "superlink.db", host, port), env, log_file)
    except (CertError, DeployError) as exc:
        raise _fail(str(exc)) from None
    try:
        wait_for_port(address.rsplit(":", 1)[0], port, 60, child)
        for name, path in keys.items():
            console.print(f"member {name}: {register_member(flwr_home, path, name)}")
    except DeployError as exc:
        child.stop()
        raise _fail(str(exc), code=1) from None
    except KeyboardInterrupt:
        child.stop()
        raise typer.Exit(code=0) from None
    console.print(f"SuperLink ready on https://{address} (pid {child.process.pid}); "
                  f"submit with `FLWR_HOME={flwr_home} fedmoe submit` or `flwr run . {CONNECTION}`"
                  + (f"; metrics on :{metrics_port} during runs" if metrics_port else ""))
    # The model hub (issue: hub) starts here next to the SuperLink once it exists.
    code = supervise(child)
    raise typer.Exit(code=code)


def join_command(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port.")],
    member: Annotated[str, typer.Option(help="This member's name (as in `fedmoe certs`).")],
    data: Annotated[Path, typer.Option(help="Private training data: a .txt/.jsonl file or a folder of them.")],
    ca: Annotated[Path, typer.Option(help="The consortium CA certificate (ca.pem).")],
    key: Annotated[Path, typer.Option(help="This member's SuperNode private key (auth_key, 0600).")],
    state_dir: Annotated[Path, typer.Option(help="Node-local state: view, error feedback, token cache, metrics.")],
    base: Annotated[Path, typer.Option(help="The frozen base model directory (checked by sha256 each round).")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    metrics_port: Annotated[int, typer.Option(help="Prometheus port of this daemon (0: off).")] = 9401,
    metrics_addr: Annotated[str, typer.Option(help="Address the metrics endpoint binds.")] = "127.0.0.1",
    clientapp_port: Annotated[int, typer.Option(help="Local port of the SuperNode's ClientApp runtime API.")] = 9094,
    flwr_home: Annotated[Path | None, typer.Option(help="Flower's home for this node (default <state-dir>/flwr-home).")] = None,
    log_file: Annotated[Path | None, typer.Option(help="SuperNode log (default: terminal).")] = None,
) -> None:
    """Member daemon: check data, certificates and key, then run a SuperNode with them as node
    config; stop cleanly on SIGTERM."""
    _sigterm_interrupts()
    try:
        child, state = _start_supernode(superlink, member, data, ca, key, state_dir, base, device,
                                        clientapp_port, flwr_home, log_file)
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


def _start_supernode(superlink: str, member: str, data: Path, ca: Path, key: Path, state_dir: Path, base: Path,
                     device: str, clientapp_port: int, flwr_home: Path | None, log_file: Path | None) -> tuple[Child, Path]:
    from model.corpus import DataError, read_texts

    if ":" not in superlink or not superlink.rsplit(":", 1)[1].isdigit():
        raise DeployError(f"--superlink {superlink!r}: expected host:port")
    data, base, state_dir = data.resolve(), base.resolve(), state_dir.resolve()
    if not data.exists():
        raise DeployError(f"data {data}: not found")
    if not os.access(data, os.R_OK):
        raise DeployError(f"data {data}: not readable by this user")
    try:
        texts = read_texts(data)  # the same reader the ClientApp uses: a bad file is named now
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
    config = {"data-path": str(data), "member": member, "state-dir": str(state_dir),
              "base-path": str(base), "device": device}
    env = flower_env((flwr_home or state_dir / "flwr-home").resolve())
    argv = supernode_argv(superlink, ca, key, config, clientapp_port)
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


def submit(flwr_home: Path, app_dir: Path, values: Mapping[str, object], *, connection: str = CONNECTION,
           stream: bool = False) -> str:
    if not (flwr_home / "config.toml").is_file():
        raise DeployError(f"{flwr_home / 'config.toml'}: not found (start `fedmoe serve` first, or set --flwr-home)")
    if not (app_dir / "pyproject.toml").is_file():
        raise DeployError(f"{app_dir}: no pyproject.toml (pass --app the fedmoe project folder)")
    argv = [flower_bin("flwr"), "run", str(app_dir), connection, "--format", "json"]
    if values:
        argv += ["--run-config", run_config_string(values)]
    result = subprocess.run(argv, env=flower_env(flwr_home), capture_output=True, text=True, timeout=300, check=False)
    text = result.stdout
    try:
        reply = json.loads(text[text.index("{"): text.rindex("}") + 1])
    except ValueError:
        reply = {}
    if result.returncode or not reply.get("success"):
        detail = (result.stderr or text).strip().splitlines()[-3:]
        raise DeployError(f"flwr run failed: {' '.join(detail)}")
    run_id = str(reply["run-id"])
    if stream:
        subprocess.run([flower_bin("flwr"), "log", run_id, connection, "--stream"], env=flower_env(flwr_home), check=False)
    return run_id


def report_command(
    run_dir: Annotated[Path, typer.Option(help="Run folder (<workspace>/runs/<run>).")] = Path(".fedmoe/demo/runs/demo"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default <run-dir>/report).")] = None,
    price_gpu_hour: Annotated[float, typer.Option(help="Price of a GPU-hour.")] = 0.0,
    price_million_tokens: Annotated[float, typer.Option(help="Price per million training tokens.")] = 0.0,
    member_gpus: Annotated[float, typer.Option(help="GPUs billed per member while it trains.")] = 1.0,
    server_gpus: Annotated[float, typer.Option(help="GPUs billed for the server per round.")] = 1.0,
    currency: Annotated[str, typer.Option(help="Currency label of the prices.")] = "USD",
) -> None:
    """PNG plots (loss per domain, bytes, contribution shares, cost) and a Markdown summary of a run."""
    from fedmoe.report import ReportError, write_report
    from server.metrics import Prices

    prices = Prices(price_gpu_hour, price_million_tokens, member_gpus, server_gpus)
    try:
        report = write_report(run_dir.resolve(), (out or run_dir / "report").resolve(), prices, currency=currency)
    except ReportError as exc:
        raise _fail(str(exc), code=1) from None
    for name, path in report.plots.items():
        console.print(f"{name:>7}: {path}")
    for note in report.notes:
        console.print(f"   note: {note}")
    console.print(f"summary: [bold]{report.summary}[/bold]")


app.command("certs")(certs_command)
app.command("serve")(serve_command)
app.command("join")(join_command)
app.command("submit")(submit_command)
app.command("report")(report_command)

if __name__ == "__main__":
    app()
