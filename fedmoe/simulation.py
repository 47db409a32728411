"""An embedded consortium on the path Flower supports going forward: a local SuperLink in
simulation mode (`flower-superlink --simulation`) and `flwr run --stream`.

The SuperLink listens on a free loopback port only, keeps its state in memory and lives as long
as the run; Flower builds the fedmoe app (pyproject.toml) into a FAB and runs the ServerApp and
one simulated SuperNode per member (Ray actors) in its own process. That process prints its
progress as JSON lines (server/summary.py EventReporter, chosen by FEDMOE_PROGRESS=events), which
come back through the streamed log and are replayed here into the caller's reporter, so the CLI's
progress bars move as before. Nothing of Flower's deprecated in-process `run_simulation` is used.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedmoe.flower_deploy import DeployError, flower_bin, flower_env, run_config_string
from fedmoe.processes import Child, free_port, stop_tree, wait_for_port
from server.app import PROGRESS_ENV
from server.binding import LOCAL_ENV, REGISTRY_ENV
from server.config import RunConfig
from server.summary import EVENT, Reporter, RoundSummary, summary_from_dict
from server.workspace import Workspace

CONNECTION = "fedmoe-simulation"  # the local SuperLink's connection in the workspace's FLWR_HOME
STARTUP_SECONDS = 60.0


class SimulationFailed(RuntimeError):
    """The run did not finish; the committed rounds on disk are intact."""


@dataclass
class SimulationResult:
    """What the run reported: one summary per round committed by this call, and its notes."""

    summaries: list[RoundSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failure: str | None = None
    finished: bool = False
    flower_lines: list[str] = field(default_factory=list)  # the rest of the log (the last 200 lines)


def app_dir() -> Path:
    """The fedmoe project folder that Flower builds into a FAB (its pyproject names the apps)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SimulationFailed(f"{root}: no pyproject.toml; run from a checkout of fedmoe (pip install -e .)")
    return root


def federation_config(num_nodes: int, cpus_per_member: int) -> str:
    """`flwr run --federation-config`: simulated SuperNodes and their resources. On a machine with
    CUDA, the members share its GPUs (fractions Ray schedules); otherwise they run on CPU."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per_member = min(1.0, gpus / num_nodes) if gpus else 0.0
    values = {
        "num-supernodes": num_nodes,
        "client-resources-num-cpus": cpus_per_member,
        "client-resources-num-gpus": per_member,
        "init-args-num-cpus": max(cpus_per_member, os.cpu_count() or 1),
        "init-args-num-gpus": gpus,
    }
    return run_config_string(values)


def write_local_connection(flwr_home: Path, port: int) -> None:
    """The connection `flwr run` uses: this SuperLink, insecure on loopback (nothing leaves it)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def replay(line: str, reporter: Reporter, result: SimulationResult) -> bool:
    """Pass one EventReporter line on to `reporter`; False when `line` holds no well-formed event
    (anything else in the log, a torn line, a line that only looks like one)."""
    at = line.find(EVENT)
    if at < 0:
        return False
    try:
        event = json.loads(line[at + len(EVENT):])
        kind = event.pop("event")
        _dispatch(kind, event, reporter, result)
    except Exception:  # noqa: BLE001 - a malformed event is log noise, never a crash of the caller
        return False
    return True


def _dispatch(kind: str, event: dict[str, Any], reporter: Reporter, result: SimulationResult) -> None:
    if kind == "start":
        reporter.start(int(event["first_round"]), int(event["num_rounds"]), bool(event["resumed"]))
    elif kind == "round_started":
        reporter.round_started(int(event["rnd"]), int(event["num_members"]))
    elif kind == "member_done":
        reporter.member_done(int(event["rnd"]), int(event["done"]), int(event["total"]))
    elif kind == "round_finished":
        summary = summary_from_dict(event["summary"])
        result.summaries.append(summary)
        reporter.round_finished(summary)
    elif kind == "note":
        result.notes.append(str(event["text"]))
        reporter.note(str(event["text"]))
    elif kind == "failed":
        result.failure = str(event["reason"])
    elif kind == "finished":
        result.finished = True
    else:
        raise ValueError(f"unknown event {kind!r}")


def simulate(
    config: RunConfig,
    reporter: Reporter,
    *,
    num_members: int | None = None,
    run_name: str | None = None,
    cpus_per_member: int = 2,
    free_rider: bool = False,
) -> SimulationResult:
    """Run the configured rounds with one simulated SuperNode per member of the workspace, and
    with `free_rider` one more that plays the labelled free rider (client/free_rider.py)."""
    ws = Workspace(config.workspace_path)
    members = ws.members()
    if not members:
        raise SimulationFailed(f"{ws.members_dir}: no members (run `fedmoe init`)")
    n = min(num_members or len(members), len(members))
    config = config.with_overrides(run_name=run_name or config.run_name, free_rider=free_rider)
    flwr_home = ws.root / "flwr-home"
    env = flower_env(flwr_home, {PROGRESS_ENV: "events", LOCAL_ENV: "1", "RAY_DEDUP_LOGS": "0",
                                 "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    env.pop(REGISTRY_ENV, None)  # simulated nodes are not the deployment's registered ones
    try:
        run_argv = [
            flower_bin("flwr"), "run", str(app_dir()), CONNECTION, "--stream",
            "--run-config", run_config_string(config.as_user_config()),
            "--federation-config", federation_config(n + int(free_rider), cpus_per_member),
        ]
        port = free_port()
        write_local_connection(flwr_home, port)
        superlink = Child.start("superlink", [
            flower_bin("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation", "--log-file", str(flwr_home / "superlink.log"),
        ], env, log=flwr_home / "superlink.out")
    except DeployError as exc:
        raise SimulationFailed(str(exc)) from None
    try:
        wait_for_port("127.0.0.1", port, STARTUP_SECONDS, superlink)
        return _run(run_argv, env, reporter)
    except DeployError as exc:
        raise SimulationFailed(f"local SuperLink: {exc} (see {flwr_home / 'superlink.out'})") from None
    finally:
        superlink.stop()


def _run(argv: list[str], env: dict[str, str], reporter: Reporter) -> SimulationResult:
    """`flwr run --stream`: replay its events; a run that did not finish raises SimulationFailed."""
    result = SimulationResult()
    tail: collections.deque[str] = collections.deque(maxlen=200)
    flwr = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert flwr.stdout is not None
        for raw in flwr.stdout:
            line = raw.rstrip("\n")
            if not replay(line, reporter, result) and line.strip():
                tail.append(line)
        code = flwr.wait()
    except BaseException:  # Ctrl-C or SIGTERM: stop streaming; the caller stops the SuperLink and its run
        stop_tree(flwr.pid, timeout=10)
        raise
    result.flower_lines = list(tail)
    if result.failure is not None:
        raise SimulationFailed(result.failure)
    if code != 0 or not result.finished:
        said = " | ".join(t.strip() for t in list(tail)[-3:])
        raise SimulationFailed(f"the simulated run did not finish (flwr run exit {code}): {said}")
    return result
