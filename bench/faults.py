"""Faults: kill points, a long soak with members dropping out, and the server's memory with 10 vs
100 members. Writes bench/results/faults.json.

- Kill points (server/faults.py): for each of a round's, a secure run of 2 rounds on the test
  suite's tiny consortium is SIGKILLed there (its own process), restarted, and its committed state
  digests compared with an uninterrupted run's; the ledger must verify. mid-export: `fedmoe export`
  of that run killed mid-export into no release (none must be left) and over a whole one (it must
  stay whole), each followed by an export that completes. `kill_points_survived_fraction` counts
  the kill points survived so (target 1.0).
- Soak: `--soak-rounds` secure rounds (default 100) in one process, each TRAIN and secure-
  aggregation message to a member lost with probability `--dropout` (default 0.2; the member
  drops out at that stage). A round that aborts (too few members) is retried (`round-retries`, no
  backoff here), and a round still aborted after its retries by resuming the run, as an
  operator's supervisor would; `soak_rounds_completed` counts committed rounds, and the
  process's resident memory after each round gives the growth over the soak (first tenth of the
  rounds vs the last tenth) and the children left running at the end (`leaked_processes`).
- Memory at scale: an open run with 10 and with 100 simulated members (each its own process,
  3 rounds; members do not train: each sends a random update of an honest size under honest
  token counts, so what grows with the count is the server's part), peak resident memory over
  the run; `rss_ratio_100_vs_10` (target <= 1.3).
Members run in-process through the test suite's grid (tests/server/fake_grid.py): the real
ClientApp, messages passed in memory.
Run: `.venv/bin/python bench/faults.py [--soak-rounds 100] [--dropout 0.2]` (~8 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from model.chatter import silence_library_chatter
from server.checkpoint import Checkpoints
from model.io import sha256_file
from server.faults import ENV, KILL_POINTS, ROUND_KILL_POINTS
from server.init import init_workspace
from server.ledger import OperatorKey
from server.ledger.audit import verify
from server.workspace import Workspace

# the test suite's grid and tiny consortium; after the project's packages are imported, since
# tests/model would otherwise shadow the project's `model` package
TESTS = Path(__file__).parents[1] / "tests"
sys.path[:0] = [str(TESTS / "server"), str(TESTS)]

RESULTS = Path(__file__).parent / "results" / "faults.json"
SECURE = dict(local_steps=2, batch_size=4, seq_len=64, eval_batches=1, min_expert_tokens=8, min_members=2,
              round_timeout=30.0, codec="randk0.2+int8", codec_clip=0.05, secagg="on", secagg_timeout=5.0,
              secagg_threshold=3, contribution="off")


def fresh(template: Workspace, root: Path) -> Workspace:
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(template.root, root, ignore=shutil.ignore_patterns("runs", "nodes", "identities.json"))
    return Workspace(root)


def child(args: list[str], kill_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, timeout=900).returncode


def kill_points(template: Workspace, tmp: Path, console: Console) -> dict:
    reference = fresh(template, tmp / "reference")
    if child(["--child", "secure", str(reference.root)]) != 0:
        raise RuntimeError("the uninterrupted reference run failed")
    want = [m["state_sha256"] for m in Checkpoints(reference.run_dir("k")).manifests()]
    rows = {}
    for point in ROUND_KILL_POINTS:
        ws = fresh(template, tmp / point)
        killed = child(["--child", "secure", str(ws.root)], kill_at=point)
        resumed = child(["--child", "secure", str(ws.root)])
        got = [m["state_sha256"] for m in Checkpoints(ws.run_dir("k")).manifests()]
        ledger = verify(ws.ledger("k"), OperatorKey.load_or_create(ws.operator_key).public_key)
        ok = killed == -signal.SIGKILL and resumed == 0 and got == want and ledger.ok
        rows[point] = {"killed_rc": killed, "resumed_rc": resumed, "identical_state": got == want,
                       "ledger_ok": ledger.ok, "survived": ok}
        console.print(f"kill point {point}: {'resumed to the identical state' if ok else rows[point]}")
    rows["mid-export"] = export_kills(reference)
    console.print(f"kill point mid-export: {rows['mid-export']}")
    assert set(rows) == set(KILL_POINTS)
    return {"kill_points_survived_fraction": sum(r["survived"] for r in rows.values()) / len(rows), "kill_points": rows}


def export_kills(ws: Workspace) -> dict:
    """`fedmoe export` of the run's last round killed mid-export, into no release and then over a
    whole one: the folder must be absent, then the previous release, whole; each re-run completes."""
    out = ws.root.parent / f"{ws.root.name}-release"
    export = ["--child", "export", str(ws.root)]
    fresh_killed = child(export, kill_at="mid-export")
    absent = not out.exists()
    first_rc, first = child(export), whole_release(out)
    over_killed = child(export, kill_at="mid-export")
    kept = first is not None and whole_release(out) == first
    again_rc = child(export)
    ok = (fresh_killed == over_killed == -signal.SIGKILL and absent and first_rc == again_rc == 0 and kept
          and whole_release(out) is not None)
    return {"killed_rc": [fresh_killed, over_killed], "reexport_rc": [first_rc, again_rc], "absent_after_first_kill": absent,
            "previous_release_whole_after_second_kill": kept, "survived": ok}


def whole_release(out: Path) -> dict[str, str] | None:
    """The release's files (path -> sha256) if they are exactly what its release.json lists, each
    with its digest; None for anything else (missing, half-written)."""
    try:
        info = json.loads((out / "release.json").read_text())
    except (OSError, ValueError):
        return None
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"release.json"}
    if files != set(info["sha256"]) or any(sha256_file(out / f) != d for f, d in info["sha256"].items()):
        return None
    return info["sha256"]


def soak(template: Workspace, tmp: Path, rounds: int, dropout: float, console: Console) -> dict:
    from client.app import app
    from fake_grid import FakeGrid, task_identity
    from server.config import RunConfig
    from server.rounds import RoundAborted, run_rounds
    from server.summary import LogReporter

    from protos.messages import SECAGG_STAGES, TRAIN, secagg_message_type

    ws = fresh(template, tmp / "soak")
    # members answer inside the grid's push (in process): a reply missing after a short wait never comes
    config = RunConfig(workspace=str(ws.root), num_rounds=rounds,
                       **{**SECURE, "round_timeout": 2.0, "secagg_timeout": 0.5, "round_retry_backoff": 0.0})
    rng = random.Random(0)
    stages = [TRAIN, *(secagg_message_type(s) for s in SECAGG_STAGES)]
    plan: dict[int, str | None] = {}  # node -> the stage it drops out at this round (None: stays)
    dropped: dict[str, int] = {}

    def drop(node: int, kind: str) -> bool:
        if kind not in stages:
            return False
        if kind == TRAIN:  # a new round: does this member drop out of it, and where?
            plan[node] = rng.choice(stages) if rng.random() < dropout else None
            if plan[node]:
                dropped[plan[node]] = dropped.get(plan[node], 0) + 1
        stage = plan.get(node)
        return stage is not None and stages.index(kind) >= stages.index(stage)

    process = psutil.Process()
    rss: list[int] = []

    class Watch(LogReporter):
        def round_finished(self, summary) -> None:  # noqa: ANN001
            rss.append(process.memory_info().rss)
            if summary.round % 10 == 0:
                console.print(f"soak: round {summary.round} committed, {len(summary.members)} members, "
                              f"RSS {rss[-1] / 2**20:.0f} MiB")

    aborted, began = 0, time.perf_counter()
    with task_identity():
        while (Checkpoints(ws.run_dir("soak")).latest_round() or 0) < rounds:
            try:
                run_rounds(FakeGrid(app, 5, drop=drop), config, Watch(), run_name="soak")
            except RoundAborted:
                aborted += 1  # resumed at the last committed round: the round runs again
            if aborted > rounds:
                break
    completed = Checkpoints(ws.run_dir("soak")).latest_round() or 0
    tenth = max(1, len(rss) // 10)
    first, last = sum(rss[:tenth]) / tenth, sum(rss[-tenth:]) / tenth
    return {
        "soak_rounds_completed": completed, "soak_rounds_target": rounds, "soak_dropout": dropout,
        "soak_rounds_aborted_and_retried": aborted, "soak_messages_dropped": dropped,
        "soak_seconds": time.perf_counter() - began,
        "soak_rss_growth": last / first - 1, "soak_rss_first_tenth_mib": first / 2**20,
        "soak_rss_last_tenth_mib": last / 2**20, "soak_rss_per_round_mib": [r / 2**20 for r in rss],
        "leaked_processes": len(process.children(recursive=True)),
    }


def memory_at(members: int, root: Path) -> dict:
    """Child process: an open run of 3 rounds with `members` simulated members; peak RSS."""
    from client import app as client_app
    from client.node import Node
    from fake_grid import FakeGrid, simulated_member, task_identity
    from server.config import RunConfig
    from server.rounds import run_rounds
    from server.summary import LogReporter

    def node_of(context, hints):  # noqa: ANN001, ANN202 - member i of `members`, each its own name and state dir
        i = int(context.node_config["partition-id"])
        name = f"sim{i:03d}"
        return Node(name, Path(hints.members_dir), Path(hints.nodes_dir) / name, Path(hints.base_path))

    from flwr.clientapp import ClientApp

    client_app.node_of = node_of  # serve_train looks it up when called
    app = ClientApp()

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        return client_app.serve_train(msg, context, simulated_member)

    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    config = RunConfig(workspace=str(root), num_rounds=3, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                       min_expert_tokens=1, min_members=2, round_timeout=120.0, codec="int8", contribution="off")
    before = process.memory_info().rss
    with task_identity():
        summaries = run_rounds(FakeGrid(app, members), config, LogReporter(), run_name="scale")
    done.set()
    return {"members": members, "rss_before_mib": before / 2**20, "rss_peak_mib": peak[0] / 2**20,
            "members_aggregated": [len(s.members) for s in summaries]}


def scale(template: Workspace, tmp: Path, console: Console) -> dict:
    rows = {}
    for members in (10, 100):
        ws = fresh(template, tmp / f"scale-{members}")
        out = subprocess.run([sys.executable, __file__, "--child", f"scale{members}", str(ws.root)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"memory run with {members} members failed: {out.stderr[-2000:]}")
        rows[members] = json.loads(out.stdout.strip().splitlines()[-1])
        console.print(f"{members} members: {rows[members]}")
    return {"rss_ratio_100_vs_10": rows[100]["rss_peak_mib"] / rows[10]["rss_peak_mib"], "scale": rows}


def run_child(kind: str, root: Path) -> None:
    silence_library_chatter()
    if kind == "secure":
        from client.app import app
        from fake_grid import FakeGrid, task_identity
        from server.config import RunConfig
        from server.rounds import run_rounds
        from server.summary import LogReporter

        with task_identity():
            run_rounds(FakeGrid(app, 5), RunConfig(workspace=str(root), num_rounds=2, **SECURE), LogReporter(),
                       run_name="k")
    elif kind == "export":  # as `fedmoe export --run-name k --out <workspace>-release`
        from fedmoe.cli import _export

        _export(root, "k", root.parent / f"{root.name}-release")
    else:
        print(json.dumps(memory_at(int(kind.removeprefix("scale")), root)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-rounds", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], Path(args.child[1]))
        return
    silence_library_chatter()
    console = Console(width=max(Console().width, 140))
    from conftest import TINY_INIT  # the test suite's tiny consortium: the faults, not the model, are measured

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        template = Workspace(tmp / "template")
        init_workspace(template, TINY_INIT, log=lambda _: None)
        result: dict = {"targets": {"kill_points_survived_fraction": 1.0, "rss_ratio_100_vs_10": 1.3,
                                    "soak_rounds_completed": args.soak_rounds}}
        result.update(kill_points(template, tmp, console))
        result.update(soak(template, tmp, args.soak_rounds, args.dropout, console))
        result.update(scale(template, tmp, console))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result["commit"] = commit
    table = Table(title="faults")
    for col in ("measure", "value", "target"):
        table.add_column(col, justify="right")
    table.add_row("kill points survived", f"{result['kill_points_survived_fraction']:.2f}", "1.0")
    table.add_row(f"soak rounds completed (dropout {args.dropout:.0%})", str(result["soak_rounds_completed"]),
                  f">= {args.soak_rounds}")
    table.add_row("soak RSS growth (last tenth vs first)", f"{result['soak_rss_growth']:+.1%}", "flat")
    table.add_row("leaked processes", str(result["leaked_processes"]), "0")
    table.add_row("server peak RSS, 100 members vs 10", f"{result['rss_ratio_100_vs_10']:.2f}", "<= 1.3")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
