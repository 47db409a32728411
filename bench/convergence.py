"""Why join: the consortium vs centralized training vs each member alone, on the demo consortium.

All three train the same trainable state (FFA-LoRA adapters, per-expert LoRA, router) of the
same frozen base, measured side by side in one run:
- consortium: `rounds` rounds of fedmoe in Flower's simulation engine, every member `local_steps`
  steps per round;
- centralized: one trainer on the union of the members' data, as many steps (= tokens) as all
  members together spent in the consortium;
- alone: each member on its own data for the steps it spent in the consortium (rounds x local_steps).

Prints validation perplexity per domain and the ratios, writes bench/results/convergence.json.
Run: `.venv/bin/python bench/convergence.py [--rounds 4 --local-steps 12]`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from client.node import member_seed
from model.chatter import silence_library_chatter
from model.precision import select_precision
from client.trainer import TrainConfig, train_local
from server.config import RunConfig
from fedmoe.simulation import simulate
from server.workspace import Workspace
from model.base import load_base
from model.corpus import read_texts
from model.tokenizer import pack
from server.checkpoint import Checkpoints
from server.init import InitConfig, init_workspace
from server.evaluation import evaluate, validation_sets
from server.summary import LogReporter

RESULTS = Path(__file__).parent / "results" / "convergence.json"


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    config = RunConfig(workspace=str(ws.root), num_rounds=args.rounds, local_steps=args.local_steps)
    members = ws.members()
    precision = select_precision(config.precision)

    base = load_base(ws.base)
    lora = base.with_lora()
    initial = lora.get_state()
    val = validation_sets(ws, base, config)
    data = {m: pack(base.tokenizer, read_texts(ws.members_dir / m), config.seq_len, source=m) for m in members}
    results: dict[str, dict[str, float]] = {"base": evaluate(lora, val, config)}
    seconds: dict[str, float] = {}

    console.rule(f"consortium: {len(members)} members x {args.rounds} rounds x {args.local_steps} steps")
    started = time.perf_counter()
    run = f"bench-convergence-{int(time.time())}"
    simulate(config, LogReporter(), run_name=run)
    committed = Checkpoints(ws.run_dir(run)).load()
    assert committed is not None and committed.round == args.rounds
    lora.set_state(committed.state)
    results["consortium"] = evaluate(lora, val, config)
    seconds["consortium"] = time.perf_counter() - started

    total_steps = args.rounds * args.local_steps * len(members)
    console.rule(f"centralized: {total_steps} steps on the union of the members' data")
    started = time.perf_counter()
    union = torch.cat(list(data.values()))
    train_local(lora, initial, union, _train_config(config, total_steps, config.seed), precision)
    results["centralized"] = evaluate(lora, val, config)
    seconds["centralized"] = time.perf_counter() - started

    alone_steps = args.rounds * args.local_steps
    for member in members:
        console.rule(f"{member} alone: {alone_steps} steps on its own data")
        started = time.perf_counter()
        seed = member_seed(config.seed, 0, member)
        train_local(lora, initial, data[member], _train_config(config, alone_steps, seed), precision)
        results[f"alone:{member}"] = evaluate(lora, val, config)
        seconds[f"alone:{member}"] = time.perf_counter() - started

    report(console, results, members, seconds, args)


def _train_config(config: RunConfig, steps: int, seed: int) -> TrainConfig:
    return TrainConfig(
        local_steps=steps, batch_size=config.batch_size, lr=config.lr, seed=seed, min_expert_tokens=0
    )


def _overall(losses: dict[str, float], domains: list[str]) -> float:
    return math.exp(sum(losses[d] for d in domains) / len(domains))


def report(console: Console, results: dict[str, dict[str, float]], members: list[str], seconds: dict[str, float], args) -> None:  # type: ignore[no-untyped-def]
    domains = sorted(results["base"])
    table = Table(title="validation perplexity per domain")
    table.add_column("trained by")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("overall (member domains)", justify="right")
    for name, losses in results.items():
        table.add_row(name, *(f"{math.exp(losses[d]):.1f}" for d in domains), f"{_overall(losses, members):.1f}")
    console.print(table)

    ratio_central = _overall(results["consortium"], members) / _overall(results["centralized"], members)
    gains = {}
    ratios = Table(title="ratios (own domain of each member)")
    for col in ("member", "consortium / alone ppl", "gain vs alone", "consortium / centralized ppl"):
        ratios.add_column(col, justify="right")
    for m in members:
        consortium = math.exp(results["consortium"][m])
        alone = math.exp(results[f"alone:{m}"][m])
        gains[m] = (alone - consortium) / alone
        ratios.add_row(m, f"{consortium / alone:.3f}", f"{gains[m]:+.1%}", f"{consortium / math.exp(results['centralized'][m]):.3f}")
    console.print(ratios)
    console.print(f"consortium / centralized perplexity (overall): {ratio_central:.3f}  (target <= 1.05)")
    console.print(f"smallest member gain vs alone: {min(gains.values()):+.1%}  (target >= +10%)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "ppl_ratio_consortium_vs_centralized": ratio_central,
        "min_member_gain_vs_alone": min(gains.values()),
        "member_gain_vs_alone": gains,
        "val_ppl": {name: {d: math.exp(v) for d, v in losses.items()} for name, losses in results.items()},
        "seconds": seconds,
        "setup": {"rounds": args.rounds, "local_steps": args.local_steps, "members": members,
                  "batch_size": RunConfig().batch_size, "seq_len": RunConfig().seq_len},
    }, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
