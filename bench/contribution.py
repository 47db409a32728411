"""Contribution estimates vs exact Shapley on a planted 5-member consortium.

Members with known roles train for real on the demo base (code domain): rich (half the code
data), duplicate (a copy of rich's data), noisy (the same kind of text with token ids
shuffled), small (16 blocks, one pass = 2 steps) and a free rider (claims the work, sends
zeros). Each round the global state moves by the aggregate of all five updates. Per round:
- reference: exact Shapley of that round's utility, all 32 coalitions evaluated;
- open mode: GTG-Shapley on the individual updates (server/scoring.py);
- secure mode, on the production path: with 5 members and min-group 3 the round loop trains one
  secure-aggregation group per round (server/sampling.plan_groups: 3 members from a balanced
  rotation of the 10 possible groups); its sum is valued by the round loop's own
  server/scoring.score_groups (its part of the round's aggregate, which is the group's mean when
  only the group trained), counting the model evaluations the valuation spent; the round loop's
  estimator (ridge least squares with a common drift, credit only for estimates 2 standard
  errors above zero) recovers member values across rounds, and shares come from its credited
  totals as the ledger's do. Every member trains every round here (the reference needs all 32
  coalitions), so the groups are valued on the reference's model states.
  The group schedule depends on the run's seed, so secure mode is scored for `--seeds` group
  seeds on the same rounds; `spearman_secure` is the median over them. Next to it an
  observed-rounds reference: the exact per-round Shapley values, but only of the rounds each
  member's group was observed in (no noise, no credit rule) -- roughly what any estimator that
  sees only those rounds can hope for. Not a strict bound: an estimator could beat it by luck.
Reports Spearman rank correlation and mean absolute share error vs the reference, the model
evaluations each method spent, and the free rider's share. Writes bench/results/contribution.json.
Run: `.venv/bin/python bench/contribution.py [--workspace .fedmoe/demo --rounds 48 --seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from aggregation.contribution import ScoreBook, contribution_shares
from aggregation.group_estimator import GroupValueEstimator
from aggregation.shapley import exact_shapley
from aggregation.fedavg import Update, aggregate
from model.chatter import silence_library_chatter
from model.precision import select_precision
from client.trainer import TrainConfig, train_local
from server.config import RunConfig
from server.workspace import Workspace
from model.base import load_base
from model.member_data import read_texts
from model.lora import expert_of
from model.tokenizer import pack
from server.init import InitConfig, init_workspace
from server.evaluation import validation_sets
from server.sampling import plan_groups
from server.scoring import CoalitionValue, group_sum, open_value, score_groups, score_open

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


def secure_shares(observed: list[dict[frozenset[str], float]]) -> dict[str, float]:
    """Secure-mode shares as the ledger records them: the round loop's estimator over the group
    values observed, credited totals (server/rounds.py score_round)."""
    estimator = GroupValueEstimator(nonnegative=False)
    for values in observed:
        estimator = estimator.observe(values)
    shares = contribution_shares(estimator.totals())
    return {m: shares.get(m, 0.0) for m in ROLES}


def observed_group(seed: int, rnd: int) -> frozenset[str]:
    [chosen] = plan_groups([str(i) for i in range(len(ROLES))], 3, seed=seed, rnd=rnd)  # members by label
    return frozenset(ROLES[int(i)] for i in chosen)


def observed_reference_shares(per_round: list[dict[str, float]], seed: int) -> dict[str, float]:
    """Exact per-round Shapley values (clipped at 0, as the score book does), averaged over the
    rounds each member's group was observed in, times all rounds."""
    total = dict.fromkeys(ROLES, 0.0)
    seen = dict.fromkeys(ROLES, 0)
    for rnd, values in enumerate(per_round, start=1):
        for m in observed_group(seed, rnd):
            total[m] += max(values[m], 0.0)
            seen[m] += 1
    return contribution_shares({m: total[m] / seen[m] if seen[m] else 0.0 for m in ROLES})


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": sum(values) / len(values), "median": ordered[len(values) // 2], "min": ordered[0],
            "share_at_least_0.9": sum(v >= 0.9 for v in values) / len(values)}


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="group seed whose secure-mode evaluations are reported (< --seeds)")
    parser.add_argument("--seeds", type=int, default=50, help="group seeds 0..N-1 also evaluated on the same rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 0 <= args.seed < args.seeds:
        parser.error(f"--seed {args.seed} must be one of the --seeds 0..{args.seeds - 1}")
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
    torch.manual_seed(0)  # the same rounds whether or not this process just built the base
    exact_book, open_book = ScoreBook(), ScoreBook()
    cost = {"exact": 0, "open": 0, "secure": 0}
    exact_rounds: list[dict[str, float]] = []  # each round's exact Shapley values
    observed: dict[int, list[dict[frozenset[str], float]]] = {seed: [] for seed in range(args.seeds)}
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
        exact_rounds.append(dict(exact.values))
        cost["exact"] += reference.evaluations
        exact_book = exact_book.add(rnd, dict(exact.values))

        estimate = score_open(updates, open_value(lora, state, updates, val, config.batch_size, precision), seed=rnd)
        cost["open"] += estimate.evaluations
        open_book = open_book.add(rnd, estimate.scores)

        # secure mode: each seed's group, valued by the round loop's score_groups (once per
        # distinct group of the round; each seed is charged the evaluations that valuation counted)
        by_member = {u.member: u for u in updates}
        valued: dict[frozenset[str], tuple[dict[frozenset[str], float], int]] = {}
        for seed in range(args.seeds):
            group = observed_group(seed, rnd)
            if group not in valued:
                sums = {group: group_sum([by_member[m] for m in sorted(group)])}
                scored = score_groups(sums, lambda combine: CoalitionValue(lora, state, combine, val, config.batch_size, precision),
                                      seed=seed * 100_003 + rnd)
                valued[group] = ({frozenset(k.split("+")): v for k, v in scored.group_values.items()}, scored.evaluations)
            values, evaluations = valued[group]
            observed[seed].append(values)
            if seed == args.seed:
                cost["secure"] += evaluations

        delta = aggregate(updates, expert_of)
        state = {k: v + delta[k] if k in delta else v for k, v in state.items()}
        console.print(f"round {rnd}: exact {dict((m, round(v, 5)) for m, v in exact.values.items())}")

    secure = {seed: secure_shares(observed[seed]) for seed in range(args.seeds)}
    reference = {seed: observed_reference_shares(exact_rounds, seed) for seed in range(args.seeds)}
    by_seed = [spearman(exact_book.shares(), secure[k]) for k in sorted(secure)]
    median_seed = sorted(secure, key=lambda k: (by_seed[k], k))[len(by_seed) // 2]  # the run whose Spearman is the median
    shares = {"exact": exact_book.shares(), "open": open_book.shares(), "secure": secure[median_seed]}
    table = Table(title=f"contribution shares after {args.rounds} rounds (planted consortium; secure: group seed {median_seed}, the median)")
    table.add_column("member")
    for mode in shares:
        table.add_column(mode, justify="right")
    for m in ROLES:
        table.add_row(m, *(f"{shares[mode].get(m, 0.0):.3f}" for mode in shares))
    console.print(table)
    exact_positive = [m for m in ROLES if shares["exact"][m] > 0]
    result = {
        "spearman_open": spearman(shares["exact"], shares["open"]),
        "spearman_secure": summary(by_seed)["median"],  # the median over group seeds (target >= 0.9)
        "secure_all_positive_credited_share_of_group_seeds": sum(
            all(secure[k][m] > 0 for m in exact_positive) for k in secure) / len(secure),
        "free_rider_share_open": shares["open"]["free_rider"],
        "free_rider_share_secure": max(secure[k]["free_rider"] for k in secure),
        "free_rider_share_exact": shares["exact"]["free_rider"],
        "mae_share_open": sum(abs(shares["open"][m] - shares["exact"][m]) for m in ROLES) / len(ROLES),
        "mae_share_secure": sorted(sum(abs(secure[k][m] - shares["exact"][m]) for m in ROLES) / len(ROLES) for k in secure)[len(secure) // 2],
        "spearman_secure_by_group_seed": by_seed,
        "spearman_secure_over_group_seeds": summary(by_seed),
        "spearman_observed_rounds_reference_over_group_seeds": summary(
            [spearman(shares["exact"], reference[k]) for k in sorted(reference)]),
        "members_credited_secure_over_group_seeds": {
            m: sum(secure[k][m] > 0 for k in secure) / len(secure) for m in ROLES},
        "free_rider_share_secure_by_group_seed": [secure[k]["free_rider"] for k in sorted(secure)],
        "free_rider_share_secure_max_over_group_seeds": max(secure[k]["free_rider"] for k in secure),
        "duplicate_above_rich": {
            "exact": shares["exact"]["duplicate"] > shares["exact"]["rich"],
            "secure_share_of_group_seeds_agreeing": sum(
                (secure[k]["duplicate"] > secure[k]["rich"]) == (shares["exact"]["duplicate"] > shares["exact"]["rich"])
                for k in secure) / len(secure),
            "observed_rounds_reference_share_of_group_seeds_agreeing": sum(
                (reference[k]["duplicate"] > reference[k]["rich"]) == (shares["exact"]["duplicate"] > shares["exact"]["rich"])
                for k in reference) / len(reference),
        },
        "model_evaluations": cost,
        "shares": shares,
        "exact_rounds": exact_rounds,
        "setup": {"rounds": args.rounds, "group_seeds": args.seeds, "secure_cost_seed": args.seed, "median_group_seed": median_seed,
                  "roles": list(ROLES), "validation": "code", "lr": 0.001,
                  "model_evaluations": "counted by CoalitionValue; secure: what the valuation of one seed's groups spent"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print({k: v for k, v in result.items() if k not in ("shares", "setup", "exact_rounds") and not k.endswith("by_group_seed")})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
