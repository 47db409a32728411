"""Measures crash safety, a soak with dropouts, and the server's memory at 10 vs 100 members.

Writes bench/results/faults.json.

- Kill points (server/faults.py): for each of a round's, a secure run of 2 rounds on the test
  suite's tiny consortium is SIGKILLed there (its own process), restarted, and its committed state
  digests compared with an uninterrupted run's; the ledger must verify. mid-export: `fedmoe export`
  of that run killed mid-export into no release (none must be left) and over a whole one (it must
  stay whole), each followed by an export that completes. `kill_points_survived_fraction` counts
  the kill points survived so (target 1.0).
- Soak: `--soak-rounds` secure rounds (default 100) in one process, each TRAIN and secure-
  aggregation message to a member lost with probability `--dropout` (default 0.2; the member
  drops out at that stage). A round that aborts for too few members is run again by run_rounds
  itself (`round-retries`, no backoff here): `soak_rounds_retried_in_run` counts the rounds it
  ran again (from the retry notes it emits), `soak_retries_in_run` the re-runs. A round still
  aborted after its retries ends run_rounds, and the bench resumes the run, as an operator's
  supervisor would: `soak_runs_resumed`. `soak_rounds_completed` counts committed rounds, and the
  process's resident memory after each round gives the growth over the soak (first tenth of the
  rounds vs the last tenth) and the children left running at the end (`leaked_processes`).
- Memory at scale: the peak resident memory of a run (its own process, 3 rounds) with 10 and with
  100 simulated members, on the tiny consortium with experts 4x wider and LoRA rank 64 (scale_init:
  a trainable state of 1.14M parameters, `state_params`), so that one member's int8 update is over 1
  MiB on the wire (`bytes_up_per_member`); the tiny one's is 10-30 kB, which even 100 held updates
  would not show in a ~500 MiB process. Both arms send dense int8. Open (secagg off):
  `rss_ratio_100_vs_10`, rows under `scale`, is the control: the server keeps every member's update
  of a round by design (the norm-bound median, robust aggregators and contribution scoring need
  them), each reply and its fp32 decoding, so 90 more members must show (~5.5 MiB each here); a
  ratio near 1 would mean the measure is blind. Secure (secagg on, a shared codec-clip, threshold
  and neighbours automatic: 6 of 9 holders at 10 members, 10 of 15 at 100):
  `rss_ratio_100_vs_10_secure`, rows under `scale_secure` (target <= 1.3): each masked vector is
  folded into its group's running sum as it is pulled (server/secure.py), so what should grow with
  members is keys, shares, signatures and reports, and the ring (12 bits a coordinate at 10 members,
  15 at 100). Measured besides: a record read through Flower's RecordDict.config_records
  (protos/messages.py from_record) is in a reference cycle (its _SyncedDict) until Python's cyclic
  collector runs, so some masked vectors outlive their fold (one round, traced peak 100 vs 10
  members: +51 MiB, +16 with the cycle removed). Caveats: the grid (tests/server/fake_grid.py,
  answer_on_pull) has a member answer when the server pulls its reply, so a stage's replies wait
  outside this process, as at a SuperLink, and no more than a pull's worth (server/grid.py
  PULL_BATCH) is here at once; a grid answering at push holds a stage's replies until pulled, 100
  masked vectors of ~2 MiB, and a server that streams could hardly be told from one that buffers
  them. The members run in this process too, one at a time, so the peak is the server's and one
  member's work. Simulated: the members' training only (tests/server/fake_grid.py simulated_member:
  a random update of an honest size under honest token counts, through the real reply path) and
  their names, sim000.., which are no folders of members_dir, so the bench gives client/app.py a
  node_of and a roster_of over those names (client/secure.py simulated_roster: each member's
  identity key in its own state dir). Everything else is the real ClientApp: encoding, error
  feedback, and under secagg the member's side of every stage (client/secure.py handle_stage), each
  with its own state dir.
Members run in-process through the test suite's grid (tests/server/fake_grid.py): the real
ClientApp, messages passed in memory. `--only kill|soak|scale` runs parts (written only to --out).
Run: `.venv/bin/python bench/faults.py [--soak-rounds 100] [--dropout 0.2]` (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from model.chatter import silence_library_chatter
from server.checkpoint import Checkpoints
from model.io import sha256_file
from server.faults import ENV, KILL_POINTS, ROUND_KILL_POINTS
from model.base import load_base
from server.init import InitConfig, init_workspace
from server.ledger import OperatorKey
from server.ledger.audit import verify
from server.workspace import Workspace

# the test suite's grid and tiny consortium; after the project's packages are imported, since
# tests/model would otherwise shadow the project's `model` package
TESTS = Path(__file__).parents[1] / "tests"
sys.path[:0] = [str(TESTS / "server"), str(TESTS)]

RESULTS = Path(__file__).parent / "results" / "faults.json"
RETRY_NOTE = re.compile(r"round (\d+): retry \d+ of \d+ in ")  # server/rounds.py run_rounds
SECURE = dict(local_steps=2, batch_size=4, seq_len=64, eval_batches=1, min_expert_tokens=8, min_members=2,
              round_timeout=30.0, codec="randk0.2+int8", codec_clip=0.05, secagg="on", secagg_timeout=5.0,
              secagg_threshold=3, contribution="off")
PARTS = ("kill", "soak", "scale")
SCALE_ROUNDS = {False: 3, True: 3}  # memory at scale: rounds of the open and of the secure arm


def scale_init(tiny: InitConfig) -> InitConfig:
    """The memory-at-scale consortium: the tiny one with experts 4x wider and LoRA rank 64, a
    trainable state of 1.14M parameters (the tiny one's: 23k), so that one member's int8 update is
    over 1 MiB on the wire; the expert adapters are most of it, as in a real MoE."""
    return replace(tiny, model=replace(tiny.model, intermediate_size=512), lora=replace(tiny.lora, rank=64, alpha=128))


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

    retried: dict[int, int] = {}  # round -> times run_rounds ran it again (its round-retries)

    class Watch(LogReporter):
        def round_finished(self, summary) -> None:  # noqa: ANN001
            rss.append(process.memory_info().rss)
            if summary.round % 10 == 0:
                console.print(f"soak: round {summary.round} committed, {len(summary.members)} members, "
                              f"RSS {rss[-1] / 2**20:.0f} MiB")

        def note(self, text: str) -> None:
            if retry := RETRY_NOTE.match(text):  # run_rounds' note before it runs the round again
                retried[int(retry[1])] = retried.get(int(retry[1]), 0) + 1
            super().note(text)

    resumed, began = 0, time.perf_counter()
    with task_identity():
        while (Checkpoints(ws.run_dir("soak")).latest_round() or 0) < rounds:
            try:
                run_rounds(FakeGrid(app, 5, drop=drop), config, Watch(), run_name="soak")
            except RoundAborted:
                resumed += 1  # run_rounds gave up on a round: resumed at the last committed round, it runs again
            if resumed > rounds:
                break
    completed = Checkpoints(ws.run_dir("soak")).latest_round() or 0
    tenth = max(1, len(rss) // 10)
    first, last = sum(rss[:tenth]) / tenth, sum(rss[-tenth:]) / tenth
    return {
        "soak_rounds_completed": completed, "soak_rounds_target": rounds, "soak_dropout": dropout,
        "soak_rounds_retried_in_run": len(retried), "soak_retries_in_run": sum(retried.values()),
        "soak_runs_resumed": resumed, "soak_messages_dropped": dropped,
        "soak_seconds": time.perf_counter() - began,
        "soak_rss_growth": last / first - 1, "soak_rss_first_tenth_mib": first / 2**20,
        "soak_rss_last_tenth_mib": last / 2**20, "soak_rss_per_round_mib": [r / 2**20 for r in rss],
        "leaked_processes": len(process.children(recursive=True)),
    }


def memory_at(members: int, secure: bool, root: Path) -> dict:
    """Child process: a run of `members` simulated members (open: SCALE_ROUNDS[False] rounds, int8;
    secure: SCALE_ROUNDS[True], secagg on); the process's peak RSS over the run."""
    from client import app as client_app
    from client.node import Node
    from client.secure import simulated_roster
    from fake_grid import FakeGrid, simulated_member, task_identity
    from flwr.clientapp import ClientApp
    from protos.messages import SECAGG_STAGES
    from server.config import RunConfig
    from server.rounds import run_rounds
    from server.summary import LogReporter

    names = [f"sim{i:03d}" for i in range(members)]  # not folders of members_dir: nobody reads their data

    def node_of(context, hints):  # noqa: ANN001, ANN202 - member i of `members`, each its own name and state dir
        name = names[int(context.node_config["partition-id"])]
        return Node(name, Path(hints.members_dir), Path(hints.nodes_dir) / name, Path(hints.base_path))

    def roster_of(node, hints):  # noqa: ANN001, ANN202 - the embedded roster over the simulated names
        return simulated_roster(Path(hints.nodes_dir), names)

    client_app.node_of, client_app.roster_of = node_of, roster_of  # the handlers look them up when called
    app = ClientApp()

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        return client_app.serve_train(msg, context, simulated_member)

    for stage in SECAGG_STAGES:  # the real member side of secure aggregation (client/secure.py handle_stage)
        app.train(f"secagg_{stage}")(client_app.secagg_handler(stage))

    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    shape = dict(local_steps=2, batch_size=4, seq_len=64, eval_batches=1, min_expert_tokens=1, min_members=2,
                 round_timeout=120.0, contribution="off", num_rounds=SCALE_ROUNDS[secure])
    mode = dict(codec="int8", codec_clip=0.05, secagg="on", secagg_timeout=60.0) if secure else dict(codec="int8")
    config = RunConfig(workspace=str(root), **shape, **mode)  # secure: threshold and neighbours automatic
    before, began = process.memory_info().rss, time.perf_counter()
    with task_identity():
        summaries = run_rounds(FakeGrid(app, members, answer_on_pull=True), config, LogReporter(), run_name="scale")
    done.set()
    return {"members": members, "secagg": config.secagg, "rounds": config.num_rounds, "seconds": time.perf_counter() - began,
            "rss_before_mib": before / 2**20, "rss_peak_mib": peak[0] / 2**20,
            "members_aggregated": [len(s.members) for s in summaries],
            "bytes_up_per_member": sum(r.bytes_up for s in summaries for r in s.members) // sum(len(s.members) for s in summaries)}


def scale(template: Workspace, tmp: Path, console: Console) -> dict:
    state = load_base(template.base).with_lora().get_state()
    size = {"state_params": sum(t.numel() for t in state.values()), "state_mib": sum(t.nbytes for t in state.values()) / 2**20}
    result = {}
    for secure, suffix in ((False, ""), (True, "_secure")):
        rows = {}
        for members in (10, 100):
            ws = fresh(template, tmp / f"scale{suffix}-{members}")
            kind = f"scale{suffix}-{members}"
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(ws.root)],
                                 capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise RuntimeError(f"memory run {kind} failed: {out.stderr[-2000:]}")
            rows[members] = {**json.loads(out.stdout.strip().splitlines()[-1]), **size}
            console.print(f"{kind}: {rows[members]}")
        result[f"rss_ratio_100_vs_10{suffix}"] = rows[100]["rss_peak_mib"] / rows[10]["rss_peak_mib"]
        result[f"scale{suffix}"] = rows
    return result


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
    else:  # scale-<members> or scale_secure-<members>
        mode, members = kind.split("-")
        print(json.dumps(memory_at(int(members), mode == "scale_secure", root)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-rounds", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--out", type=Path, help=f"default {RESULTS.relative_to(RESULTS.parents[2])} (a full run only)")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable); writes only to --out")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], Path(args.child[1]))
        return
    silence_library_chatter()
    console = Console(width=max(Console().width, 140))
    from conftest import TINY_INIT  # the test suite's tiny consortium: the faults, not the model, are measured

    parts = args.only or PARTS
    out = args.out or (None if args.only else RESULTS)  # a partial run never overwrites the committed results
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        template = Workspace(tmp / "template")
        if {"kill", "soak"} & set(parts):
            init_workspace(template, TINY_INIT, log=lambda _: None)
        result: dict = {"targets": {"kill_points_survived_fraction": 1.0, "rss_ratio_100_vs_10_secure": 1.3,
                                    "soak_rounds_completed": args.soak_rounds},
                        "controls": {"rss_ratio_100_vs_10": "above 1.3: the open server keeps every update of a round"}}
        if "kill" in parts:
            result.update(kill_points(template, tmp, console))
        if "soak" in parts:
            result.update(soak(template, tmp, args.soak_rounds, args.dropout, console))
        if "scale" in parts:
            init_workspace(scaled := Workspace(tmp / "scale-template"), scale_init(TINY_INIT), log=lambda _: None)
            result.update(scale(scaled, tmp, console))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result["commit"] = commit
    table = Table(title="faults")
    for col in ("measure", "value", "target"):
        table.add_column(col, justify="right")
    if "kill" in parts:
        table.add_row("kill points survived", f"{result['kill_points_survived_fraction']:.2f}", "1.0")
    if "soak" in parts:
        table.add_row(f"soak rounds completed (dropout {args.dropout:.0%})", str(result["soak_rounds_completed"]),
                      f">= {args.soak_rounds}")
        table.add_row("soak rounds retried by the run / runs resumed",
                      f"{result['soak_rounds_retried_in_run']} / {result['soak_runs_resumed']}", "")
        table.add_row("soak RSS growth (last tenth vs first)", f"{result['soak_rss_growth']:+.1%}", "flat")
        table.add_row("leaked processes", str(result["leaked_processes"]), "0")
    if "scale" in parts:
        table.add_row("server peak RSS, 100 members vs 10 (open, control)", f"{result['rss_ratio_100_vs_10']:.2f}", "> 1.3")
        table.add_row("server peak RSS, 100 members vs 10 (secure)", f"{result['rss_ratio_100_vs_10_secure']:.2f}", "<= 1.3")
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
