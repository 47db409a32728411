"""Why join: the consortium vs centralized training vs each member alone, in two regimes.

Everything trains the same trainable state of the same frozen base and is measured side by side
in one run, on the demo consortium (one member per domain):
- compute-limited: each member holds all its demo data (today's demo; it never sees a block twice);
- data-limited: each member holds only a third of what it trains on at the consortium's compute
  (>= 3 passes over its own data), made by cutting its files; the block count is measured.
Rows per regime:
- consortium (secure): `fedmoe demo`'s own settings and consortium (secure aggregation, int8, the
  update clip, local SGD + FedYogi, the labelled free rider: six members train in two groups of 3);
- consortium (open): the same without secure aggregation;
- centralized: one AdamW trainer on the union of the members' data, as many steps as the secure
  consortium's members took in all (counted from its round manifests);
- alone: each member, AdamW on its own data, for the steps it took in the secure consortium;
- personalized: the secure consortium's model plus `--extra-steps` of the member's own, against
  alone for its consortium steps plus the same extra steps (equal total member compute).
Gains are relative perplexity on the member's own domain: (alone - other) / alone.
Writes bench/results/convergence.json with the keys issue 13 names.
Run: `.venv/bin/python bench/convergence.py [--workspace .fedmoe/demo]` (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from client.node import member_seed
from client.trainer import TrainConfig, train_local
from client.free_rider import FREE_RIDER
from fedmoe.cli import DEMO_ROUNDS, DEMO_SECURE_CLIP, DEMO_SECURE_CODEC, DEMO_TRAINING, DEMO_UPDATE_CLIP
from fedmoe.simulation import simulate
from model.base import load_base
from model.chatter import silence_library_chatter
from model.member_data import read_texts
from model.precision import select_precision
from model.tokenizer import pack
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.evaluation import evaluate, validation_sets
from server.init import InitConfig, init_workspace
from server.summary import LogReporter
from server.workspace import Workspace

RESULTS = Path(__file__).parent / "results" / "convergence.json"
ALONE_LR = 0.003  # AdamW, the trainer's own default: what a member alone (or one central trainer) would use


def _config(ws: Workspace, secure: bool) -> RunConfig:
    user = {"workspace": str(ws.root), "num-rounds": DEMO_ROUNDS, **DEMO_TRAINING}
    if secure:
        user.update({"secagg": "on", "codec": DEMO_SECURE_CODEC, "codec-clip": DEMO_SECURE_CLIP, "update-clip": DEMO_UPDATE_CLIP})
    return RunConfig.from_user_config(user)


def _fresh_copy(ws: Workspace, root: Path, *, skip: tuple[str, ...] = ()) -> Workspace:
    """The workspace's corpora, base and policy in `root`, with no runs, nodes or pinned identities."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ws.root, root, ignore=shutil.ignore_patterns("runs", "nodes", "releases", "identities.json", "flwr-home", *skip))
    return Workspace(root)


def _data_limited(ws: Workspace, root: Path, passes: int, console: Console) -> Workspace:
    """A copy of the workspace whose members hold 1/passes of the blocks they train on."""
    limited = _fresh_copy(ws, root, skip=("members",))
    cfg = _config(ws, secure=True)
    trained_blocks = cfg.num_rounds * cfg.local_steps * cfg.batch_size
    budget_chars = trained_blocks * cfg.seq_len * 4 // passes  # ~4 characters per token on this tokenizer
    for member in ws.members():
        text = "\n\n".join(read_texts(ws.members_dir / member))[:budget_chars]
        (limited.members_dir / member).mkdir(parents=True)
        (limited.members_dir / member / "data.txt").write_text(text)
    console.print(f"data-limited copy in {root}: ~{budget_chars:,} characters per member")
    return limited


def _steps_by_member(manifests: list[dict]) -> dict[str, int]:  # type: ignore[type-arg]
    """Local steps each member took, counted from the committed rounds it took part in."""
    steps: dict[str, int] = {}
    for m in manifests[1:]:
        schedule = m.get("schedule")
        local = int(schedule["local_steps"]) if isinstance(schedule, dict) else int(m["run_config"]["local-steps"])
        for report in m["members"]:
            if report["member"] != FREE_RIDER:  # it trains nothing
                steps[report["member"]] = steps.get(report["member"], 0) + local
    return steps


