"""Differential privacy on the demo consortium: validation perplexity at ε = ∞, 8, 4, 1 (δ = 1e-5),
record-level and member-level, and a DP-SGD step's time against a plain one.

An in-process federation as bench/recipes.py runs it (the production trainer, the demo's recipe
and server optimizer, no transport), `--rounds` rounds, every demo member every round:
- record-level: every member trains DP-SGD (privacy/dp.py) with σ calibrated by opacus for the
  run's rounds at its Poisson rate (each member's own ε; dp-clip-norm 0.5), as a member node does
  it: with dp-large-batch on (the default), one step per round over the records of the demo's
  14 batches of 8, at lr x 14 (local SGD); one more row at ε = 8 with it off (14 steps of 8);
- member-level: every member clips its update to `update-clip` (the demo's 3.0) and the mean
  carries the noise the operator would calibrate for that ε (server/member_dp.py over the
  demo's secure codec), as Gaussian noise of the Skellam shares' variance: at these variances the
  two are the same to the precision this measures, and the masked integer path is tested exactly
  elsewhere (tests/privacy/test_distributed_dp.py).
Perplexity is the mean over the demo's validation domains after the last round. The step time is
the same member's `local-steps` steps with and without DP-SGD, alternated 3 times, medians.
Writes bench/results/privacy.json: `ppl_eps_inf`, `ppl_eps_8`, `ppl_eps_4`, `ppl_eps_1` (record-
level), `ppl_ratio_eps_8` (target <= 1.10), `dp_step_time_ratio` (target <= 2.0),
`ppl_ratio_eps_8_large_batch_off`, and the member-level rows under `member_level`.
Run: `.venv/bin/python bench/privacy.py [--rounds 4]` (~15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

# run as `python bench/privacy.py`, this file's folder comes first on the path and its name would
# shadow the project's `privacy` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from aggregation.quantize import shared_scale  # noqa: E402
from aggregation.robust import clip_l2  # noqa: E402
from client.node import member_seed  # noqa: E402
from client.trainer import TrainConfig, train_local  # noqa: E402
from fedmoe.cli import DEMO_SECURE_CLIP, DEMO_SECURE_CODEC, DEMO_TRAINING  # noqa: E402
from model.base import load_base  # noqa: E402
from model.chatter import silence_library_chatter  # noqa: E402
from model.member_data import read_documents  # noqa: E402
from model.precision import select_precision  # noqa: E402
from model.tokenizer import pack_documents  # noqa: E402
from privacy.dp import DPConfig, DPStep, calibrate, epsilon_of, sample_rate  # noqa: E402
from server.config import RunConfig  # noqa: E402
from server.evaluation import evaluate, validation_sets  # noqa: E402
from server.init import InitConfig, init_workspace  # noqa: E402
from server.member_dp import member_dp  # noqa: E402
from server.workspace import Workspace  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "privacy.json"
EPSILONS = (math.inf, 8.0, 4.0, 1.0)
DELTA = 1e-5
UPDATE_CLIP = 3.0  # the demo's secure mode
RECORD_CLIP = 0.5  # dp-clip-norm: below the demo records' gradient norms (0.6-1.0 measured), so it binds on every record


def run_row(ws: Workspace, cfg: RunConfig, rounds: int, level: str, eps: float, console: Console,
            large_batch: bool = True) -> dict:
    base = load_base(ws.base)
    lora = base.with_lora()
    val = validation_sets(ws, base, cfg)
    members = ws.members()
    data = {m: pack_documents(base.tokenizer, read_documents(ws.members_dir / m), cfg.seq_len) for m in members}
    precision = select_precision(cfg.precision)
    optimizer, state, opt_state = cfg.server_optimizer(), lora.get_state(), {}
    sigma: dict[str, float] = {}
    spent: dict[str, float] = {}
    noise_std = 0.0
    dp_config = DPConfig(eps, DELTA, RECORD_CLIP, rounds=rounds, large_batch=large_batch)
    steps, batch, lr = cfg.local_steps, cfg.batch_size, cfg.lr
    if level == "record" and math.isfinite(eps):
        steps, batch, lr = dp_config.round_shape(cfg.local_steps, cfg.batch_size, cfg.lr, cfg.local_opt)
        for m in members:
            rate = sample_rate(batch, data[m][0].shape[0])
            sigma[m] = calibrate(dp_config, rate, steps)
            spent[m] = epsilon_of([(sigma[m], rate, steps * rounds)], DELTA)
    if level == "member" and math.isfinite(eps):
        secure = cfg.with_overrides(secagg="on", codec=DEMO_SECURE_CODEC, codec_clip=DEMO_SECURE_CLIP,
                                    update_clip=UPDATE_CLIP, dp_member_epsilon=eps, dp_member_delta=DELTA,
                                    num_rounds=rounds)
        dp = member_dp(secure, lora.shapes())
        assert dp is not None
        noise_std = math.sqrt(dp.variance) * shared_scale(secure.codec_config())  # float units, per coordinate
    began = time.perf_counter()
    for rnd in range(1, rounds + 1):
        deltas = []
        for m in members:
            blocks, labels = data[m]
            step = None
            if m in sigma:
                step = DPStep.secret(sigma[m], RECORD_CLIP, sample_rate(batch, blocks.shape[0]))
            result = train_local(lora, state, blocks, TrainConfig(
                local_steps=steps, batch_size=batch, lr=lr, optimizer=cfg.local_opt,
                seed=member_seed(cfg.seed, rnd, m), min_expert_tokens=0, dp=step), precision, labels=labels)
            delta = {k: result.delta.get(k, torch.zeros_like(v)) for k, v in state.items()}
            deltas.append(clip_l2(delta, UPDATE_CLIP) if level == "member" else delta)
        total = {k: sum(d[k] for d in deltas) for k in deltas[0]}
        if noise_std:
            total = {k: v + torch.randn(v.shape) * noise_std for k, v in total.items()}
        mean = {k: v / len(deltas) for k, v in total.items()}
        state, opt_state = optimizer.step(state, mean, opt_state)
        lora.set_state(state)
    losses = evaluate(lora, val, cfg)
    ppl = statistics.fmean(math.exp(v) for v in losses.values())
    label = f"{level}-level ε={eps:g}" + ("" if large_batch or level != "record" else " (dp-large-batch off)")
    console.print(f"{label}: mean validation ppl {ppl:.2f} ({time.perf_counter() - began:.0f} s)")
    return {"level": level, "epsilon": None if math.isinf(eps) else eps, "ppl": ppl, "val_loss": losses,
            "steps_per_round": steps, "batch": batch, "lr": lr, "clip": RECORD_CLIP if sigma else None,
            "sigma": sigma, "record_epsilon_spent": spent, "member_noise_std": noise_std,
            "seconds": time.perf_counter() - began}


def step_times(ws: Workspace, cfg: RunConfig) -> dict:
    base = load_base(ws.base)
    lora = base.with_lora()
    member = ws.members()[0]
    blocks, labels = pack_documents(base.tokenizer, read_documents(ws.members_dir / member), cfg.seq_len)
    precision, state = select_precision(cfg.precision), lora.get_state()
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for repeat in range(3):
        for kind in ("plain", "dp"):
            step = DPStep.secret(1.0, 1.0, sample_rate(cfg.batch_size, blocks.shape[0])) if kind == "dp" else None
            result = train_local(lora, state, blocks, TrainConfig(
                local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.local_opt,
                seed=repeat, min_expert_tokens=0, dp=step), precision, labels=labels)
            times[kind].append(result.seconds / cfg.local_steps)
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {"dp_step_time_ratio": dp / plain, "step_seconds": times, "member": member, "precision": precision.name}


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console(width=max(Console().width, 140))
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    cfg = RunConfig.from_user_config({"workspace": str(ws.root), **DEMO_TRAINING})
    timing = step_times(ws, cfg)
    console.print(f"DP-SGD step vs plain: {timing['dp_step_time_ratio']:.2f}x ({timing['precision']})")
    record = {eps: run_row(ws, cfg, args.rounds, "record", eps, console) for eps in EPSILONS}
    small = run_row(ws, cfg, args.rounds, "record", 8.0, console, large_batch=False)
    member = {eps: run_row(ws, cfg, args.rounds, "member", eps, console) for eps in EPSILONS[1:]}
    table = Table(title=f"demo consortium, {args.rounds} rounds of the demo recipe: mean validation perplexity")
    for col in ("ε (δ 1e-5)", "record-level ppl", "vs ε=∞", "member-level ppl", "vs ε=∞"):
        table.add_column(col, justify="right")
    inf = record[math.inf]["ppl"]
    for eps in EPSILONS:
        m = member.get(eps)
        table.add_row("∞" if math.isinf(eps) else f"{eps:g}", f"{record[eps]['ppl']:.2f}", f"{record[eps]['ppl'] / inf:.3f}",
                      f"{m['ppl']:.2f}" if m else "", f"{m['ppl'] / inf:.3f}" if m else "")
    console.print(table)
    console.print(f"record-level ε=8 with dp-large-batch off (14 steps of 8): ppl {small['ppl']:.2f}, {small['ppl'] / inf:.3f} of ε=∞")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {
        "ppl_eps_inf": inf, "ppl_eps_8": record[8.0]["ppl"], "ppl_eps_4": record[4.0]["ppl"],
        "ppl_eps_1": record[1.0]["ppl"], "ppl_ratio_eps_8": record[8.0]["ppl"] / inf,
        "dp_step_time_ratio": timing["dp_step_time_ratio"],
        "ppl_ratio_eps_8_large_batch_off": small["ppl"] / inf,
        "targets": {"ppl_ratio_eps_8": 1.10, "dp_step_time_ratio": 2.0},
        "rounds": args.rounds, "delta": DELTA, "record_level": {str(k): v for k, v in record.items()},
        "record_level_eps_8_large_batch_off": small,
        "member_level": {str(k): {**v, "ppl_ratio_vs_inf": v["ppl"] / inf} for k, v in member.items()},
        "step_time": timing, "commit": commit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
