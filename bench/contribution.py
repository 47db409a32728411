"""Contribution estimates vs exact Shapley on a planted 5-member consortium.

Members with known roles train for real on the demo base (code domain): rich (half the code
data), duplicate (a copy of rich's data), noisy (the same kind of text with token ids
shuffled), small (16 blocks, one pass = 2 steps) and a free rider (claims the work, sends
zeros). Each round the global state moves by the aggregate of all five updates. Per round:
- reference: exact Shapley of that round's utility, all 32 coalitions evaluated;
- open mode: GTG-Shapley on the individual updates (server/scoring.py);
- secure mode: the server sees only the sum of a random group of 3-4 members per round (as
  secure aggregation per group gives it), valued as its part of the round's aggregate;
  individual values are recovered across rounds by least squares.
Reports Spearman rank correlation and mean absolute share error vs the reference, the model
evaluations each method spent, and the free rider's share. Writes bench/results/contribution.json.
Run: `.venv/bin/python bench/contribution.py [--workspace .fedmoe/demo --rounds 16]`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from aggregation.contribution import GroupValueEstimator, ScoreBook, contribution_shares, exact_shapley
from aggregation.fedavg import Update, aggregate
from client.precision import select_precision
from client.trainer import TrainConfig, train_local
from fedmoe.config import RunConfig
from fedmoe.workspace import Workspace
from model.base import load_base
from model.corpus import read_texts
from model.lora import expert_of
from model.tokenizer import pack
from server.init import InitConfig, init_workspace
from server.rounds import validation_sets
from server.scoring import combine_group_sums, open_value, score_open

RESULTS = Path(__file__).parent / "results" / "contribution.json"
ROLES = ("rich", "duplicate", "noisy", "small", "free_rider")


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    names = sorted(a)

    def ranks(values: dict[str, float]) -> list[float]:
        order = sorted(names, key=lambda n: values[n])
        out = {}
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return [out[n] for n in names]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    base = load_base(ws.base)
    lora = base.with_lora()
    config = RunConfig(workspace=str(ws.root), eval_batches=2)
    val = {"code": validation_sets(ws, base, config)["code"]}
    code = pack(base.tokenizer, read_texts(ws.members_dir / "code"), config.seq_len)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(code.shape[0], generator=g)
    rich, rest = code[order[: code.shape[0] // 2]], code[order[code.shape[0] // 2 :]]
    vocab = torch.randperm(base.tokenizer.vocab_size, generator=g)
    data = {"rich": rich, "duplicate": rich.clone(), "noisy": vocab[rest], "small": rest[:16]}
    precision = select_precision("auto")

    state = lora.get_state()
    exact_book, open_book = ScoreBook(), ScoreBook()
    estimator = GroupValueEstimator(nonnegative=False)
    cost = {"exact": 0, "open": 0, "secure": 0}
    rng = random.Random(7)
    for rnd in range(1, args.rounds + 1):
        updates = []
        for seed, (member, blocks) in enumerate(data.items()):
            steps = 2 if member == "small" else 6
            r = train_local(lora, state, blocks, TrainConfig(steps, 8, 0.001, rnd * 10 + seed, 16), precision)
            updates.append(Update(member, r.delta, r.num_tokens, r.expert_tokens))
        updates.append(Update("free_rider", {k: torch.zeros_like(v) for k, v in updates[0].delta.items()},
                              updates[0].num_tokens, dict(updates[0].expert_tokens)))

        reference = open_value(lora, state, updates, val, config.batch_size, precision)
        exact = exact_shapley(list(ROLES), reference)
        cost["exact"] += reference.evaluations
        exact_book = exact_book.add(rnd, dict(exact.values))

        estimate = score_open(updates, open_value(lora, state, updates, val, config.batch_size, precision), seed=rnd)
        cost["open"] += estimate.evaluations
        open_book = open_book.add(rnd, estimate.scores)

        # secure mode: one random group of 3-4 members per round; only its sum is visible
        group = frozenset(rng.sample(ROLES, rng.choice([3, 4])))
        weighted: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for u in updates:
            if u.member in group:
                for name, delta in u.delta.items():
                    weighted[name] = weighted.get(name, torch.zeros_like(delta)) + u.num_tokens * delta
                    weights[name] = weights.get(name, 0.0) + u.num_tokens
        consortium = {name: len(ROLES) * updates[0].num_tokens for name in weights}
        value = open_value(lora, state, [], val, config.batch_size, precision)
        estimator = estimator.observe(
            {group: value.loss({}) - value.loss(combine_group_sums([(weighted, weights)], reference=consortium))}
        )
        cost["secure"] += value.evaluations

        delta = aggregate(updates, expert_of)
        state = {k: v + delta[k] if k in delta else v for k, v in state.items()}
        console.print(f"round {rnd}: exact {dict((m, round(v, 5)) for m, v in exact.values.items())}")

    shares = {"exact": exact_book.shares(), "open": open_book.shares(),
              "secure": contribution_shares(estimator.totals())}
    table = Table(title=f"contribution shares after {args.rounds} rounds (planted consortium)")
    table.add_column("member")
    for mode in shares:
        table.add_column(mode, justify="right")
    for m in ROLES:
        table.add_row(m, *(f"{shares[mode].get(m, 0.0):.3f}" for mode in shares))
    console.print(table)
    result = {
        "spearman_open": spearman(shares["exact"], shares["open"]),
        "spearman_secure": spearman(shares["exact"], {m: shares["secure"].get(m, 0.0) for m in ROLES}),
        "free_rider_share_open": shares["open"]["free_rider"],
        "free_rider_share_secure": shares["secure"].get("free_rider", 0.0),
        "free_rider_share_exact": shares["exact"]["free_rider"],
        "mae_share_open": sum(abs(shares["open"][m] - shares["exact"][m]) for m in ROLES) / len(ROLES),
        "mae_share_secure": sum(abs(shares["secure"].get(m, 0.0) - shares["exact"][m]) for m in ROLES) / len(ROLES),
        "model_evaluations": cost,
        "shares": shares,
        "setup": {"rounds": args.rounds, "roles": list(ROLES), "validation": "code", "lr": 0.001},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print({k: v for k, v in result.items() if k not in ("shares", "setup")})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