def _regime(name: str, ws: Workspace, extra_steps: int, console: Console) -> dict[str, object]:
    members = ws.members()
    precision = select_precision("auto")
    base = load_base(ws.base)
    lora = base.with_lora()
    initial = lora.get_state()
    probe = _config(ws, secure=True)
    val = validation_sets(ws, base, probe)
    data = {m: pack(base.tokenizer, read_texts(ws.members_dir / m), probe.seq_len, source=m) for m in members}
    results: dict[str, dict[str, float]] = {"base": evaluate(lora, val, probe)}
    seconds: dict[str, float] = {}
    runs: dict[str, list[dict]] = {}  # type: ignore[type-arg]

    for label, secure in (("consortium (secure)", True), ("consortium (open)", False)):
        console.rule(f"{name}: {label}")
        started = time.perf_counter()
        # a fresh copy per run: members refuse to unmask an identical update (same start, same
        # seed) for another survivor set, across runs too, so runs must not share node state
        run_ws = _fresh_copy(ws, ws.root.parent / f"{ws.root.name}-bench-{'secure' if secure else 'open'}")
        # secure: the demo's own consortium, its labelled free rider included; without it five
        # members make one group of 3 per round and two of them sit each round out
        simulate(_config(run_ws, secure), LogReporter(), run_name="bench", free_rider=secure)
        checkpoints = Checkpoints(run_ws.run_dir("bench"))
        committed = checkpoints.load()
        assert committed is not None
        lora.set_state(committed.state)
        results[label] = evaluate(lora, val, probe)
        runs[label] = checkpoints.manifests()
        seconds[label] = time.perf_counter() - started
        if secure:
            consortium_state = committed.state
    steps = _steps_by_member(runs["consortium (secure)"])

    def train(label: str, start: dict[str, torch.Tensor], blocks: torch.Tensor, n: int, seed: int) -> None:
        began = time.perf_counter()
        cfg = TrainConfig(local_steps=n, batch_size=probe.batch_size, lr=ALONE_LR, seed=seed, min_expert_tokens=0)
        train_local(lora, start, blocks, cfg, precision)
        results[label] = evaluate(lora, val, probe)
        seconds[label] = time.perf_counter() - began

    total = sum(steps.values())
    console.rule(f"{name}: centralized, {total} steps on the union")
    train("centralized", initial, torch.cat(list(data.values())), total, probe.seed)
    for m in members:
        seed = member_seed(probe.seed, 0, m)
        train(f"alone:{m}", initial, data[m], steps.get(m, 0) or 1, seed)
        train(f"alone+{extra_steps}:{m}", initial, data[m], steps.get(m, 0) + extra_steps, seed)
        train(f"personalized:{m}", consortium_state, data[m], extra_steps, seed + 1)

    own = {row: {m: math.exp(results[row.format(m=m)][m]) for m in members}
           for row in ("consortium (secure)", "consortium (open)", "centralized", "alone:{m}", f"alone+{extra_steps}:{{m}}", "personalized:{m}")}
    gain_vs_alone = {m: (own["alone:{m}"][m] - own["consortium (secure)"][m]) / own["alone:{m}"][m] for m in members}
    gain_personal = {m: (own[f"alone+{extra_steps}:{{m}}"][m] - own["personalized:{m}"][m]) / own[f"alone+{extra_steps}:{{m}}"][m] for m in members}
    overall = {row: math.exp(statistics.fmean(results[row][m] for m in members)) for row in ("consortium (secure)", "consortium (open)", "centralized")}
    secure_manifests = runs["consortium (secure)"][1:]
    train_fraction = statistics.fmean(m["members_train_seconds"] / m["seconds"] for m in secure_manifests)
    shares = [m["specialization"].get("expert_top_member_share") for m in runs["consortium (open)"][1:]]
    top_share = shares[-1] if shares and shares[-1] is not None else None
    drops = {d: 1 - math.exp(results["consortium (secure)"][d] - results["base"][d]) for d in results["base"]}
    return {
        "results": results, "seconds": seconds, "steps_by_member": steps, "own_domain_ppl": own,
        "blocks_by_member": {m: int(data[m].shape[0]) for m in members},
        "passes_by_member": {m: steps.get(m, 0) * probe.batch_size / max(int(data[m].shape[0]), 1) for m in members},
        "gain_vs_alone": gain_vs_alone, "gain_personalized": gain_personal,
        "ppl_ratio_consortium_vs_centralized": overall["consortium (secure)"] / overall["centralized"],
        "ppl_ratio_open_vs_centralized": overall["consortium (open)"] / overall["centralized"],
        "round_train_fraction": train_fraction, "expert_top_member_share": top_share,
        "min_ppl_drop": min(drops.values()), "ppl_drop": drops,
    }


