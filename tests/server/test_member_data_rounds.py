"""A member whose folder holds instruction pairs, chat and a CSV table next to plain notes trains a
federated round with the others (on main such a folder was refused whole: 'line 1 has no "text" field')."""

from __future__ import annotations

import csv
import json
import shutil

import torch

from client.app import app
from model.io import load_tensors
from model.tokenizer import IGNORE
from server.config import RunConfig
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace

from fake_grid import FakeGrid, task_identity


def test_a_member_with_instruction_chat_and_csv_data_trains_a_round_on_its_answers(ws: Workspace) -> None:
    member = "legal"
    folder = ws.members_dir / member
    texts = [json.loads(line)["text"] for line in (folder / "train.jsonl").read_text().splitlines()]
    shutil.rmtree(folder)
    folder.mkdir()
    paragraphs = [p for t in texts for p in t.split("\n\n") if len(p) > 80]
    with (folder / "pairs.jsonl").open("w") as f:
        for p in paragraphs[0::3]:
            f.write(json.dumps({"instruction": "Continue this licence text.", "input": p[:60], "output": p[60:]}) + "\n")
    with (folder / "chat.jsonl").open("w") as f:
        for p in paragraphs[1::3]:
            f.write(json.dumps({"messages": [{"role": "user", "content": "Quote a licence clause."},
                                             {"role": "assistant", "content": p}]}) + "\n")
    with (folder / "clauses.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["text"], *([p] for p in paragraphs[2::3])])
    (folder / "notes.txt").write_text(texts[0])

    config = RunConfig(workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=64, eval_batches=1,
                       min_expert_tokens=8, min_members=2, round_timeout=60.0, codec="fp16", contribution="off")
    with task_identity():
        [summary] = run_rounds(FakeGrid(app, len(ws.members())), config, LogReporter(), run_name="formats")
    assert summary.rejected == {}
    assert member in {r.member for r in summary.members}
    [cache] = (ws.root / "nodes" / member).glob("tokens-64-*.safetensors")
    cached = load_tensors(cache)
    blocks, labels = cached["blocks"], cached["labels"]
    ignored = labels == IGNORE
    assert 0.05 < float(ignored.float().mean()) < 0.9  # prompts and templates masked, answers and notes trained
    assert torch.equal(labels[~ignored], blocks[~ignored])
