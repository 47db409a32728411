"""Bytes up and down and the share of the validation-loss fall each update encoding keeps.

All rows run in one invocation on the demo consortium with the demo's training recipe (local SGD
+ FedYogi, `fedmoe.cli.DEMO_TRAINING`), the same rounds, members and seed (Flower simulation):
- reference: fp32 updates up, the full fp32 state down every round (uncompressed both ways);
- "int8 (the seeds' 8-bit, 4x)": dense stochastic int8 up, dense int8 patches down;
- secure-aggregation compatible: shared-seed random-k + int8 with a shared clip up;
- open mode only: top-k + int8 up;
  the sparse rows get the round's mean update down (`broadcast = "step"`: only its non-zeros,
  exact, and the members replay the server's FedYogi step), error feedback on the members.
The FlowerTune-style baseline (an fp32 PEFT state dict, A and B of every LoRA module, sent both
ways every round) is measured by serializing peft's state dict of this model as a Flower
ArrayRecord message; fedmoe's bytes are the serialized Flower message contents of each round
(the round manifests), per member per round. Downlink means are over rounds 2..N (round 1 sends
every member the full state once, as a member joining does); `total_ratio_*_all_rounds` includes it.
Gain kept = (base loss - row loss) / (base loss - reference loss), the loss being the mean of the
domains' validation losses. Writes bench/results/compression.json.
Run: `.venv/bin/python bench/compression.py [--workspace .fedmoe/demo --rounds 10]` (~20 min, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from peft import get_peft_model_state_dict
from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from fedmoe.cli import DEMO_ROUNDS, DEMO_SECURE_CLIP, DEMO_TRAINING, _run_config
from fedmoe.simulation import simulate
from model.base import load_base
from model.chatter import silence_library_chatter
from server.checkpoint import Checkpoints
from server.init import InitConfig, init_workspace
from server.summary import LogReporter
from server.workspace import Workspace

RESULTS = Path(__file__).parent / "results" / "compression.json"
# (row label, run config, secure-aggregation compatible)
ENCODINGS = [
    ("fedmoe fp32, full state down (reference)", {"codec": "fp32", "broadcast": "full"}, False),
    ("int8 up, int8 patches down (the seeds' 8-bit)", {"codec": "int8"}, False),
    ("randk0.05+int8 clip, step down", {"codec": "randk0.05+int8", "codec-clip": DEMO_SECURE_CLIP, "broadcast": "step"}, True),
    ("randk0.02+int8 clip, step down", {"codec": "randk0.02+int8", "codec-clip": DEMO_SECURE_CLIP, "broadcast": "step"}, True),
    ("topk0.01+int8, step down", {"codec": "topk0.01+int8", "broadcast": "step"}, False),
    ("topk0.003+int8, step down", {"codec": "topk0.003+int8", "broadcast": "step"}, False),
]


def flowertune_message_bytes(ws: Workspace) -> int:
    """One fp32 PEFT state dict (A and B of every LoRA module) as a Flower message's content.

    peft's state dict without the embedding layers: the lm_head carries LoRA here, and with
    save_embedding_layers peft would add the frozen head itself (1.5M values), which no
    FlowerTune-style system sends each round.
    """
    lora = load_base(ws.base).with_lora()
    peft_state = get_peft_model_state_dict(lora.model, save_embedding_layers=False)
    state = {k: v.detach().float().contiguous() for k, v in peft_state.items()}
    return recorddict_to_proto(RecordDict({"arrays": ArrayRecord(torch_state_dict=state)})).ByteSize()


def run_row(ws: Workspace, label: str, settings: dict, rounds: int, run: str, console: Console) -> dict:
    console.rule(f"{label}: {rounds} rounds")
    config = _run_config(ws.root, [], **{"num-rounds": rounds, "contribution": "off", **DEMO_TRAINING, **settings})
    started = time.perf_counter()
    simulate(config, LogReporter(), run_name=run)
    manifests = Checkpoints(ws.run_dir(run)).manifests()
    rounds_done = [m for m in manifests if m["members"]]
    per_member = [(r["bytes_up"] / len(r["members"]), r["bytes_down"] / len(r["members"])) for r in rounds_done]
    later = per_member[1:] or per_member
    return {
        "label": label, "settings": settings, "rounds": len(rounds_done),
        "bytes_up": sum(u for u, _ in per_member) / len(per_member),
        "bytes_down": sum(d for _, d in later) / len(later),
        "bytes_down_all_rounds": sum(d for _, d in per_member) / len(per_member),
        "val_loss": manifests[-1]["val_loss"], "val_loss_round0": manifests[0]["val_loss"],
        "seconds": time.perf_counter() - started,
    }


def summarize(rows: list[dict], secure_flags: list[bool], baseline: int) -> dict:
    reference = rows[0]
    base_loss, ref_loss = _mean(reference["val_loss_round0"]), _mean(reference["val_loss"])
    fall = base_loss - ref_loss
    for row, secure in zip(rows, secure_flags):
        row["secure_compatible"] = secure
        row["gain_kept"] = (base_loss - _mean(row["val_loss"])) / fall if fall > 0 else float("nan")
        row["upload_ratio"] = baseline / row["bytes_up"]
        row["total_ratio"] = 2 * baseline / (row["bytes_up"] + row["bytes_down"])
        row["total_ratio_all_rounds"] = 2 * baseline / (row["bytes_up"] + row["bytes_down_all_rounds"])

    def best(pool: list[dict]) -> dict:
        # the most compressed encoding that keeps >= 95% of the fall; else the one that keeps most
        keeping = [r for r in pool if r["gain_kept"] >= 0.95]
        return max(keeping, key=lambda r: r["total_ratio"]) if keeping else max(pool, key=lambda r: r["gain_kept"])

    secure_best = best([r for r in rows[1:] if r["secure_compatible"]])
    open_best = best([r for r in rows[1:] if r["settings"]["codec"].startswith("topk")])
    return {
        "reference_loss_drop": fall / base_loss,
        "gain_retained_secure_compatible": secure_best["gain_kept"],
        "gain_retained_open": open_best["gain_kept"],
        "upload_ratio_secure_compatible": secure_best["upload_ratio"],
        "upload_ratio_open": open_best["upload_ratio"],
        "total_ratio_secure_compatible": secure_best["total_ratio"],
        "total_ratio_open": open_best["total_ratio"],
        "total_ratio_secure_compatible_all_rounds": secure_best["total_ratio_all_rounds"],
        "best_secure_compatible": secure_best["label"],
        "best_open": open_best["label"],
        "flowertune_message_bytes": baseline,
        "targets": {"reference_loss_drop": ">= 0.10", "gain_retained_secure_compatible": ">= 0.95",
                    "gain_retained_open": ">= 0.95", "upload_ratio_secure_compatible": ">= 50",
                    "upload_ratio_open": ">= 300", "total_ratio_secure_compatible": ">= 50"},
    }


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--rounds", type=int, default=DEMO_ROUNDS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    baseline = flowertune_message_bytes(ws)
    stamp = int(time.time())
    rows = [run_row(ws, label, settings, args.rounds, f"bench-compression-{stamp}-row{i}", console)
            for i, (label, settings, _) in enumerate(ENCODINGS)]
    result = summarize(rows, [secure for *_, secure in ENCODINGS], baseline)

    table = Table(title=f"update encodings, {args.rounds} rounds, {len(ws.members())} members, bytes per member per round")
    for col in ("encoding", "up", "down", "up vs FlowerTune", "up+down vs FlowerTune", "val loss", "gain kept"):
        table.add_column(col, justify="right")
    table.add_row("FlowerTune-style fp32 PEFT state (serialized)", _kb(baseline), _kb(baseline), "1.0x", "1.0x", "", "")
    for row in rows:
        table.add_row(row["label"], _kb(row["bytes_up"]), _kb(row["bytes_down"]), f"{row['upload_ratio']:.1f}x",
                      f"{row['total_ratio']:.1f}x", f"{_mean(row['val_loss']):.4f}", f"{row['gain_kept']:.0%}")
    console.print(table)
    result["rows"] = rows
    result["setup"] = {"rounds": args.rounds, "members": ws.members(), "training": DEMO_TRAINING}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print({k: v for k, v in result.items() if k not in ("rows", "setup", "targets")})
    console.print(f"wrote {args.out}")


def _mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


if __name__ == "__main__":
    main()