def _table(console: Console, name: str, regime: dict[str, object], members: list[str]) -> None:
    results = regime["results"]  # type: ignore[assignment]
    domains = sorted(results["base"])  # type: ignore[index]
    table = Table(title=f"{name}: validation perplexity per domain")
    table.add_column("trained by")
    for d in domains:
        table.add_column(d, justify="right")
    for row, losses in results.items():  # type: ignore[union-attr]
        table.add_row(row, *(f"{math.exp(losses[d]):.1f}" for d in domains))
    console.print(table)
    ratios = Table(title=f"{name}: own-domain gains (positive: better than alone)")
    for col in ("member", "passes", "consortium vs alone", "personalized vs alone"):
        ratios.add_column(col, justify="right")
    for m in members:
        ratios.add_row(m, f"{regime['passes_by_member'][m]:.1f}", f"{regime['gain_vs_alone'][m]:+.1%}",  # type: ignore[index]
                       f"{regime['gain_personalized'][m]:+.1%}")  # type: ignore[index]
    console.print(ratios)


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--passes", type=int, default=3, help="data-limited: passes over a member's own data")
    parser.add_argument("--extra-steps", type=int, default=24, help="personalization: the member's own steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    members = ws.members()
    regimes = {
        "compute_limited": _regime("compute-limited", ws, args.extra_steps, console),
        "data_limited": _regime("data-limited", _data_limited(ws, ws.root.parent / f"{ws.root.name}-data-limited", args.passes, console), args.extra_steps, console),
    }
    for name, regime in regimes.items():
        _table(console, name, regime, members)
    compute, data = regimes["compute_limited"], regimes["data_limited"]
    summary = {
        "ppl_ratio_consortium_vs_centralized": compute["ppl_ratio_consortium_vs_centralized"],
        "min_member_gain_vs_alone_data_limited": min(data["gain_vs_alone"].values()),  # type: ignore[union-attr]
        "min_member_gain_personalized_compute_limited": min(compute["gain_personalized"].values()),  # type: ignore[union-attr]
        "min_member_gain_vs_alone_compute_limited": min(compute["gain_vs_alone"].values()),  # type: ignore[union-attr]
        "expert_top_member_share": compute["expert_top_member_share"],
        "round_train_fraction": compute["round_train_fraction"],
        "demo_min_ppl_drop": compute["min_ppl_drop"],
    }
    targets = {"ppl_ratio_consortium_vs_centralized": "<= 1.03", "min_member_gain_vs_alone_data_limited": ">= 0.10",
               "min_member_gain_personalized_compute_limited": ">= 0.05", "min_member_gain_vs_alone_compute_limited": "reported (goal >= 0)",
               "expert_top_member_share": ">= 0.6", "round_train_fraction": ">= 0.7", "demo_min_ppl_drop": ">= 0.08"}
    keys = Table(title="issue 13 keys")
    for col in ("key", "measured", "target"):
        keys.add_column(col)
    for k, v in summary.items():
        keys.add_row(k, "n/a" if v is None else f"{v:.3f}", targets[k])
    console.print(keys)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**summary, "targets": targets, "regimes": regimes,
                                    "setup": {"members": members, "extra_steps": args.extra_steps, "passes": args.passes,
                                              "alone_lr": ALONE_LR, "demo_training": DEMO_TRAINING, "rounds": DEMO_ROUNDS}},
                                   indent=2, default=float) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
