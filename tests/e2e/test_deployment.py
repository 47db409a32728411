"""A real deployment on 127.0.0.1: `fedmoe serve` (flower-superlink with TLS, node authentication
and a database) and 3 `fedmoe join` daemons (flower-supernode), each a separate process tree;
the fedmoe app submitted with `flwr run` runs 2 rounds. Every process is stopped by PID at the
end, also when a test fails. The deploy/ recipes (compose, Helm, systemd, Prometheus, Grafana)
are validated at the end of the file (not slow)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fedmoe.app_signing import ensure_app_key, trusted_entities_path
from fedmoe.flower_deploy import CONNECTION, write_connection
from fedmoe.processes import free_port, process_tree
from server.workspace import Workspace
from privacy.certs import CertLayout, issue, load_cert
from privacy.roster import member_keys, register, roster_path, verify_roster
from server.checkpoint import Checkpoints
from server.faults import FILE_ENV, ROUND_KILL_POINTS
from server.ledger import Ledger, OperatorKey
from server.ledger.audit import verify

slow = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "deployment.md"
# member -> its private domain; named like the simulated members of tests/e2e/test_simulation.py, so
# the deployed run trains exactly what the simulated one does (same data order, same seeds)
MEMBERS = {"changelogs": "changelogs", "code": "code", "legal": "legal"}
RUN_CONFIG = {
    "num-rounds": 2, "local-steps": 8, "batch-size": 8, "seq-len": 64, "eval-batches": 2, "min-expert-tokens": 16,
    "min-members": 3, "round-timeout": 300.0, "contribution-permutations": 10,
    # the deployed run uses secure aggregation: its five stages go over the real gRPC links
    "secagg": "on", "codec": "randk0.1+int8", "codec-clip": 0.05, "secagg-timeout": 120.0,
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def stop_all(processes: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM every supervisor, then SIGKILL anything left of their process trees (read first)."""
    trees = {p.pid: process_tree(p.pid) for p in processes}
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(q) for tree in trees.values() for q in tree):
        time.sleep(0.2)
    for tree in trees.values():
        for q in tree:
            if _alive(q):
                os.kill(q, signal.SIGKILL)
    for p in processes:
        p.wait(timeout=10)


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def sample(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def documented_metrics(section: str) -> list[str]:
    """Metric names in the table under `## <section>` of docs/deployment.md (GPU-only and DP-only
    rows aside: a deployment without CUDA or DP-SGD has nothing to report there; the DP rows are
    read in tests/server/test_dp_rounds.py)."""
    text = DOCS.read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `(fedmoe_\w+)`[^\n]*$", text, re.MULTILINE)
            if "GPU only" not in m.group(0) and "DP only" not in m.group(0)]


