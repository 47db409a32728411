"""Every supported MoE family, end to end: `fedmoe init --from-pretrained` adopts a tiny checkpoint,
two members train one federated round (the real ClientApp through the in-process FakeGrid), the
round changes the trainable state, and the release loads with transformers + peft."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.app import app
from model import families
from model.base import load_base
from model.lora import expert_of, kind_of
from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.init import init_workspace
from server.release import export_release
from server.rounds import run_rounds
from server.summary import LogReporter
from server.workspace import Workspace
from conftest import TINY_INIT

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from family_configs import FAMILIES, tiny_config  # noqa: E402
from fake_grid import FakeGrid, task_identity  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_tiny_checkpoint_of_each_family_trains_one_round_and_releases(family: str, tiny_workspace: Workspace,
                                                                        tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_workspace.base)
    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint"
    AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tokenizer))).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_workspace.corpora, ws.corpora)
    init_workspace(ws, TINY_INIT, from_pretrained=checkpoint, log=lambda _: None)

    names = load_base(ws.base).with_lora().names
    assert any(expert_of(n) for n in names) and {kind_of(n) for n in names} >= {"experts", "attention", "router"}
    config = RunConfig(workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=32, eval_batches=1,
                       min_expert_tokens=1, min_members=2, round_timeout=60.0, codec="fp16", contribution="off")
    with task_identity():
        run_rounds(FakeGrid(app, 2), config, LogReporter(), run_name="families")
    checkpoints = Checkpoints(ws.run_dir("families"))
    before, after = checkpoints.load(0), checkpoints.load(1)
    assert after is not None and before is not None and after.round == 1
    changed = {n for n in after.state if not torch.equal(after.state[n], before.state[n])}
    # every MoE layer's routed experts were trained and aggregated (tokens counted in the right layer)
    moe = families.moe_layers(load_base(ws.base).model)
    assert moe == ([1, 2] if family == "deepseek_v3" else [0, 1])
    assert {int(expert_of(n).split(":")[0]) for n in changed if expert_of(n)} == set(moe)
    assert any(kind_of(n) == "attention" for n in changed) and any(kind_of(n) == "router" for n in changed)

    release = export_release(ws.base, after.state, tmp_path / "release", round=1)
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(release.path / "base")
        base_logits = plain(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(plain, release.path / "adapter")
        logits = adapted(input_ids=ids).logits
    assert type(plain).__name__ == FAMILIES[family][1]
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)
