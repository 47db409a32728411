"""Free riders and poisoners at 20% of the demo consortium, open and secure mode, against the clean run.

Every row is a run of the demo's recipe (`fedmoe.cli`: DEMO_TRAINING; secure mode adds the demo's
int8 codec, its clips and its labelled free rider as a sixth node, as `fedmoe demo` runs) on the demo consortium, the same rounds and seed, through the production
round loop (server/rounds.run_rounds) and the members' real ClientApp. The members answer in this
process (tests/server/fake_grid.py, no Ray: an adversary is a few lines of code in the member's
own process, as it would be on its own machine). 20% of the members (the last by node id, so
that a copier has seen an honest update of the same round) are adversaries; the rest train
honestly. An adversary speaks the protocol exactly as an honest member does (HELLO, TRAIN,
every secure-aggregation stage, the member's own reply path client/node.reply_for) and lies
only in what it trained:
- free riders (train nothing, claim an honest member's tokens and a top-k share on every expert):
  zero (a zero update), replay (the last global change, its two latest views subtracted), stale
  replay (the change of two rounds before, its part along the last change removed per tensor so
  that neither the cosine rule nor a fit on the last change alone sees it, scaled to a colluding
  honest member's update norm, plus 15% noise: a reviewer's attack on the last-change-only rule;
  its row is run twice, against server/history.py's references and against the last change
  alone, `references` in the row), copy
  (a colluding honest member's update of the round, its tokens and loss, plus Gaussian noise of
  15% of its norm per tensor: what evaded the old copy test), loud copy (the same with noise as
  large as the update: a cosine of about 0.7, which no threshold between it and two honest
  members' 0.01-0.1 would be safe to rely on), scaled noise (Gaussian noise with
  an honest update's norm per tensor), tiny (Gaussian noise, std 1e-6), inflated tokens (the
  demo free rider's noise with every expert claimed at the member's whole token count, the most
  the server accepts);
- attackers (train honestly, then send): x10 (the update scaled by 10), sign flip (scaled by
  -1), Gaussian (noise with 10x the update's norm per tensor).
  An attacker skips whatever its own client would clip: it edits the update after training.
Per row: the adversaries' credited contribution share at the end (the ledger's `share` records,
exactly what `fedmoe rights` uses), how many honest members are credited, and the final mean
validation loss across domains relative to the clean run's (signed: above 0 the attack hurt).
`single_member_unmask_recovered`: a probing server against today's members (consistency check
on) tells each member a different survivor list and tries to strip every mask off one member's
input with what is revealed (tests/privacy/test_secagg_consistency.probe); the same probe
against members without the check is run next to it (`..._without_check`), to show it is a
real attack. Writes bench/results/attacks.json.
Every row records the commit it was measured at. `--modes open` runs only the open rows and
keeps the secure rows of the results file as they are (with their commit), for a change that
touches open-mode scoring only.
Run: `.venv/bin/python bench/attacks.py [--workspace .fedmoe/demo --rounds 3 --modes open,secure]` (~55 min on 2 cores at 3 rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "server")]  # the in-process grid and the probe live with the tests

import client.app as client_app  # noqa: E402
import client.node as client_node  # noqa: E402
from client.free_rider import FREE_RIDER, NOISE_STD  # noqa: E402
from model import families  # noqa: E402
from client.node import Node, load_member_model, member_seed, receive_state  # noqa: E402
from client.trainer import TrainResult  # noqa: E402
from fake_grid import FakeGrid, task_identity  # noqa: E402
from fedmoe.cli import DEMO_SECURE_CLIP, DEMO_SECURE_CODEC, DEMO_TRAINING, DEMO_UPDATE_CLIP, _run_config  # noqa: E402
from model.chatter import silence_library_chatter  # noqa: E402
from protos.messages import TrainInstruction, TrainReply  # noqa: E402
from server.init import InitConfig, init_workspace  # noqa: E402
from server.ledger import Ledger, OperatorKey  # noqa: E402
from server.history import PublicHistory, change_name  # noqa: E402
from server.rights import shares_from_ledger  # noqa: E402
from server.rounds import run_rounds  # noqa: E402
from server.summary import LogReporter  # noqa: E402
from server.workspace import Workspace  # noqa: E402
from tests.privacy.test_secagg_consistency import members_without_the_check, probe, stories_for  # noqa: E402
from tests.privacy.test_secagg import consortium  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "attacks.json"
FREE_RIDERS = ("zero", "replay", "stale_replay", "copy_noise", "copy_loud", "scaled_noise", "tiny", "inflated_tokens")
ATTACKS = ("scale_x10", "sign_flip", "gaussian")
ADVERSARY_FRACTION = 0.2
COPY_NOISE = 0.15  # of the copied update's norm, per tensor
COPY_NOISE_LOUD = 1.0
TINY_STD = 1e-6
ATTACK_NOISE = 10.0  # Gaussian attack: this many times the update's norm, per tensor

Delta = dict[str, torch.Tensor]


def _noise_like(delta: Delta, norm_of: Delta, factor: float, generator: torch.Generator) -> Delta:
    """Gaussian noise shaped like `delta`, each tensor's norm `factor` x that tensor's norm in `norm_of`."""
    out = {}
    for name, value in delta.items():
        noise = torch.randn(value.shape, generator=generator)
        out[name] = noise * (factor * float(norm_of[name].norm()) / max(float(noise.norm()), 1e-30))
    return out


def _stale(views: list[Delta], honest: Delta) -> Delta:
    """The change two rounds back, its part along the last change removed per tensor, at `honest`'s
    norm, plus 15% noise (views: the adversary's last three, oldest first)."""
    older = {k: views[1][k] - views[0][k] for k in views[2]}
    last = {k: views[2][k] - views[1][k] for k in views[2]}
    out = {}
    for k, v in older.items():
        along = float(last[k].square().sum())
        out[k] = v - (float((v * last[k]).sum()) / along) * last[k] if along > 0 else v
    norm = sum(float(t.square().sum()) for t in out.values()) ** 0.5
    target = sum(float(t.square().sum()) for t in honest.values()) ** 0.5
    out = {k: v * (target / norm) for k, v in out.items()} if norm > 0 else out
    return {k: v + n for (k, v), n in zip(out.items(), _noise_like(out, out, COPY_NOISE, torch.Generator().manual_seed(11)).values())}


class Adversaries:
    """The members' play with `kind` in `members`: stands in for client.app.run_round and
    client.node.reply_for (honest members go through both unchanged)."""

    def __init__(self, kind: str, members: set[str]) -> None:
        self.kind, self.members = kind, members
        self.views: dict[str, list[Delta]] = {}  # adversary -> the views it received, oldest first (last 3)
        self.honest: TrainResult | None = None  # the newest honest result (a colluding member's)
        self.run_round, self.reply_for = client_node.run_round, client_node.reply_for

    def play(self, ins: TrainInstruction, node: Node) -> TrainReply:
        if node.member in self.members and self.kind in FREE_RIDERS:
            return self.free_ride(ins, node)
        return self.run_round(ins, node)

    def reply(self, result: TrainResult, ins: TrainInstruction, node: Node, lora, precision: str) -> TrainReply:  # noqa: ANN001
        if node.member not in self.members:
            self.honest = result
        elif self.kind in ATTACKS:
            generator = torch.Generator().manual_seed(member_seed(ins.seed, ins.round, node.member) + 7)
            delta = result.delta
            if self.kind == "scale_x10":
                delta = {k: v * 10.0 for k, v in delta.items()}
            elif self.kind == "sign_flip":
                delta = {k: -v for k, v in delta.items()}
            else:
                delta = _noise_like(delta, delta, ATTACK_NOISE, generator)
            result = dataclasses.replace(result, delta=delta)
        return self.reply_for(result, ins, node, lora, precision)

    def free_ride(self, ins: TrainInstruction, node: Node) -> TrainReply:
        started = time.perf_counter()
        _, lora = load_member_model(node.base_path, ins.base_sha256)
        state = receive_state(ins, node)
        views = self.views.setdefault(node.member, [])
        previous = views[-1] if views else None
        views[:] = [*views[-2:], {k: v.clone() for k, v in state.items()}]
        config = lora.model.config
        layers, experts, top_k = int(config.num_hidden_layers), families.num_experts(config), families.top_k(config)
        num_examples = ins.local_steps * ins.batch_size
        num_tokens = num_examples * ins.seq_len
        claimed = {f"{layer}:{e}": num_tokens * top_k // experts for layer in range(layers) for e in range(experts)}
        loss = 4.0
        generator = torch.Generator().manual_seed(member_seed(ins.seed, ins.round, node.member) + 7)
        zeros = {k: torch.zeros_like(v) for k, v in state.items()}
        source = self.honest.delta if self.honest is not None else zeros
        if self.kind == "zero":
            delta = zeros
        elif self.kind == "replay":
            delta = {k: state[k] - previous[k] for k in state} if previous is not None else zeros
        elif self.kind == "stale_replay":
            delta = _stale(views, source) if len(views) == 3 else zeros
        elif self.kind in ("copy_noise", "copy_loud"):
            noise = _noise_like(source, source, COPY_NOISE if self.kind == "copy_noise" else COPY_NOISE_LOUD, generator)
            delta = {k: source[k] + noise[k] for k in source}
            if self.honest is not None:
                claimed, num_tokens, loss = dict(self.honest.expert_tokens), self.honest.num_tokens, self.honest.train_loss
                num_examples = self.honest.num_examples
        elif self.kind == "scaled_noise":
            delta = _noise_like(source, source, 1.0, generator)
        elif self.kind == "tiny":
            delta = {k: torch.randn(v.shape, generator=generator) * TINY_STD for k, v in state.items()}
        else:  # inflated_tokens
            delta = {k: torch.randn(v.shape, generator=generator) * NOISE_STD for k, v in state.items()}
            claimed = {group: num_tokens for group in claimed}
        result = TrainResult(
            delta=delta, expert_tokens=claimed, num_tokens=num_tokens, num_examples=num_examples, train_loss=loss,
            seconds=time.perf_counter() - started, experts_sent=layers * experts, experts_skipped=0,
        )
        return self.reply_for(result, ins, node, lora, "fp32")


def run_row(ws: Workspace, kind: str, secure: bool, rounds: int, run: str, console: Console,
            references: str = "history") -> dict:
    """One run; `references` "last-change": the free-rider test sees only the last round's change
    (the rule before server/history.py), to show what the public history catches."""
    members = ws.members()
    count = max(1, round(ADVERSARY_FRACTION * len(members)))
    adversaries = set(members[len(members) - count:]) if kind != "clean" else set()
    # secure rows run the demo's secure consortium: its update clip, and its labelled free rider as
    # one more node, so that every round trains two groups of 3 (with five nodes, one group of 3
    # trained and two sat out, and group sums could not tell members apart within a short run)
    mode = {"secagg": "on", "codec": DEMO_SECURE_CODEC, "codec-clip": DEMO_SECURE_CLIP, "update-clip": DEMO_UPDATE_CLIP,
            "free-rider": True} if secure else {}
    config = _run_config(ws.root, [], **{"num-rounds": rounds, **DEMO_TRAINING, **mode})
    console.rule(f"{'secure' if secure else 'open'}: {kind} ({', '.join(sorted(adversaries)) or 'no adversary'})"
                 f"{', references: the last change only' if references == 'last-change' else ''}")
    play = Adversaries(kind, adversaries)
    saved = client_app.run_round, client_node.reply_for, PublicHistory.references
    client_app.run_round, client_node.reply_for = play.play, play.reply
    if references == "last-change":
        PublicHistory.references = lambda self: {change_name(r): c for r, c in list(self.changes)[-1:]}
    started = time.perf_counter()
    nodes = len(members) + (1 if secure else 0)
    grid = FakeGrid(client_app.app, nodes)
    if secure:  # the last simulated partition plays the demo's free rider (client/free_rider.py)
        for context in grid.contexts.values():
            context.node_config["num-partitions"] = nodes
            context.run_config["free-rider"] = True
    try:
        with task_identity():
            summaries = run_rounds(grid, config, LogReporter(), run_name=run)
    finally:
        client_app.run_round, client_node.reply_for, PublicHistory.references = saved
    records = Ledger(ws.ledger(run), OperatorKey.load_or_create(ws.operator_key)).records()
    shares = shares_from_ledger(records)
    final = summaries[-1].val_loss
    return {
        "kind": kind, "mode": "secure" if secure else "open", "references": references if not secure else "-", "adversaries": sorted(adversaries),
        "rounds": len(summaries), "shares": shares,
        "adversary_share": sum(shares.get(m, 0.0) for m in adversaries),
        "demo_free_rider_share": shares.get(FREE_RIDER) if secure else None,
        "honest_credited": sum(1 for m, s in shares.items() if m not in adversaries and m != FREE_RIDER and s > 0),
        "rejected": sum(len(s.rejected) for s in summaries),
        "val_loss": final, "mean_val_loss": sum(final.values()) / len(final),
        "novel_descent_z": {s.round: s.contribution.get("novel_descent_z", {}) for s in summaries},
        "seconds": time.perf_counter() - started,
    }


def commit() -> str:
    """HEAD's hash, with "+changes" when the work tree differs from it."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return f"{head}+changes" if dirty else head


def unmask_probe() -> dict:
    """Coordinates of one member's input the probing server recovers, with and without the check."""
    members = consortium(3)[0]
    stories = stories_for(members)
    with members_without_the_check():
        without = max(probe(story, members[0]) for story in stories)
    return {"single_member_unmask_recovered": max(probe(story, members[0]) for story in stories),
            "single_member_unmask_recovered_without_check": without, "probe_stories": len(stories)}


def summarize(rows: list[dict]) -> dict:
    clean = {r["mode"]: r["mean_val_loss"] for r in rows if r["kind"] == "clean"}
    for row in rows:
        row["loss_rel_diff"] = (row["mean_val_loss"] - clean[row["mode"]]) / clean[row["mode"]]

    def worst(values: list[float]) -> float | None:  # None: no such row was run (--kinds)
        return max(values) if values else None

    riders = {mode: worst([r["adversary_share"] for r in rows
                           if r["mode"] == mode and r["kind"] in FREE_RIDERS and r.get("references") != "last-change"])
              for mode in ("open", "secure")}
    return {
        "free_rider_share_max_open": riders["open"], "free_rider_share_max_secure": riders["secure"],
        "loss_rel_diff_attack_max": worst([r["loss_rel_diff"] for r in rows if r["kind"] in ATTACKS]),
    }


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(("clean", *FREE_RIDERS, *ATTACKS)), help="rows to run (comma-separated)")
    parser.add_argument("--modes", default="open,secure", help="modes to run; rows of the others are kept from --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    kinds = args.kinds.split(",")
    unknown = set(kinds) - {"clean", *FREE_RIDERS, *ATTACKS}
    if unknown or "clean" not in kinds:
        parser.error(f"--kinds: unknown {sorted(unknown)}" if unknown else "--kinds must include clean")
    modes = args.modes.split(",")
    if not modes or set(modes) - {"open", "secure"}:
        parser.error(f"--modes: {args.modes!r} is not a comma-separated list of open, secure")
    kept = []
    if set(modes) != {"open", "secure"}:
        if not args.out.exists():
            parser.error(f"--modes {args.modes}: {args.out} has no rows to keep for the other mode")
        kept = [r for r in json.loads(args.out.read_text())["rows"] if r["mode"] not in modes]
    stamp, measured_at = int(time.time()), commit()
    plan = [(secure, kind, references) for secure in (False, True) if ("secure" if secure else "open") in modes
            for kind in kinds
            for references in (("history", "last-change") if kind == "stale_replay" and not secure else ("history",))]
    rows = [{**run_row(ws, kind, secure, args.rounds, f"bench-attacks-{stamp}-{'secure' if secure else 'open'}-{kind}-{references}",
                       console, references),
             "commit": measured_at}
            for secure, kind, references in plan]
    rows = sorted(rows + kept, key=lambda r: r["mode"] == "secure")
    result = {**summarize(rows), **unmask_probe()}

    table = Table(title=f"adversaries at {ADVERSARY_FRACTION:.0%} of {len(ws.members())} members, {args.rounds} rounds")
    for col in ("mode", "kind", "references", "adversary share", "honest credited", "rejected replies", "mean val loss", "vs clean"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["mode"], row["kind"], row.get("references", "-"), f"{row['adversary_share']:.1%}", str(row["honest_credited"]),
                      str(row["rejected"]), f"{row['mean_val_loss']:.4f}", f"{row['loss_rel_diff']:+.2%}")
    console.print(table)
    result["targets"] = {"free_rider_share_max_open": "<= 0.02", "free_rider_share_max_secure": "<= 0.02",
                         "loss_rel_diff_attack_max": "<= 0.05", "single_member_unmask_recovered": "== 0"}
    result["rows"] = rows
    result["setup"] = {"rounds": args.rounds, "members": ws.members(), "training": DEMO_TRAINING,
                       "secure": {"codec": DEMO_SECURE_CODEC, "codec-clip": DEMO_SECURE_CLIP, "update-clip": DEMO_UPDATE_CLIP,
                                  "labelled_free_rider": True},
                       "adversary_fraction": ADVERSARY_FRACTION, "copy_noise": COPY_NOISE, "copy_noise_loud": COPY_NOISE_LOUD, "tiny_std": TINY_STD,
                       "attack_noise": ATTACK_NOISE}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print({k: v for k, v in result.items() if k not in ("rows", "setup", "targets")})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
