"""A member whose folder holds instruction pairs, chat and a CSV table next to plain notes trains a
federated round with the others (on main such a folder was refused whole: 'line 1 has no "text" field')."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
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


def test_the_data_pipeline_drops_junk_reports_it_and_opens_harder_levels_over_the_rounds(ws: Workspace) -> None:
    from client.node import QUALITY_REPORT, Node, base_losses, load_member_model, member_blocks
    from model.member_data import read_documents
    from model.quality import clean, grade
    from model.tokenizer import pack_documents
    from model.base import load_base

    folder = ws.members_dir / "code"
    texts = [json.loads(line)["text"] for line in (folder / "train.jsonl").read_text().splitlines()]
    (folder / "zz_copy.txt").write_text(texts[5])
    (folder / "zz_blob.txt").write_text("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3" * 60)
    sha = load_base(ws.base).sha256
    base, lora = load_member_model(ws.base, sha)
    plain = Node("code", folder, ws.root / "nodes" / "plain", ws.base)
    piped = Node("code", folder, ws.root / "nodes" / "piped", ws.base, data_pipeline=True, curriculum_levels=3)
    everything, _ = member_blocks(plain, base, 64, lora, 1)
    easy, easy_labels = member_blocks(piped, base, 64, lora, 1)
    report = json.loads((piped.state_dir / QUALITY_REPORT).read_text())["files"]
    assert report[str(folder / "zz_copy.txt")] == {"read": 1, "kept": 0, "exact duplicate": 1}
    assert report[str(folder / "zz_blob.txt")] == {"read": 1, "kept": 0, "random bytes": 1}
    middle, _ = member_blocks(piped, base, 64, lora, 3)
    hard, _ = member_blocks(piped, base, 64, lora, 5)
    assert easy.shape[0] < middle.shape[0] < hard.shape[0] < everything.shape[0]
    # round 1 trains exactly the third of the kept documents the frozen base finds easiest
    kept = clean(read_documents(folder))
    losses = base_losses(lora, base, kept, 64)
    levels = grade(losses, 3)
    assert torch.equal(easy, pack_documents(base.tokenizer, [d for d, g in zip(kept, levels) if g == 0], 64)[0])
    mean = [sum(x for x, g in zip(losses, levels) if g == level) / levels.count(level) for level in range(3)]
    assert mean[0] < mean[1] < mean[2]
    again, again_labels = member_blocks(Node("code", folder, ws.root / "nodes" / "again", ws.base, data_pipeline=True,
                                             curriculum_levels=3), base, 64, lora, 1)
    assert torch.equal(again, easy) and torch.equal(again_labels, easy_labels)  # deterministic


def test_node_config_sets_the_pipeline_and_refuses_bad_values(tmp_path) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from client.node import Node

    hints = SimpleNamespace(base_path=str(tmp_path), members_dir=str(tmp_path), nodes_dir=str(tmp_path))
    node = Node.from_node_config({"data-path": str(tmp_path / "d"), "data-pipeline": "on", "curriculum-levels": "4",
                                  "data-column": "body"}, hints)
    assert (node.data_pipeline, node.curriculum_levels, node.data_column) == (True, 4, "body")
    assert Node.from_node_config({"data-path": str(tmp_path / "d")}, hints).data_pipeline is False
    for bad in ({"data-pipeline": "yes"}, {"curriculum-levels": "0"}, {"curriculum-levels": "x"}):
        with pytest.raises(ValueError, match="data-pipeline"):
            Node.from_node_config({"data-path": str(tmp_path / "d"), **bad}, hints)
