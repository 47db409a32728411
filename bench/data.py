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
the pipeline dropped (counted from its report).

`--part int8` (model/quantize.py): the frozen base held in bf16 vs int8 (and nf4). Memory, each arm
in its own process: the frozen weights' bytes counted tensor by tensor (`base_memory_ratio_int8`,
target <= 0.55), the process's resident memory before training and its peak while training
(sampled every 5 ms), and tokens/s, on a base with a real MoE's proportions (experts most of the
weights; built at random, no training needed to weigh it). Quality, in this process: the same
member trains the same steps from the demo base with its frozen weights in bf16 and in int8,
scored on its validation set (`ppl_rel_diff_int8` = |ppl(int8) / ppl(bf16) - 1|, target <= 0.02).

`--part families`: a tiny checkpoint of each supported MoE family is adopted by `fedmoe init
--from-pretrained`, two members train one federated round (the real ClientApp through the test
suite's in-process grid), every MoE layer's experts and every shared expert's and dense MLP's
adapter change, and the release loads with transformers + peft, carries those adapters and changes
the logits (`families_supported`, target >= 5).
Run: `.venv/bin/python bench/data.py [--part all|pipeline|int8|families] [--member legal] [--steps 150]`
(~3 min per part on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from rich.console import Console
from rich.table import Table

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the project first: bench/privacy.py would shadow the privacy package

from client.node import base_losses
from client.trainer import TrainConfig, train_local
from model.base import load_base
from model.chatter import silence_library_chatter
from model.lora import LoraMoE, LoraSpec
from model.member_data import read_documents
from model.moe import MoEConfig, build_model
from model.precision import select_precision
from model.quality import QualityReport, clean, grade
from model.quantize import base_weight_bytes, quantize_base
from model.tokenizer import pack_documents
from server.config import RunConfig
from server.evaluation import evaluate, validation_sets
from server.init import InitConfig, init_workspace
from server.workspace import Workspace

RESULTS = Path(__file__).parent / "results" / "data.json"
TESTS = Path(__file__).parents[1] / "tests"
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


def train_row(label: str, ws: Workspace, blocks_by_phase: list[tuple], steps: int, cfg: RunConfig, console: Console,
              quantization: str = "none") -> dict:
    base = load_base(ws.base)
    lora = base.with_lora()
    quantize_base(lora.model, quantization)
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


def pipeline_part(args: argparse.Namespace, ws: Workspace, cfg: RunConfig, console: Console) -> dict:
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
    return {
        "ppl_gain_pipeline": rows["pipeline"]["ppl_gain_vs_raw"],
        "ppl_gain_pipeline_curriculum": rows["pipeline + curriculum"]["ppl_gain_vs_raw"],
        "member": args.member, "steps": args.steps, "planted_junk_files": planted,
        "documents": len(docs), "kept": len(kept), "junk_files_dropped": junk_dropped,
        "real_documents_dropped": report.dropped() - junk_dropped, "rows": rows,
    }


# a base with a real MoE's proportions (OLMoE, Mixtral: the experts hold ~90% of the weights)
MEMORY_MODEL = MoEConfig(vocab_size=8192, hidden_size=384, intermediate_size=768, num_layers=6, num_heads=6,
                         num_kv_heads=2, num_experts=16, top_k=2)


def memory_arm(mode: str, steps: int) -> dict:
    """One arm of the memory measurement, in its own process: the base built in bf16 (never in
    fp32), the LoRA attached, the frozen base left in bf16 or quantized, then `steps` training steps."""
    process = psutil.Process()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = build_model(MEMORY_MODEL)
    torch.set_default_dtype(torch.float32)
    spec = LoraSpec(train_head=True)
    lora = LoraMoE(model, spec, LoraMoE.make_lora_init(model, spec, seed=0))
    quantize_base(lora.model, mode if mode != "bf16" else "none")
    gc.collect()
    weights = base_weight_bytes(lora.model)
    rss_before = process.memory_info().rss
    peak = [rss_before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    blocks = torch.randint(0, MEMORY_MODEL.vocab_size, (64, 128), generator=torch.Generator().manual_seed(0))
    result = train_local(lora, lora.get_state(), blocks, TrainConfig(local_steps=steps, batch_size=4, lr=1e-3, seed=0,
                                                                      min_expert_tokens=0), select_precision("auto"))
    done.set()
    sampler.join()
    return {"base_weight_bytes": weights, "rss_before_training": rss_before, "rss_peak_training": peak[0],
            "tokens_per_s": result.num_tokens / result.seconds, "tokens": result.num_tokens, "train_loss": result.train_loss}


def int8_part(args: argparse.Namespace, ws: Workspace, cfg: RunConfig, console: Console) -> dict:
    arms = {}
    for mode in ("bf16", "int8", "nf4"):
        out = subprocess.run([sys.executable, __file__, "--memory-arm", mode, "--memory-steps", str(args.memory_steps)],
                             capture_output=True, text=True, check=True)
        arms[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        console.print(f"memory arm {mode}: {arms[mode]}")
    base = load_base(ws.base)
    blocks = [pack_documents(base.tokenizer, read_documents(ws.members_dir / args.member), cfg.seq_len)]
    quality = {mode: train_row(f"{args.member}, {mode} base", ws, blocks, args.steps, cfg, console, quantization=q)
               for mode, q in (("bf16", "none"), ("int8", "int8"), ("nf4", "nf4"))}
    ppl = {mode: math.exp(row["val_loss"][args.member]) for mode, row in quality.items()}
    bf16 = arms["bf16"]
    table = Table(title=f"frozen base in bf16 vs quantized: memory ({MEMORY_MODEL.num_layers} layers x "
                        f"{MEMORY_MODEL.num_experts} experts, {args.memory_steps} steps), quality ({args.member}, {args.steps} steps)")
    for col in ("base", "weight bytes", "vs bf16", "RSS peak training", "vs bf16", "tokens/s vs bf16",
                f"{args.member} val ppl", "vs bf16"):
        table.add_column(col, justify="right")
    for mode, arm in arms.items():
        table.add_row(mode, f"{arm['base_weight_bytes'] / 2**20:.1f} MiB", f"{arm['base_weight_bytes'] / bf16['base_weight_bytes']:.3f}",
                      f"{arm['rss_peak_training'] / 2**20:.0f} MiB", f"{arm['rss_peak_training'] / bf16['rss_peak_training']:.3f}",
                      f"{arm['tokens_per_s'] / bf16['tokens_per_s']:.2f}", f"{ppl[mode]:.2f}", f"{ppl[mode] / ppl['bf16']:.4f}")
    console.print(table)
    return {
        "base_memory_ratio_int8": arms["int8"]["base_weight_bytes"] / bf16["base_weight_bytes"],
        "base_memory_ratio_nf4": arms["nf4"]["base_weight_bytes"] / bf16["base_weight_bytes"],
        "ppl_rel_diff_int8": abs(ppl["int8"] / ppl["bf16"] - 1),
        "ppl_rel_diff_nf4": abs(ppl["nf4"] / ppl["bf16"] - 1),
        "rss_peak_ratio_int8": arms["int8"]["rss_peak_training"] / bf16["rss_peak_training"],
        "tokens_per_s_ratio_int8": arms["int8"]["tokens_per_s"] / bf16["tokens_per_s"],
        "int8": {"memory_model": MEMORY_MODEL.as_dict(), "memory_steps": args.memory_steps, "memory_arms": arms,
                 "quality_member": args.member, "quality_steps": args.steps, "quality_ppl": ppl,
                 "quality_rows": quality,
                 "bf16_quality_arm": "the frozen weights stored fp32 and run under bf16 autocast (what a member runs by "
                                     "default); the int8 and nf4 arms dequantize to fp32 under the same autocast"},
    }


def families_part(args: argparse.Namespace, ws: Workspace, cfg: RunConfig, console: Console) -> dict:
    sys.path[:0] = [str(TESTS / "model"), str(TESTS / "server"), str(TESTS)]
    from family_configs import FAMILIES, tiny_config  # the test suite's tiny checkpoints, one per family
    from fake_grid import FakeGrid, task_identity  # the real ClientApp, messages passed in process
    from conftest import TINY_INIT

    outcome = {}
    for family in sorted(FAMILIES):
        began = time.perf_counter()
        try:
            check_family(family, ws, FAMILIES, tiny_config, FakeGrid, task_identity, TINY_INIT)
            outcome[family] = "passed"
        except Exception as exc:  # noqa: BLE001 - a benchmark row records what failed and goes on
            outcome[family] = f"failed: {type(exc).__name__}: {exc}"
        console.print(f"{family}: {outcome[family]} ({time.perf_counter() - began:.1f} s)")
    return {"families_supported": sum(v == "passed" for v in outcome.values()), "families": outcome}


def check_family(family: str, demo: Workspace, configs: dict, tiny_config, FakeGrid, task_identity, init) -> None:  # noqa: ANN001, N803
    """Adopt a tiny checkpoint, train one round with two members, release, load the release."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.app import app
    from model import families
    from model.lora import expert_of
    from server.checkpoint import Checkpoints
    from server.release import export_release
    from server.rounds import run_rounds
    from server.summary import LogReporter

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(demo.base)
        torch.manual_seed(0)
        checkpoint = Path(tmp) / "checkpoint"
        AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tokenizer))).save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        ws = Workspace(Path(tmp) / "ws")
        shutil.copytree(demo.corpora, ws.corpora)
        init_workspace(ws, init, from_pretrained=checkpoint, log=lambda _: None)
        config = RunConfig(workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=32,
                           eval_batches=1, min_expert_tokens=1, min_members=2, round_timeout=120.0, codec="fp16",
                           contribution="off")
        with task_identity():
            run_rounds(FakeGrid(app, 2), config, LogReporter(), run_name="families")
        checkpoints = Checkpoints(ws.run_dir("families"))
        before, after = checkpoints.load(0), checkpoints.load(1)
        if before is None or after is None:
            raise RuntimeError("round 1 was not committed")
        changed = {n for n in after.state if not torch.equal(after.state[n], before.state[n])}
        trained = {int(expert_of(n).split(":")[0]) for n in changed if expert_of(n)}
        moe = families.moe_layers(load_base(ws.base).model)
        if trained != set(moe):
            raise RuntimeError(f"experts changed in layers {sorted(trained)}, MoE layers are {moe}")
        shared = {f"{n.removesuffix('.weight')}.lora_B" for n, _ in load_base(ws.base).model.named_parameters()
                  if re.search(r"\.mlp\.(shared_experts?\.)?(gate|up|down)_proj\.weight$", n)}
        if shared - changed:
            raise RuntimeError(f"{len(shared - changed)} shared-expert or dense-MLP adapters did not change, "
                               f"first: {sorted(shared - changed)[0]}")
        release = export_release(ws.base, after.state, Path(tmp) / "release", round=1)
        ids = torch.randint(0, len(tokenizer), (1, 8))
        with torch.no_grad():
            plain = AutoModelForCausalLM.from_pretrained(release.path / "base")
            base_logits = plain(input_ids=ids).logits
            adapted = PeftModel.from_pretrained(plain, release.path / "adapter")
            logits = adapted(input_ids=ids).logits
        loaded = {n.removeprefix("base_model.model.").replace(".default.weight", "") for n, _ in adapted.named_parameters()}
        if type(plain).__name__ != configs[family][1] or not torch.isfinite(logits).all() \
                or torch.allclose(logits, base_logits) or shared - loaded:
            raise RuntimeError("the release does not load as the family's model with a working adapter")


PARTS = {"pipeline": pipeline_part, "int8": int8_part, "families": families_part}


def main() -> None:
    silence_library_chatter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".fedmoe/demo"))
    parser.add_argument("--part", choices=["all", *PARTS], default="all")
    parser.add_argument("--member", default="legal")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--memory-arm", choices=["bf16", "int8", "nf4"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.memory_arm:
        print(json.dumps(memory_arm(args.memory_arm, args.memory_steps)))
        return
    console = Console(width=max(Console().width, 140))  # the tables stay readable in a log
    ws = Workspace(args.workspace.resolve())
    init_workspace(ws, InitConfig(), log=console.print)
    cfg = RunConfig.from_user_config({"workspace": str(ws.root)})
    result: dict = {"targets": {"ppl_gain_pipeline": 0.05, "base_memory_ratio_int8": 0.55, "ppl_rel_diff_int8": 0.02,
                                "families_supported": 5}}
    for name, part in PARTS.items():
        if args.part in ("all", name):
            result.update(part(args, ws, cfg, console))
            result[f"commit_{name}"] = commit()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # keep what the parts not run this time wrote
        result = {**json.loads(args.out.read_text()), **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return out.stdout.strip()


if __name__ == "__main__":
    main()
