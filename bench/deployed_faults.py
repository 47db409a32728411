"""Every kill point of a round on a real deployment, chained in one run. Writes bench/results/deployed_faults.json.

`fedmoe serve` (flower-superlink with TLS and node authentication, behind the members' proxy) and
three `fedmoe join` daemons (flower-supernode) on 127.0.0.1, set up as tests/e2e/test_deployment.py
does, on the test suite's tiny consortium. An uninterrupted secure run of 2 rounds is the
reference. Then one run of 2 rounds is submitted once per kill point of a round, in the order a
round reaches them (server/faults.py), with the next ServerApp armed to SIGKILL itself there
(`FEDMOE_KILL_AT_FILE`); the SuperLink and the SuperNodes stay up throughout, as after a
ServerApp crash. Each submission resumes what the killed ones left: round 1 is re-run from TRAIN
after each kill before its sums are journaled, finished from its journal after (no member is
asked to unmask again: counted in the SuperNodes' logs), put in the ledger after `after-commit`
and `mid-ledger`, and round 2 follows. A last, unarmed submission completes the run.

A kill point survives when its ServerApp died there (its kill file consumed, the committed round
what that point leaves) and the run, once completed, has the reference's state digest at every
round, a ledger that verifies and the reference's records. The chain is stricter than a kill per
run (each restart starts from what every earlier kill left), and one wrong end state fails every
point. `mid-export` is not a ServerApp's: bench/faults.py kills `fedmoe export` there.
Run: `.venv/bin/python bench/deployed_faults.py` (~12 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from model.chatter import silence_library_chatter
from server.checkpoint import Checkpoints
from server.faults import ROUND_KILL_POINTS
from server.init import init_workspace
from server.ledger import OperatorKey
from server.ledger.audit import verify
from server.workspace import Workspace

TESTS = Path(__file__).parents[1] / "tests"
sys.path[:0] = [str(TESTS / "e2e"), str(TESTS)]  # after the project's packages: tests/model would shadow `model`

RESULTS = Path(__file__).parent / "results" / "deployed_faults.json"
ROUNDS = 2
COMMITTED_AFTER = {"after-commit": 1, "mid-ledger": 1}  # the round committed once killed there (others: 0)
JOURNALED = ROUND_KILL_POINTS.index("after-journal")  # from here on round 1 finishes from its journal


def chain(d, console: Console) -> dict:  # noqa: ANN001 - a tests/e2e/test_deployment.py Deployment
    from test_deployment import RUN_CONFIG, credit, finished, killed_at, unmask_messages

    began = time.perf_counter()
    finished(d, {**RUN_CONFIG, "num-rounds": ROUNDS, "run-name": "reference"})
    reference_seconds = time.perf_counter() - began
    config = {**RUN_CONFIG, "num-rounds": ROUNDS, "run-name": "killed"}
    rows: dict[str, dict] = {}
    unmasks: list[int] = []
    for i, point in enumerate(ROUND_KILL_POINTS):
        began = time.perf_counter()
        try:
            committed, problem = killed_at(d, config, point), None
        except AssertionError as exc:  # the ServerApp never got there
            committed, problem = None, str(exc).splitlines()[0]
        rows[point] = {"killed": problem is None, "committed_after": committed, "problem": problem,
                       "expected_committed": COMMITTED_AFTER.get(point, 0), "seconds": time.perf_counter() - began}
        if i >= JOURNALED:  # round 1 finishes from its journal: nothing asked of the members until round 2
            unmasks.append(unmask_messages(d))
        console.print(f"killed at {point}: {rows[point]}")
    began = time.perf_counter()
    try:
        finished(d, config)
        completed = True
    except AssertionError as exc:  # reported with the rest: every point then counts as not survived
        completed = False
        console.print(f"the last submission did not complete: {str(exc).splitlines()[0]}")
    final_seconds = time.perf_counter() - began
    want = [m["state_sha256"] for m in Checkpoints(d.ws.run_dir("reference")).manifests()]
    got = [m["state_sha256"] for m in Checkpoints(d.ws.run_dir("killed")).manifests()]
    ledger = verify(d.ws.ledger("killed"), OperatorKey.load_or_create(d.ws.operator_key).public_key)
    same_records = credit(d, "killed") == credit(d, "reference")
    journal_asked_nothing = len(set(unmasks)) == 1  # from after-journal to mid-ledger: no unmask message
    end_ok = completed and got == want and ledger.ok and same_records and journal_asked_nothing
    for row in rows.values():
        row["survived"] = row["killed"] and row["committed_after"] == row["expected_committed"] and end_ok
    return {
        "deployed_kill_points_survived_fraction": sum(r["survived"] for r in rows.values()) / len(rows),
        "deployed_kill_points": rows, "completed": completed, "identical_state": got == want, "ledger_ok": ledger.ok,
        "ledger_problem": ledger.problem, "same_ledger_records": same_records,
        "no_unmask_asked_after_journal": journal_asked_nothing, "rounds": ROUNDS,
        "reference_run_seconds": reference_seconds, "last_submission_seconds": final_seconds,
        "reference_round_seconds": [m["seconds"] for m in Checkpoints(d.ws.run_dir("reference")).manifests()[1:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    silence_library_chatter()
    console = Console(width=max(Console().width, 140))
    from conftest import TINY_INIT  # the test suite's tiny consortium: the faults, not the model, are measured
    from test_deployment import launch, stop_all

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        template = Workspace(tmp / "template")
        init_workspace(template, TINY_INIT, log=lambda _: None)
        d, _, _ = launch(tmp / "deployment", template)
        try:
            result = chain(d, console)
        finally:
            stop_all(d.processes)
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=Path(__file__).parent).stdout.strip()
    result["targets"] = {"deployed_kill_points_survived_fraction": 1.0}
    table = Table(title="kill points on a deployment (one run, chained)")
    for col in ("kill point", "killed there", "committed after", "seconds"):
        table.add_column(col, justify="right")
    for point, row in result["deployed_kill_points"].items():
        table.add_row(point, "yes" if row["killed"] else f"no: {row['problem']}", str(row["committed_after"]),
                      f"{row['seconds']:.0f}")
    console.print(table)
    console.print(f"survived {result['deployed_kill_points_survived_fraction']:.2f} (target 1.0): identical state "
                  f"{result['identical_state']}, ledger verifies {result['ledger_ok']}, same records "
                  f"{result['same_ledger_records']}, no unmask asked after the journal {result['no_unmask_asked_after_journal']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