@dataclass
class Deployment:
    ws: Workspace
    root: Path
    layout: CertLayout
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    joins: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server_scrape: str | None = None
    daemon_scrapes: dict[str, str] = field(default_factory=dict)
    rogue_code: int | None = None
    rogue_output: str = ""
    run_seconds: float = 0.0
    port: int = 0  # members' side: the Fleet API proxy
    superlink_port: int = 0  # the SuperLink itself, on loopback
    prometheus_port: int | None = None  # the distribution's Prometheus scraping the run (None: not installed)
    hub_metrics_port: int = 0  # where Prometheus expects the hub (started by the hub's test)
    started_wall: float = 0.0
    kill_file: Path = Path()  # FEDMOE_KILL_AT_FILE of the operator's ServerApps (server/faults.py)

    def spawn(self, name: str, *args: str, threads: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", **(env or {})}
        if threads:  # 3 members' trainers share this machine's cores
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        out = open(self.root / f"{name}.out", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "fedmoe.deploy_cmd", *args], env=env, stdout=out,
                             stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.processes.append(p)
        return p

    def output(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.is_file() else ""


def _wait(what: str, until, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{log}")
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout:.0f}s")


def launch(root: Path, template: Workspace, *, rogue: bool = False) -> tuple[Deployment, int, dict[str, int]]:
    """Certificates, the members' own keys registered, `fedmoe serve` (its ServerApps armed through
    the kill file, server/faults.py) and one `fedmoe join` per member, on 127.0.0.1 under `root`;
    with `rogue`, one more daemon whose key is not registered. Returns once the SuperLink is
    ready (the daemons still starting), with the operator's and the daemons' metrics ports."""
    ws = Workspace(root / "consortium")
    shutil.copytree(template.corpora, ws.corpora)
    shutil.copytree(template.base, ws.base)
    layout = issue(root / "certs", ["rogue"]).layout
    layout.registered_key("rogue").unlink()  # rogue has a key pair and the CA, but is not registered
    ensure_app_key(layout)  # the proxy signs the operator's app; members trust only that key
    # the members make their keys on their own machines and hand over public halves only
    for member in MEMBERS:
        registration, _ = member_keys(member, root / "nodes" / member)
        assert register(layout, registration)
    assert sorted(verify_roster(roster_path(layout).read_bytes(), load_cert(layout.ca_cert), "roster")) == sorted(MEMBERS)
    d = Deployment(ws, root, layout, kill_file=root / "kill-at")
    port, metrics_port = free_port(), free_port()
    d.port, d.superlink_port = port, free_port()
    serve = d.spawn("serve", "serve", "--certs", str(layout.root), "--state", str(root / "operator"),
                    "--port", str(port), "--superlink-port", str(d.superlink_port), "--metrics-port", str(metrics_port),
                    "--price-gpu-hour", "2.0", "--price-million-tokens", "0.5", "--log-file", str(root / "superlink.log"),
                    env={FILE_ENV: str(d.kill_file)})
    daemon_ports: dict[str, int] = {}
    try:
        _wait("serve ready", lambda: "SuperLink ready" in d.output("serve"), 90, serve, d.output("serve"))
        assert d.output("serve").count("registered (node") == 3
        spawn_daemons(d, daemon_ports, rogue)
    except BaseException:
        stop_all(d.processes)
        raise
    return d, metrics_port, daemon_ports


def spawn_daemons(d: Deployment, daemon_ports: dict[str, int], rogue: bool) -> None:
    ws, layout, root, port = d.ws, d.layout, d.root, d.port
    for member in [*MEMBERS, *(["rogue"] if rogue else [])]:
        daemon_ports[member] = free_port()
        p = d.spawn(member, "join", "--superlink", f"127.0.0.1:{port}", "--member", member,
                    "--data", str(ws.members_dir / MEMBERS.get(member, "readmes")),
                    "--ca", str(layout.member_ca("rogue") if member == "rogue" else layout.operator_ca),
                    "--key", str(layout.member_key(member) if member == "rogue" else root / "nodes" / member / "keys" / "auth_key"),
                    *([] if member == "rogue" else ["--roster", str(roster_path(layout))]),
                    "--state-dir", str(root / "nodes" / member), "--base", str(ws.base),
                    "--metrics-port", str(daemon_ports[member]), "--clientapp-port", str(free_port()),
                    "--log-file", str(root / f"{member}-supernode.log"), threads=1)
        if member != "rogue":
            d.joins[member] = p


@pytest.fixture(scope="module")
def deployment(tiny_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    root = tmp_path_factory.mktemp("deployment")
    d, metrics_port, daemon_ports = launch(root, tiny_workspace, rogue=True)
    request.addfinalizer(lambda: stop_all(d.processes))
    serve, ws = d.processes[0], d.ws
    rogue = d.processes[-1]
    d.hub_metrics_port = free_port()
    d.prometheus_port = start_prometheus(d, {"fedmoe-operator": [metrics_port], "fedmoe-hub": [d.hub_metrics_port],
                                             "fedmoe-members": [daemon_ports[m] for m in MEMBERS]})
    d.rogue_code = rogue.wait(timeout=90)
    d.rogue_output = d.output("rogue") + (root / "rogue-supernode.log").read_text(errors="replace")

    started, d.started_wall = time.monotonic(), time.time()
    submit(d, RUN_CONFIG)
    checkpoints = Checkpoints(ws.run_dir("default"))

    def round_1_seen_live() -> bool:  # scrape while round 2 is running
        text = scrape(metrics_port)
        if text is not None and (sample(text, "fedmoe_round") or 0) >= 1 and d.server_scrape is None:
            d.server_scrape = text
            for member in MEMBERS:
                d.daemon_scrapes[member] = scrape(daemon_ports[member]) or ""
        return (checkpoints.latest_round() or 0) >= 2

    _wait("2 committed rounds", round_1_seen_live, 300, serve,
          d.output("serve") + (root / "superlink.log").read_text(errors="replace")[-4000:])
    d.run_seconds = time.monotonic() - started
    return d


def submit(d: Deployment, config: dict[str, object]) -> str:
    """`fedmoe submit` of the fedmoe app with `config` on the deployment's workspace: the run id."""
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted
        [sys.executable, "-m", "fedmoe.deploy_cmd", "submit", "--flwr-home", str(d.root / "operator" / "flwr-home"),
         "--app", str(ROOT), "-c", f"workspace={d.ws.root}", *(f"-c{k}={json.dumps(v)}" for k, v in config.items())],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def run_status(d: Deployment, run_id: str) -> str:
    """The run's status as Flower reports it to the operator (`flwr ls`): e.g. finished:completed."""
    listed = _flwr(d.root / "operator" / "flwr-home", "ls", CONNECTION, "--run-id", run_id, "--format", "json")
    text = listed.stdout
    return json.loads(text[text.index("{"): text.rindex("}") + 1])["runs"][0]["status"]


def start_prometheus(d: Deployment, targets: dict[str, list[int]]) -> int | None:
    """Debian's Prometheus with the shipped scrape config, its targets pointed at this machine's
    ports and every interval 1 s; None when no prometheus is installed (its test then fails)."""
    unpacked = ROOT / ".fedmoe" / "prometheus" / "usr" / "bin" / "prometheus"  # where `make test` puts Debian's
    binary = str(unpacked) if unpacked.is_file() else shutil.which("prometheus")
    if binary is None:
        return None
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "1s"
        labels = job["static_configs"][0].get("labels", {})
        job["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in targets[job["job_name"]]], "labels": labels}]
    path = d.root / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    out = open(d.root / "prometheus.out", "wb")  # noqa: SIM115
    d.processes.append(subprocess.Popen(
        [binary, f"--config.file={path}", f"--storage.tsdb.path={d.root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    _wait("prometheus ready", lambda: _prometheus_get(port, "/-/ready") is not None, 60, d.processes[-1],
          (d.root / "prometheus.out").read_text(errors="replace"))
    return port


def _prometheus_get(port: int, path: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            body = r.read().decode()
    except OSError:
        return None
    return json.loads(body) if body.startswith("{") else {}


def prometheus_query(port: int, expr: str, start: float, end: float) -> list[dict]:
    """The series a range query returns (what a Grafana panel draws), evaluated every second
    back from `end` (so that the last point is `end` itself)."""
    start = end - math.ceil(end - start)
    query = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"})
    reply = _prometheus_get(port, f"/api/v1/query_range?{query}")
    assert reply and reply.get("status") == "success", (expr, reply)
    return reply["data"]["result"]


@slow
def test_two_rounds_over_tls_with_node_auth_lower_validation_loss_and_commit(deployment: Deployment) -> None:
    d = deployment
    manifests = Checkpoints(d.ws.run_dir("default")).manifests()
    assert [m["round"] for m in manifests] == [0, 1, 2]
    assert Checkpoints(d.ws.run_dir("default")).load().round == 2
    for m in manifests[1:]:
        assert sorted(r["member"] for r in m["members"]) == sorted(MEMBERS) and not m["rejected"], m["rejected"]
    before, after = manifests[0]["val_loss"], manifests[-1]["val_loss"]
    for domain in MEMBERS.values():
        assert after[domain] < before[domain], (domain, before[domain], after[domain])
    assert d.ws.ledger("default").is_file()
    # secure aggregation ran over the SuperLink: every member took part in the five stages, and
    # the operator pinned each member's identity key; no member's update was stored
    for m in manifests[1:]:
        assert m["contribution"]["mode"] == "secure"
        assert all(r["secagg_seconds"] > 0 for r in m["members"])
    assert set(json.loads((d.ws.operator_dir / "identities.json").read_text())) == set(MEMBERS)
    for member in MEMBERS:
        assert (d.root / "nodes" / member / "identity-ed25519.pem").stat().st_mode & 0o077 == 0
    # the SuperLink really ran with TLS, node authentication and its database
    superlink = (d.root / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink or "Uvicorn running on https" in d.output("serve") + superlink
    assert (d.root / "operator" / "superlink.db").is_file()
    print(f"deployed 2 rounds in {d.run_seconds:.0f}s")


@slow
def test_a_supernode_with_an_unregistered_key_is_refused(deployment: Deployment) -> None:
    assert deployment.rogue_code == 3, deployment.rogue_output  # fedmoe join: refused by the SuperLink
    assert "refused member 'rogue'" in deployment.rogue_output
    assert "Failed to activate SuperNode" in deployment.rogue_output
    assert "SuperNode ID" not in deployment.rogue_output  # it never got a node id
    for member in MEMBERS:
        assert "SuperNode ID" in (deployment.root / f"{member}-supernode.log").read_text()


@slow
def test_metrics_endpoints_serve_every_documented_metric_during_the_run(deployment: Deployment) -> None:
    text = deployment.server_scrape
    assert text is not None, "the operator's metrics endpoint was never reachable during the run"
    names = documented_metrics("Operator metrics")
    assert len(names) >= 15
    missing = [n for n in names if sample(text, n) is None]
    assert not missing, missing
    assert sample(text, "fedmoe_round") >= 1
    assert sample(text, "fedmoe_bytes_up_total") > 0 and sample(text, "fedmoe_bytes_down_total") > 0
    assert sample(text, "fedmoe_estimated_cost_total") > 0  # priced with --price-gpu-hour 2.0
    for domain in MEMBERS.values():
        assert re.search(rf'^fedmoe_validation_loss\{{domain="{domain}"\}} ', text, re.MULTILINE)
    daemon_names = documented_metrics("Member daemon metrics")
    for member, scraped in deployment.daemon_scrapes.items():
        missing = [n for n in daemon_names if sample(scraped, n) is None]
        assert not missing, (member, missing)
        assert sample(scraped, "fedmoe_daemon_rounds_trained_total") >= 1
        assert sample(scraped, "fedmoe_daemon_tokens_per_second") > 0


def _fedmoe(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedmoe"), *args]


@slow
def test_prometheus_scrapes_operator_members_and_hub_and_every_dashboard_query_has_data(deployment: Deployment) -> None:
    d = deployment
    assert d.prometheus_port is not None, "no prometheus (`make test` unpacks Debian's package into .fedmoe/prometheus)"
    hub_port = free_port()
    out = open(d.root / "hub.out", "wb")  # noqa: SIM115
    hub = subprocess.Popen(_fedmoe("hub", "--workspace", str(d.ws.root), "--certs", str(d.layout.root), "--port", str(hub_port),
                                   "--metrics-port", str(d.hub_metrics_port)), stdout=out, stderr=subprocess.STDOUT,
                           cwd=ROOT, start_new_session=True)
    d.processes.append(hub)
    _wait("hub up", lambda: "hub on" in (d.root / "hub.out").read_text(errors="replace"), 90, hub,
          (d.root / "hub.out").read_text(errors="replace"))
    member = ["--hub", f"127.0.0.1:{hub_port}", "--ca", str(d.layout.operator_ca)]
    pulled = d.root / "pulled-base"
    public = d.root / "operator.pub.pem"
    public.write_bytes(OperatorKey.load(d.ws.operator_key).public_key_pem())
    pull = subprocess.run(_fedmoe("pull", *member, "--member", "changelogs", "--state-dir", str(d.root / "nodes" / "changelogs"),
                                  "--operator-key", str(public), "--out", str(pulled), "--base"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    # two secure rounds of three members cannot tell them apart yet: every share is 0, so base only
    generate = subprocess.run(_fedmoe("generate", *member, "--member", "code", "--state-dir", str(d.root / "nodes" / "code"),
                                      "--prompt", "Release notes:"), capture_output=True, text=True, timeout=120, check=False)
    assert generate.returncode == 1 and "PERMISSION_DENIED" in generate.stdout + generate.stderr, generate.stdout + generate.stderr
    served = sum(f["size"] for f in json.loads((pulled / "hub-manifest.json").read_text())["files"])
    assert served == sum(f.stat().st_size for f in pulled.rglob("*") if f.is_file() and not f.name.startswith("hub-manifest"))
    port = d.prometheus_port

    def hub_scraped() -> bool:
        now = time.time()
        rows = prometheus_query(port, 'fedmoe_hub_refusals_total{reason="PERMISSION_DENIED"}', now - 5, now)
        return bool(rows) and float(rows[0]["values"][-1][1]) >= 1

    _wait("prometheus scrapes the hub's refusal", hub_scraped, 30)
    end = time.time()
    dashboard = json.loads((DEPLOY / "grafana" / "fedmoe-dashboard.json").read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    results = {expr: prometheus_query(port, expr, d.started_wall, end) for _, expr in queries}
    cuda = torch.cuda.is_available()
    gpu = {expr for _, expr in queries if "fedmoe_daemon_gpu_" in expr}  # what members on CUDA report
    assert len(gpu) == 3
    empty = [f"{title}: {expr}" for title, expr in queries if not results[expr] and (expr not in gpu or cuda)]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    if not cuda:  # GPU panels are for members on CUDA: on this machine no series may appear from nowhere
        assert all(not results[expr] for expr in gpu)

    def last(expr: str, **labels: str) -> float:
        rows = [r for r in results[expr] if all(r["metric"].get(k) == v for k, v in labels.items())]
        assert len(rows) == 1, (expr, labels, results[expr])
        return float(rows[0]["values"][-1][1])

    assert last("sum by (member) (fedmoe_hub_bytes_served_total)", member="changelogs") == served
    assert last("sum by (member) (fedmoe_hub_bytes_served_total)", member="code") == 0
    assert last("sum by (reason) (fedmoe_hub_refusals_total)", reason="PERMISSION_DENIED") == 1
    assert last("sum by (member, kind) (fedmoe_hub_tokens_metered_total)", member="code", kind="completion") == 0
    assert max(float(v) for _, v in results["fedmoe_round"][0]["values"]) == 2  # the operator, scraped during the run
    assert {r["metric"]["member"] for r in results["fedmoe_daemon_rounds_trained_total"]} == set(MEMBERS)


@slow
def test_report_of_the_deployed_run_has_nontrivial_plots(deployment: Deployment, tmp_path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    out = tmp_path / "report"
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted
        [sys.executable, "-m", "fedmoe.deploy_cmd", "report", "--run-dir", str(deployment.ws.run_dir("default")),
         "--out", str(out), "--price-gpu-hour", "2.0"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("loss", "bytes", "shares", "cost"):
        path = out / f"{name}.png"
        assert path.stat().st_size > 5_000
        pixels = mpimg.imread(path)
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300
        assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10
    assert "| code |" in (out / "summary.md").read_text()


# The operator's ServerApp SIGKILLed at kill points of a round over the real SuperLink, whose
# process and the members' SuperNodes stay up, as after a ServerApp crash (the OOM killer, a
# fault); the operator submits the run again after each kill. Every point of a round, each on
# its own and with what a restart does there, is in tests/e2e/test_kill_points.py (killed operator
# processes over the in-memory grid), and all of them chained over a deployment in
# bench/deployed_faults.py; a deployed round costs about a minute here, so this test chains
# three kills that each leave a different thing behind, in one 1-round run beside the fixture's:
# - in-unmask: members have revealed shares of the killed session; the re-run's new session
#   is answered (the same survivors) and round 1 is trained again, to the identical update;
# - mid-commit: the decoded sums are journaled and the round's files half-written; the restart
#   finishes the round from the journal and must not ask the members again;
# - mid-ledger: round 1 is committed, its ledger append was killed; the restart appends it.
KILL_CHAIN = ("in-unmask", "mid-commit", "mid-ledger")


def killed_at(d: Deployment, config: dict[str, object], point: str) -> int | None:
    """Submit the run with its ServerApp armed to SIGKILL itself at `point`; the committed round
    after the kill."""
    assert point in ROUND_KILL_POINTS
    d.kill_file.write_text(point)
    try:
        run_id, deadline, asked = submit(d, config), time.monotonic() + 300, time.monotonic()
        while d.kill_file.exists():  # the ServerApp removes it just before it kills itself
            assert time.monotonic() < deadline, f"the ServerApp was not killed at {point} within 300s"
            if time.monotonic() - asked > 10:  # `flwr ls` costs a second of CPU: now and then
                asked = time.monotonic()
                if run_status(d, run_id).startswith("finished") and d.kill_file.exists():
                    raise AssertionError(f"the run ended without reaching {point}: {run_status(d, run_id)}")
            time.sleep(0.5)
    finally:
        d.kill_file.unlink(missing_ok=True)  # disarmed whatever happened: no later run takes this kill
    return Checkpoints(d.ws.run_dir(str(config["run-name"]))).latest_round()


def finished(d: Deployment, config: dict[str, object]) -> None:
    """Submit the run unarmed and wait until Flower reports it completed."""
    run_id, deadline = submit(d, config), time.monotonic() + 600
    while not (status := run_status(d, run_id)).startswith("finished"):  # `flwr ls`: a second of CPU a call
        assert time.monotonic() < deadline, f"run {run_id} not finished after 600s: {status}"
        assert d.processes[0].poll() is None, f"fedmoe serve exited: {d.output('serve')[-3000:]}"
        time.sleep(3)
    assert status == "finished:completed", d.output("serve")[-3000:]


def unmask_messages(d: Deployment) -> int:
    """Secure-aggregation unmask messages the members' SuperNodes have received, all runs together."""
    return sum((d.root / f"{m}-supernode.log").read_text(errors="replace").count("Receiving: train.secagg_unmask")
               for m in MEMBERS)


@slow
def test_a_serverapp_killed_at_kill_points_resumes_over_the_superlink_to_the_uninterrupted_state(
    deployment: Deployment,
) -> None:
    d, run_name = deployment, "killed"
    config = {**RUN_CONFIG, "num-rounds": 1, "run-name": run_name}
    committed = [killed_at(d, config, point) for point in KILL_CHAIN[:2]]
    unmasks = unmask_messages(d)  # the sums are journaled: no member is asked to unmask again
    assert unmasks >= 2 * len(MEMBERS)  # the fixture's 2 rounds and the re-run's: the count is read from the logs
    committed += [killed_at(d, config, point) for point in KILL_CHAIN[2:]]
    finished(d, config)
    assert committed == [0, 0, 1]
    assert unmask_messages(d) == unmasks
    reference = Checkpoints(d.ws.run_dir("default")).manifests()[1]["state_sha256"]
    assert [m["state_sha256"] for m in Checkpoints(d.ws.run_dir(run_name)).manifests()[1:]] == [reference]
    report = verify(d.ws.ledger(run_name), OperatorKey.load_or_create(d.ws.operator_key).public_key)
    assert report.ok, report.problem
    assert credit(d, run_name) == [r for r in credit(d, "default") if r[0] == 1]  # round 1's records, once each


def credit(d: Deployment, run_name: str) -> list[tuple[int, str, str, float, int]]:
    """The run's ledger: (round, member, kind, score, tokens) of every record, in order."""
    with Ledger(d.ws.ledger(run_name), create=False) as ledger:
        return [(r.round, r.member, r.kind, r.score, r.tokens) for r in ledger.records()]


@slow
def test_sigterm_stops_a_daemon_and_its_supernode_cleanly(deployment: Deployment) -> None:
    join = deployment.joins["legal"]
    tree = process_tree(join.pid)
    assert len(tree) >= 2  # the supervisor and flower-supernode (and its SuperExec)
    join.send_signal(signal.SIGTERM)
    assert join.wait(timeout=30) == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    assert not [p for p in tree if _alive(p)]
    assert "SIGTERM: stopping flower-supernode" in deployment.output("legal")


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], env={**os.environ, "FLWR_HOME": str(home)},
                          capture_output=True, text=True, timeout=120, check=False)


@slow
def test_members_reach_only_the_fleet_api_through_the_proxy(deployment: Deployment, tmp_path: Path) -> None:
    import httpx

    d, ca = deployment, str(deployment.layout.operator_ca)
    # a member holds the CA: the Control API through the members' port is refused, not served
    reply = httpx.post(f"https://127.0.0.1:{d.port}/v1/control/list-runs", content=b"", verify=ca, timeout=30)
    assert reply.status_code == 403 and "only the Fleet API" in reply.text
    assert httpx.get(f"https://127.0.0.1:{d.port}/v1/fleet/get-run", verify=ca, timeout=30).status_code == 403
    member_home = tmp_path / "member-flwr"
    write_connection(member_home, f"127.0.0.1:{d.port}", d.layout.operator_ca)
    listed = _flwr(member_home, "ls", CONNECTION, "--format", "json")
    assert '"success": true' not in listed.stdout, listed.stdout
    registered = _flwr(member_home, "supernode", "register", str(d.layout.member_public_key("rogue")), CONNECTION,
                       "--format", "json")
    assert '"success": true' not in registered.stdout, registered.stdout
    # the operator's own connection (loopback, the SuperLink itself) still works
    operator = _flwr(d.root / "operator" / "flwr-home", "ls", CONNECTION, "--format", "json")
    assert '"success": true' in operator.stdout, operator.stdout + operator.stderr
    # the SuperLink itself is bound to loopback
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in process_tree(d.processes[0].pid)]
    [superlink] = [c for c in commands if any(part.endswith(b"flower-superlink") for part in c)]
    assert superlink[superlink.index(b"--host") + 1] == b"127.0.0.1"
    assert superlink[superlink.index(b"--port") + 1] == str(d.superlink_port).encode()


@slow
def test_members_refuse_an_app_bundle_that_is_not_the_operators(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    for member in ("changelogs", "code"):  # the members run with the operator's app-signing key
        assert "no trusted-entities" not in d.output(member) and trusted_entities_path(d.layout).is_file()
    # someone submits the fedmoe app with one line changed (as a run reaching the Control API could)
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".fedmoe", "*.egg-info"))
    with (app / "client" / "app.py").open("a") as handle:
        handle.write("# exfiltrate the member's data here\n")
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(d.ws.corpora, ws.corpora)
    shutil.copytree(d.ws.base, ws.base)
    logs = {m: (d.root / f"{m}-supernode.log") for m in ("changelogs", "code")}
    before = {m: p.read_text(errors="replace").count("could not be verified") for m, p in logs.items()}
    submit = subprocess.run(
        [sys.executable, "-m", "fedmoe.deploy_cmd", "submit", "--flwr-home", str(d.root / "operator" / "flwr-home"),
         "--app", str(app), "-c", f"workspace={ws.root}", "-c", "num-rounds=1"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    _wait("the SuperNodes refuse the unsigned bundle",
          lambda: all(p.read_text(errors="replace").count("could not be verified") > before[m] for m, p in logs.items()), 120)
    assert "app bundle sent unsigned" in d.output("serve") and "client/app.py differs" in d.output("serve")
    assert Checkpoints(ws.run_dir("default")).latest_round() in (None, 0)  # nothing trained on the members


@slow
def test_a_revoked_member_is_unregistered_and_refused(deployment: Deployment) -> None:
    d = deployment
    serve = d.processes[0]
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=60) == 0
    revoke = subprocess.run([sys.executable, "-m", "fedmoe.deploy_cmd", "certs", "--out", str(d.layout.root), "--revoke", "legal"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert revoke.returncode == 0 and "member legal: revoked" in revoke.stderr, revoke.stderr
    again = d.spawn("serve-again", "serve", "--certs", str(d.layout.root), "--state", str(d.root / "operator"),
                    "--port", str(d.port), "--superlink-port", str(d.superlink_port), "--metrics-port", "0",
                    "--log-file", str(d.root / "superlink-again.log"))
    _wait("serve ready again", lambda: "SuperLink ready" in d.output("serve-again"), 90, again, d.output("serve-again"))
    assert "member legal: key revoked, node" in d.output("serve-again") and "unregistered" in d.output("serve-again")
    assert "legal" not in json.loads((d.root / "operator" / "members.json").read_text())
    join = d.spawn("legal-again", "join", "--superlink", f"127.0.0.1:{d.port}", "--member", "legal",
                   "--data", str(d.ws.members_dir / "legal"), "--ca", str(d.layout.operator_ca),
                   "--key", str(d.root / "nodes" / "legal" / "keys" / "auth_key"), "--state-dir", str(d.root / "nodes" / "legal"),
                   "--roster", str(d.root / "no-roster.json"),  # past the member-side check: the SuperLink must refuse
                   "--base", str(d.ws.base), "--metrics-port", "0", "--clientapp-port", str(free_port()),
                   "--log-file", str(d.root / "legal-again-supernode.log"), threads=1)
    assert join.wait(timeout=120) == 3, d.output("legal-again")  # refused by the SuperLink: its key is gone
    assert "refused member 'legal'" in d.output("legal-again")


# ------------------------------------------------------------------ deploy/ recipes (fast)
DEPLOY = ROOT / "deploy"


def _yaml(path: Path):  # type: ignore[no-untyped-def]
    import yaml

    return yaml.safe_load(path.read_text())


def _compose_tool() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        try:
            probe = subprocess.run([*argv, "version"], capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return argv
    return None


def test_compose_file_runs_an_operator_and_three_members_with_their_own_state() -> None:
    compose = _yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    members = sorted(name for name in services if name.startswith("member-"))
    assert members == ["member-1", "member-2", "member-3"]
    operator = services["operator"]["command"]
    assert operator[0] == "serve" and "--certs" in operator and "0.0.0.0" in operator
    assert "/state" in " ".join(services["operator"]["volumes"])
    states = set()
    for name in members:
        command, volumes = services[name]["command"], services[name]["volumes"]
        assert command[0] == "join" and command[command.index("--member") + 1] == name
        assert command[command.index("--key") + 1] == f"/certs/members/{name}/auth_key"
        assert command[command.index("--superlink") + 1] == "operator:9092"
        state = next(v.split(":")[0] for v in volumes if v.endswith(":/state"))
        assert state in compose["volumes"]
        states.add(state)
    assert len(states) == 3  # no two members share node-local state
    certs = services["certs"]["command"]
    assert certs[0] == "certs" and "operator" in certs  # the SuperLink's SAN matches the service name
    tool = _compose_tool()
    if tool is not None:  # the real validator where a compose CLI exists (docker compose / docker-compose)
        result = subprocess.run([*tool, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr


def _render(template: str, values: dict, release: str, chart: dict) -> str:
    """The subset of Helm templating the chart uses: {{ .Values.a.b }}, .Release.Name, .Chart.X, | quote."""

    def lookup(expr: str) -> str:
        expr, _, pipe = (part.strip() for part in expr.partition("|"))
        root, *path = expr.lstrip(".").split(".")
        value: object = {"Values": values, "Release": {"Name": release}, "Chart": chart}[root]
        for key in path:
            value = value[key]  # type: ignore[index]
        assert pipe in ("", "quote"), pipe
        return json.dumps(str(value)) if pipe == "quote" else str(value)

    rendered = re.sub(r"\{\{-?\s*(.*?)\s*-?\}\}", lambda m: lookup(m.group(1)), template)
    assert "{{" not in rendered
    return rendered


def test_helm_chart_renders_to_a_statefulset_and_service_for_the_operator() -> None:
    import yaml

    chart_dir = DEPLOY / "helm" / "fedmoe-operator"
    chart = _yaml(chart_dir / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "fedmoe-operator" and chart["version"]
    values = _yaml(chart_dir / "values.yaml")
    helm_chart = {"Name": chart["name"], "AppVersion": chart["appVersion"], "Version": chart["version"]}
    docs = []
    for template in sorted((chart_dir / "templates").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(_render(template.read_text(), values, "test", helm_chart)) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"StatefulSet", "Service"}
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"] == "test-operator"
    sts = kinds["StatefulSet"]["spec"]
    assert sts["selector"]["matchLabels"] == sts["template"]["metadata"]["labels"]
    container = sts["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--port") + 1] == str(values["superlink"]["port"])
    assert {p["containerPort"] for p in container["ports"]} == {values["superlink"]["port"], values["metrics"]["port"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tls"] == "/certs/operator" and args[args.index("--certs") + 1] == "/certs"
    assert mounts["member-keys"] == args[args.index("--member-keys") + 1]
    assert {c["metadata"]["name"] for c in sts["volumeClaimTemplates"]} == {"state", "workspace"}
    assert mounts["state"] == args[args.index("--state") + 1]
    service = kinds["Service"]["spec"]
    assert service["selector"] == sts["selector"]["matchLabels"]
    if shutil.which("helm"):
        result = subprocess.run(["helm", "lint", str(chart_dir)], capture_output=True, text=True, timeout=60,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_runs_fedmoe_join_and_stops_it_with_sigterm() -> None:
    unit = (DEPLOY / "systemd" / "fedmoe-member.service").read_text()
    sections = re.findall(r"^\[(\w+)\]$", unit, re.MULTILINE)
    assert sections == ["Unit", "Service", "Install"]
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.MULTILINE | re.DOTALL).group(1)
    for flag in ("join", "--superlink", "--member", "--data", "--ca", "--key", "--state-dir", "--base"):
        assert flag in exec_start, flag
    assert "KillSignal=SIGTERM" in unit and "KillMode=mixed" in unit
    env_keys = set(re.findall(r"^(FEDMOE_\w+)=", (DEPLOY / "systemd" / "member.env.example").read_text(), re.MULTILINE))
    assert set(re.findall(r"\$\{(FEDMOE_\w+)\}", unit)) <= env_keys
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / "fedmoe-member.service")],
                                capture_output=True, text=True, timeout=60, check=False)
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]  # fedmoe is not installed here
        assert not problems, problems


def test_prometheus_and_grafana_use_only_documented_metrics() -> None:
    documented = set(documented_metrics("Operator metrics")) | set(re.findall(r"`(fedmoe_\w+)`", DOCS.read_text()))
    scrape = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == {"fedmoe-operator", "fedmoe-members", "fedmoe-hub"}
    assert jobs["fedmoe-operator"]["static_configs"][0]["targets"] == ["operator:9400"]
    dashboard = json.loads((DEPLOY / "grafana" / "fedmoe-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"fedmoe_\w+", target["expr"])}
    assert used and used <= documented, used - documented
    assert {"fedmoe_validation_loss", "fedmoe_daemon_tokens_per_second", "fedmoe_estimated_cost_total"} <= used
