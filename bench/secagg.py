"""Secure aggregation's cost: wall time, member-side crypto and upload bytes, secure vs plain.

One invocation, side by side, for 5, 10 and 20 simulated members (the demo's five domains, each
split into 1, 2 or 4 members): the same codec (shared-seed random-k + int8 with a shared clip,
error feedback) with secagg off and on, in Flower's simulation engine, 2 rounds each; round 2 is
measured (round 1 warms caches: tokenized data, the full-state broadcast). Per member count:
- wall_ratio: secure round seconds / plain round seconds (train, the four SecAgg+ exchanges,
  unmask, evaluation; contribution scoring off in both);
- crypto: the member's time on the five stages as its daemon measured it (key agreement,
  Shamir, AES-CTR masks, AES-GCM, its session file), also as a fraction of its local training
  time; and the pure protocol cost of one member in-process on the same vector (no I/O);
- upload_expansion: a member's bytes up in a secure round (TRAIN reply + stage replies) / in a
  plain round (TRAIN reply with the update), real serialized Flower message contents; and
  upload_expansion_body: the masked vector's bytes / the codec body's bytes (headers and the
  key-exchange messages left out: what the wider ring costs on its own);
- ring bits: the width each element needs for the sum of n members, against 8 without secagg.
Writes bench/results/secagg.json (top-level keys wall_ratio_10, crypto_fraction_10,
upload_expansion_10 and the same for 5 and 20).
Run: `.venv/bin/python bench/secagg.py [--workspace .fedmoe/demo --members 5 10 20]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from aggregation.codec import encoded_nbytes
from aggregation.secure import TOKENS, SecureLayout
from server.config import RunConfig
from fedmoe.simulation import simulate
from server.workspace import Workspace
from model.chatter import silence_library_chatter
from model.base import load_base
from model.member_data import read_texts
from model.lora import expert_of
from privacy.secagg_member import MemberSession
from privacy.secagg_server import ServerSession
from server.init import InitConfig, init_workspace
from server.summary import LogReporter
from server.secure import SecureSettings, make_params

RESULTS = Path(__file__).parent / "results" / "secagg.json"
CODEC, CLIP = "randk0.05+int8", 0.05


def split_workspace(demo: Workspace, root: Path, members: int) -> Workspace:
    """The demo consortium with each domain's member data split round-robin into members/5 parts."""
    ws = Workspace(root)
    if ws.root.exists():
        shutil.rmtree(ws.root)
    ws.corpora.mkdir(parents=True)
    for linked in (demo.validation_dir, demo.general_dir):
        (ws.corpora / linked.name).symlink_to(linked)
    ws.base.symlink_to(demo.base)
    parts = members // len(demo.members())
    for domain in demo.members():
        texts = read_texts(demo.members_dir / domain)
        for part in range(parts):
            name = domain if parts == 1 else f"{domain}-{part}"
            folder = ws.members_dir / name
            folder.mkdir(parents=True)
            (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[part::parts]))
    return ws


