"""Upload/download bytes and final validation loss per update encoding, on the demo consortium.

All rows run in one invocation with the same rounds, members and seed (Flower simulation):
- "fp32 LoRA FedAvg (FlowerTune-style)": bytes computed for sending the full LoRA state dict
  (A and B of every adapter + router) in fp32 both ways; its loss is the uncompressed fedmoe run;
- "full-model FedAvg": bytes computed for sending every parameter of the model in fp32;
- "int8 (the seeds' 8-bit, 4x)": fedmoe with dense stochastic int8;
- fedmoe encodings: shared-seed random-k + int8 with a shared clip (secure-aggregation
  compatible) and top-k + int8 (open mode only), with error feedback on the members.

Bytes are the real serialized Flower message contents per member per round (mean over rounds
2..N for the downlink, when members get patches). Writes bench/results/compression.json.
Run: `.venv/bin/python bench/compression.py [--workspace .fedmoe/demo --rounds 4]`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from server.config import RunConfig
from fedmoe.simulation import simulate
from server.workspace import Workspace
from model.chatter import silence_library_chatter
from model.base import load_base
from server.checkpoint import Checkpoints
from server.init import InitConfig, init_workspace
from server.summary import LogReporter

RESULTS = Path(__file__).parent / "results" / "compression.json"
# (row label, codec, codec-clip, secure-aggregation compatible)
ENCODINGS = [
    ("fedmoe fp32 (uncompressed reference)", "fp32", 0.0, False),
    ("int8 (the seeds' 8-bit, 4x)", "int8", 0.0, False),
    ("fedmoe randk0.05+int8, clip", "randk0.05+int8", 0.05, True),
    ("fedmoe randk0.02+int8, clip", "randk0.02+int8", 0.05, True),
    ("fedmoe topk0.005+int8", "topk0.005+int8", 0.0, False),
]


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)

    base = load_base(ws.base)
    full_model_bytes = sum(p.numel() * 4 for p in base.model.parameters())
    lora = base.with_lora()
    lora_state_bytes = sum(p.numel() * 4 for n, p in lora.model.named_parameters() if "lora_" in n or "modules_to_save" in n)

    rows = []
    stamp = int(time.time())
    for label, codec, clip, secure in ENCODINGS:
        console.rule(f"{label}: {args.rounds} rounds")
        config = RunConfig(workspace=str(ws.root), num_rounds=args.rounds, codec=codec, codec_clip=clip, contribution="off")
        run = f"bench-compression-{stamp}-{codec.replace('+', '_')}"
        started = time.perf_counter()
        simulate(config, LogReporter(), run_name=run)
        manifests = Checkpoints(ws.run_dir(run)).manifests()
        rounds = [m for m in manifests if m["members"]]
        up = sum(r["bytes_up"] / len(r["members"]) for r in rounds) / len(rounds)
        later = rounds[1:] or rounds
        down = sum(r["bytes_down"] / len(r["members"]) for r in later) / len(later)
        rows.append({
            "label": label, "codec": codec, "clip": clip, "secure_compatible": secure,
            "bytes_up": up, "bytes_down": down, "val_loss": manifests[-1]["val_loss"],
            "val_loss_round0": manifests[0]["val_loss"], "seconds": time.perf_counter() - started,
        })

    reference = rows[0]
    ref_loss = _mean(reference["val_loss"])
    base_loss = _mean(reference["val_loss_round0"])
    for row in rows:
        loss = _mean(row["val_loss"])
        row["loss_rel_diff"] = (loss - ref_loss) / ref_loss
        gain = base_loss - ref_loss
        row["improvement_retained"] = (base_loss - loss) / gain if gain > 0 else float("nan")
        row["ratio_vs_lora_fp32"] = lora_state_bytes / row["bytes_up"]
        row["ratio_vs_full_model"] = full_model_bytes / row["bytes_up"]

    table = Table(title=f"update encodings, {args.rounds} rounds, {len(ws.members())} members (bytes per member per round)")
    for col in ("encoding", "up", "down", "up ratio vs fp32 LoRA", "vs full model", "val loss", "rel. diff", "gain kept"):
        table.add_column(col, justify="right")
    table.add_row("fp32 LoRA FedAvg (FlowerTune-style, computed)", _kb(lora_state_bytes), _kb(lora_state_bytes), "1.0x",
                  f"{full_model_bytes / lora_state_bytes:.1f}x", f"{ref_loss:.4f}", "ref", "")
    table.add_row("full-model FedAvg (computed)", _kb(full_model_bytes), _kb(full_model_bytes),
                  f"{lora_state_bytes / full_model_bytes:.3f}x", "1.0x", "", "", "")
    for row in rows:
        table.add_row(row["label"], _kb(row["bytes_up"]), _kb(row["bytes_down"]), f"{row['ratio_vs_lora_fp32']:.1f}x",
                      f"{row['ratio_vs_full_model']:.0f}x", f"{_mean(row['val_loss']):.4f}",
                      f"{row['loss_rel_diff']:+.2%}", f"{row['improvement_retained']:.0%}")
    console.print(table)

    def best(secure: bool) -> dict:
        eligible = [r for r in rows[1:] if (r["secure_compatible"] if secure else r["codec"].startswith("topk"))
                    and r["loss_rel_diff"] <= 0.01]
        pool = eligible or [r for r in rows[1:] if (r["secure_compatible"] if secure else r["codec"].startswith("topk"))]
        return max(pool, key=lambda r: r["ratio_vs_lora_fp32"])

    secure_best, open_best = best(True), best(False)
    result = {
        "upload_ratio_secure_compatible": secure_best["ratio_vs_lora_fp32"],
        "upload_ratio_open": open_best["ratio_vs_lora_fp32"],
        "upload_ratio_vs_full_model": max(secure_best["ratio_vs_full_model"], open_best["ratio_vs_full_model"]),
        "upload_ratio_vs_full_model_secure_compatible": secure_best["ratio_vs_full_model"],
        "loss_rel_diff_secure_compatible": secure_best["loss_rel_diff"],
        "loss_rel_diff_open": open_best["loss_rel_diff"],
        "best_secure_compatible": secure_best["codec"],
        "best_open": open_best["codec"],
        "lora_fp32_state_bytes": lora_state_bytes,
        "full_model_bytes": full_model_bytes,
        "rows": rows,
        "setup": {"rounds": args.rounds, "members": ws.members(), "local_steps": RunConfig().local_steps},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print({k: v for k, v in result.items() if k not in ("rows", "setup")})
    console.print(f"wrote {args.out}")


def _mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


if __name__ == "__main__":
    main()
