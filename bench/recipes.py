"""Training recipes side by side: which local optimizer, server optimizer and drift control make
the demo consortium's shared model learn, measured in one run on the same members and rounds.

An in-process federation (no Flower, no secure aggregation, no codec): each round every member
trains from the global state with the production trainer (`client/trainer.py`, `train_local`),
the server averages the deltas (equal token counts, so the plain mean) and takes the server
optimizer's step (`aggregation/server_opt.py`). It isolates the recipe from the transport: the
demo's own secure run (int8, the free rider) ends 1-1.4 points under its `demo` row on code,
legal and manuals. Rows:
- demo (before): the demo's recipe before the server lr was set per parameter kind (local SGD,
  server FedYogi at 0.03 with a warm-up of 3 rounds);
- scaffold: the same with SCAFFOLD drift correction (Karimireddy et al. 2020): every local step
  follows g - c_i + c, where c_i is the member's own mean gradient of its last round (member-side,
  `TrainResult.mean_gradient`) and c the consortium's, -Δ/(K·lr) of the last round's mean update
  (what SCAFFOLD's server variate is when every member takes part; under secure aggregation the
  server knows only that mean, so nothing more would travel up);
- local AdamW + FedAvg: what the members would do without a server optimizer;
- router frozen: the recipe before, with `server-lr-router = 0`;
- demo: today's recipe, the server lr set per parameter kind (`server-lr-{attention,experts,router,head}`).
Writes bench/results/recipes.json: per row and round the relative perplexity drop per domain,
`min_drop` (the smallest domain's at the last round) and seconds.
Run: `.venv/bin/python bench/recipes.py [--rounds N] [--rows demo,scaffold,...]` (~3.5 min a row, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from client.node import member_seed
from client.trainer import TrainConfig, train_local
from fedmoe.cli import DEMO_ROUNDS, DEMO_TRAINING
from model.base import load_base
from model.chatter import silence_library_chatter
from model.member_data import read_texts
from model.precision import select_precision
from model.tokenizer import pack
from server.config import RunConfig
from server.evaluation import evaluate, validation_sets
from server.init import InitConfig, init_workspace
from server.workspace import Workspace

RESULTS = Path(__file__).parent / "results" / "recipes.json"
# row -> (run-config overrides of the demo's recipe, drift control)
PLAIN_KINDS = {"server-lr-attention": 1.0, "server-lr-experts": 1.0, "server-lr-router": 1.0, "server-lr-head": 1.0}
BEFORE = {**PLAIN_KINDS, "server-lr": 0.03}  # the demo's recipe before the server lr was set per kind
ROWS: dict[str, tuple[dict[str, object], str]] = {
    "demo (before)": (BEFORE, "off"),
    "scaffold": (BEFORE, "scaffold"),
    "local adamw + fedavg": ({**PLAIN_KINDS, "local-opt": "adamw", "lr": 0.003, "server-opt": "fedavg", "server-lr": 1.0,
                              "server-warmup": 0}, "off"),
    "router frozen": ({**BEFORE, "server-lr-router": 0.0}, "off"),
    "demo": ({}, "off"),
}


def run_row(label: str, ws: Workspace, rounds: int, console: Console) -> dict[str, object]:
    overrides, drift = ROWS[label]
    cfg = RunConfig.from_user_config({"workspace": str(ws.root), **DEMO_TRAINING, **overrides})
    base = load_base(ws.base)
    lora = base.with_lora()
    val = validation_sets(ws, base, cfg)
    members = ws.members()
    data = {m: pack(base.tokenizer, read_texts(ws.members_dir / m), cfg.seq_len, source=m) for m in members}
    precision = select_precision(cfg.precision)
    start = evaluate(lora, val, cfg)
    optimizer, state, opt_state = cfg.server_optimizer(), lora.get_state(), {}
    consortium: dict[str, torch.Tensor] | None = None  # SCAFFOLD's c
    own: dict[str, dict[str, torch.Tensor]] = {}  # SCAFFOLD's c_i, per member
    drops, began = [], time.perf_counter()
    for rnd in range(1, rounds + 1):
        deltas = []
        for member in members:
            correction = None
            if consortium is not None and member in own:
                correction = {k: consortium[k] - own[member][k] for k in consortium}
            result = train_local(lora, state, data[member], TrainConfig(
                local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.local_opt,
                seed=member_seed(cfg.seed, rnd, member), min_expert_tokens=0,
                correction=correction, track_gradient=drift == "scaffold"), precision)
            deltas.append(result.delta)
            if result.mean_gradient is not None:
                own[member] = result.mean_gradient
        mean = {k: sum(d[k] for d in deltas) / len(deltas) for k in deltas[0]}
        state, opt_state = optimizer.step(state, mean, opt_state)
        if drift == "scaffold":
            consortium = {k: -v / (cfg.local_steps * cfg.lr) for k, v in mean.items()}
        lora.set_state(state)
        losses = evaluate(lora, val, cfg)
        drops.append({d: 1 - math.exp(losses[d] - start[d]) for d in sorted(losses)})
        console.print(f"{label} round {rnd}: " + "  ".join(f"{d} {x:+.1%}" for d, x in drops[-1].items()))
    return {"overrides": overrides, "drift_control": drift, "drops": drops,
            "min_drop": min(drops[-1].values()), "seconds": time.perf_counter() - began}


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=DEMO_ROUNDS)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    rows = {label: run_row(label, ws, args.rounds, console) for label in args.rows.split(",")}
    domains = sorted(next(iter(rows.values()))["drops"][-1])  # type: ignore[index]
    table = Table(title=f"perplexity drop per domain after {args.rounds} rounds (positive: better than the base)")
    for col in ("recipe", *domains, "smallest", "time vs before"):
        table.add_column(col, justify="right")
    demo_seconds = rows["demo (before)"]["seconds"] if "demo (before)" in rows else None
    for label, row in rows.items():
        last = row["drops"][-1]  # type: ignore[index]
        ratio = f"{row['seconds'] / demo_seconds:.2f}" if demo_seconds else "-"  # type: ignore[operator]
        table.add_row(label, *(f"{last[d]:+.1%}" for d in domains), f"{row['min_drop']:+.1%}", ratio)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "demo_training": DEMO_TRAINING, "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