def protocol_ms(layout: SecureLayout, n: int) -> dict[str, float]:
    """One member's in-process protocol time (ms) in a round of n, and the server's finish."""
    settings = SecureSettings(threshold=0, neighbours=0, ring_bits=0, min_group=0, timeout=1.0, seed=0)
    names = [f"m{i:02d}" for i in range(n)]
    params = make_params(2, names, layout, settings, 0)
    keys = {m: Ed25519PrivateKey.generate() for m in names}
    directory = {m: k.public_key() for m, k in keys.items()}
    sessions = {m: MemberSession(params, m, keys[m], directory) for m in names}
    server = ServerSession(params, directory)
    member_s = {m: 0.0 for m in names}

    def timed(m: str, step):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = step()
        member_s[m] += time.perf_counter() - t0
        return out

    x = torch.randint(0, 2 * layout.qmax + 1, (layout.vector_length,), dtype=torch.int64)
    adverts = {m: timed(m, s.advertise) for m, s in sessions.items()}
    forwarded = server.receive_adverts(adverts)
    shares = {m: timed(m, lambda s=sessions[m], f=forwarded[m]: s.share_keys(f)) for m in names}
    inboxes = server.receive_shares(shares)
    masked = {m: timed(m, lambda s=sessions[m], i=inboxes[m]: s.masked_input(x, i)) for m in names}
    survivors, _ = server.receive_masked(masked)
    server.receive_signatures({m: timed(m, lambda s=sessions[m]: s.sign_survivors(survivors)) for m in names})
    requests = server.unmask_requests()
    replies = {m: timed(m, lambda s=sessions[m], r=r: s.unmask(r.signatures)) for m, r in requests.items()}
    t0 = time.perf_counter()
    total = server.finish(replies)
    finish = time.perf_counter() - t0
    assert torch.equal(total, (x * n) % (1 << params.ring_bits))
    return {"member_ms": 1000 * statistics.median(member_s.values()), "server_finish_ms": 1000 * finish,
            "ring_bits": params.ring_bits, "threshold": params.threshold, "degree": params.degree,
            "vector_length": params.vector_length, "packed_bytes": params.packed_bytes}


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--members", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console(width=max(Console().width, 150))
    demo = Workspace(args.workspace.resolve())
    init_workspace(demo, InitConfig(), log=console.print)
    lora = load_base(demo.base).with_lora()
    shapes = lora.shapes()

    result: dict[str, object] = {}
    rows = []
    for n in args.members:
        ws = split_workspace(demo, demo.root.parent / f"bench-secagg-{n}", n)
        measured = {}
        for mode in ("off", "on"):
            console.rule(f"{n} members, secagg {mode}")
            config = RunConfig(
                workspace=str(ws.root), num_rounds=2, local_steps=args.local_steps, codec=CODEC, codec_clip=CLIP,
                secagg=mode, contribution="off", eval_batches=2,
            )
            run = simulate(config, LogReporter(), run_name=f"secagg-{mode}")
            last = run.summaries[-1]
            if len(last.members) != n:
                raise SystemExit(f"{n} members, secagg {mode}: only {len(last.members)} finished round 2")
            measured[mode] = last
        plain, secure = measured["off"], measured["on"]
        layout = SecureLayout(shapes, {k: expert_of(k) or TOKENS for k in shapes}, RunConfig(codec=CODEC, codec_clip=CLIP).codec_config(),
                              0, args.local_steps * RunConfig().batch_size * RunConfig().seq_len)
        proto = protocol_ms(layout, n)
        train_s = statistics.mean(m.seconds for m in secure.members)
        stage_s = statistics.mean(m.secagg_seconds for m in secure.members)
        row = {
            "members": n,
            "wall_plain_s": plain.seconds, "wall_secure_s": secure.seconds,
            "wall_ratio": secure.seconds / plain.seconds,
            "member_train_s": train_s, "member_stage_ms": 1000 * stage_s,
            "crypto_fraction": stage_s / train_s,
            "protocol_member_ms": proto["member_ms"], "protocol_server_finish_ms": proto["server_finish_ms"],
            "bytes_up_plain": plain.bytes_up / n, "bytes_up_secure": secure.bytes_up / n,
            "upload_expansion": secure.bytes_up / plain.bytes_up,
            "body_bytes_plain": encoded_nbytes(shapes, layout.codec), "body_bytes_secure": proto["packed_bytes"],
            "upload_expansion_body": proto["packed_bytes"] / encoded_nbytes(shapes, layout.codec),
            "ring_bits": proto["ring_bits"], "threshold": proto["threshold"], "neighbours": proto["degree"],
            "vector_length": proto["vector_length"],
            "val_loss_plain": statistics.mean(plain.val_loss.values()),
            "val_loss_secure": statistics.mean(secure.val_loss.values()),
        }
        rows.append(row)
        for key in ("wall_ratio", "crypto_fraction", "upload_expansion", "upload_expansion_body"):
            result[f"{key}_{n}"] = row[key]
        result[f"crypto_ms_{n}"] = row["member_stage_ms"]

    table = Table(title=f"secure / plain, codec {CODEC} clip {CLIP}, round 2, {args.local_steps} local steps")
    for col in ("n", "wall s plain/secure", "wall ratio", "member SecAgg ms (of training)", "protocol ms",
                "bits", "t/k", "up KB plain/secure", "expansion (body)", "val loss plain/secure"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["members"]), f"{r['wall_plain_s']:.1f} / {r['wall_secure_s']:.1f}", f"{r['wall_ratio']:.2f}x",
            f"{r['member_stage_ms']:.0f} ({r['crypto_fraction']:.1%})", f"{r['protocol_member_ms']:.1f}",
            f"{r['ring_bits']}", f"{r['threshold']}/{r['neighbours']}",
            f"{r['bytes_up_plain'] / 1024:.1f} / {r['bytes_up_secure'] / 1024:.1f}",
            f"{r['upload_expansion']:.2f}x ({r['upload_expansion_body']:.2f}x)",
            f"{r['val_loss_plain']:.4f} / {r['val_loss_secure']:.4f}",
        )
    console.print(table)
    result["targets"] = {"wall_ratio_10": 1.25, "crypto_fraction_10": 0.05, "upload_expansion_10": 1.6}
    result["rows"] = rows
    result["setup"] = {"codec": CODEC, "clip": CLIP, "local_steps": args.local_steps, "rounds": 2, "measured_round": 2,
                       "simulation": "Flower run_simulation, members one at a time (2 CPUs each)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print({k: v for k, v in result.items() if k not in ("rows", "setup")})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
