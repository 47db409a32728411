"""The members' data pipeline (model/quality.py) at equal training tokens: one member's folder with
planted junk, trained alone from the demo base with and without the pipeline, scored on the
member's validation set.

The folder holds the demo member's own documents plus planted junk, about as many characters as
the real text: random bytes, base64 blobs, a boilerplate notice copied into many files, spam that
repeats one phrase, and near copies of real documents (a few words touched). Rows:
- raw: every document as read;
- pipeline: duplicates and junk dropped (curriculum off);
- pipeline + curriculum: the same, and the local steps split into three phases that open the
  difficulty levels easy to hard (what three rounds of the curriculum would train on).
Every row trains the same number of steps of the same batch shape (equal training tokens) with
the production trainer (`client/trainer.py`) and its labels. Writes bench/results/data.json:
`ppl_gain_pipeline` (1 - ppl(pipeline) / ppl(raw), target >= 0.05), the other rows' gains, what
the pipeline dropped (counted from its report), and the keys of the issue this benchmark does
not measure yet as null with the reason.
Run: `.venv/bin/python bench/data.py [--member legal] [--steps 150]` (~3 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.node import base_losses
from client.trainer import TrainConfig, train_local
from model.base import load_base
from model.chatter import silence_library_chatter
from model.member_data import read_documents
from model.precision import select_precision
from model.quality import QualityReport, clean, grade
from model.tokenizer import pack_documents
from server.config import RunConfig
from server.evaluation import evaluate, validation_sets
from server.init import InitConfig, init_workspace
from server.workspace import Workspace

RESULTS = Path(__file__).parent / "results" / "data.json"
LEVELS = 3


def plant(folder: Path, texts: list[str], seed: int) -> dict[str, int]:
    """Junk files next to the member's real text, about as many characters in all: kind -> files."""
    rng = random.Random(seed)
    budget = sum(len(t) for t in texts)
    kinds = {"random": 0, "base64": 0, "boilerplate": 0, "spam": 0, "near_copy": 0}
    notice = ("This file is generated automatically by the build system. Do not edit it by hand. "
              "Copyright the project authors. All rights reserved.\n") * 3
    written = 0
    while written < budget:
        kind = list(kinds)[sum(kinds.values()) % len(kinds)]  # each kind in turn
        if kind == "random":
            text = "".join(chr(rng.randrange(0x21, 0x2FF)) for _ in range(3000))
        elif kind == "base64":
            text = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(3000))
        elif kind == "boilerplate":
            text = notice
        elif kind == "spam":
            text = "limited offer click here to win " * 80
        else:
            words = rng.choice(texts).split()
            text = " ".join(w + "s" if rng.random() < 0.01 else w for w in words)
        (folder / f"zz_junk_{kind}_{kinds[kind]:04d}.txt").write_text(text)  # after the real files
        kinds[kind] += 1
        written += len(text)
    return kinds


def train_row(label: str, ws: Workspace, blocks_by_phase: list[tuple], steps: int, cfg: RunConfig, console: Console) -> dict:
    base = load_base(ws.base)
    lora = base.with_lora()
    val = validation_sets(ws, base, cfg)
    state = lora.get_state()
    precision = select_precision(cfg.precision)
    began = time.perf_counter()
    phase_steps = [steps // len(blocks_by_phase)] * len(blocks_by_phase)
    phase_steps[-1] += steps - sum(phase_steps)
    tokens = 0
    for phase, ((blocks, labels), n) in enumerate(zip(blocks_by_phase, phase_steps, strict=True)):
        result = train_local(lora, state, blocks, TrainConfig(local_steps=n, batch_size=cfg.batch_size, lr=0.003,
                                                               optimizer="adamw", seed=phase, min_expert_tokens=0),
                             precision, labels=labels)
        state = {k: v + result.delta.get(k, 0) for k, v in state.items()}
        tokens += result.num_tokens
    lora.set_state(state)
    losses = evaluate(lora, val, cfg)
    console.print(f"{label}: {tokens:,} training tokens, validation loss {losses}")
    return {"training_tokens": tokens, "val_loss": losses, "seconds": time.perf_counter() - began}


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--member", default="legal")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    cfg = RunConfig.from_user_config({"workspace": str(ws.root)})
    base = load_base(ws.base)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.member
        shutil.copytree(ws.members_dir / args.member, folder)
        real = [d.text for d in read_documents(folder) if d.text]
        planted = plant(folder, real, seed=0)
        docs = read_documents(folder)
        report = QualityReport()
        kept = clean(docs, report)
    junk_files = sum(planted.values())
    junk_dropped = sum(1 for source, per in report.files.items() if "junk_" in source and per["kept"] == 0)
    console.print(f"{len(docs)} documents ({junk_files} planted junk files); the pipeline kept {len(kept)}, "
                  f"dropped {junk_dropped} of the junk files and {report.dropped() - junk_dropped} real documents")
    lora = base.with_lora()
    levels = grade(base_losses(lora, base, kept, cfg.seq_len), LEVELS)
    phases = [[d for d, g in zip(kept, levels, strict=True) if g < opened] for opened in range(1, LEVELS + 1)]
    arms = {
        "raw": [pack_documents(base.tokenizer, docs, cfg.seq_len)],
        "pipeline": [pack_documents(base.tokenizer, kept, cfg.seq_len)],
        "pipeline + curriculum": [pack_documents(base.tokenizer, p, cfg.seq_len) for p in phases],
    }
    rows = {label: train_row(label, ws, blocks, args.steps, cfg, console) for label, blocks in arms.items()}
    raw = rows["raw"]["val_loss"][args.member]
    table = Table(title=f"member {args.member!r} alone, {args.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens each row")
    for col in ("data", "training tokens", f"{args.member} val ppl", "ppl gain vs raw", "time vs raw"):
        table.add_column(col, justify="right")
    for label, row in rows.items():
        loss = row["val_loss"][args.member]
        row["ppl_gain_vs_raw"] = 1 - math.exp(loss - raw)
        table.add_row(label, f"{row['training_tokens']:,}", f"{math.exp(loss):.2f}", f"{row['ppl_gain_vs_raw']:+.1%}",
                      f"{row['seconds'] / rows['raw']['seconds']:.2f}")
    console.print(table)
    not_built = "not measured: the quantized base (issue 16 item 4) is not built yet"
    result = {
        "ppl_gain_pipeline": rows["pipeline"]["ppl_gain_vs_raw"],
        "ppl_gain_pipeline_curriculum": rows["pipeline + curriculum"]["ppl_gain_vs_raw"],
        "targets": {"ppl_gain_pipeline": 0.05, "base_memory_ratio_int8": 0.55, "ppl_rel_diff_int8": 0.02,
                    "families_supported": 5},
        "base_memory_ratio_int8": None, "ppl_rel_diff_int8": None, "int8": not_built,
        "member": args.member, "steps": args.steps, "planted_junk_files": planted,
        "documents": len(docs), "kept": len(kept), "junk_files_dropped": junk_dropped,
        "real_documents_dropped": report.dropped() - junk_dropped, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # keep what other parts of this benchmark wrote (families_supported)
        result = {**json.loads(args.out.read_text()), **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
