"""Every supported MoE family, end to end: `fedmoe init --from-pretrained` adopts a tiny checkpoint,
two members train one federated round (the real ClientApp through the in-process FakeGrid), the
round changes the trainable state (shared experts' and dense MLPs' adapters by the members'
token-weighted mean), and the release loads with transformers + peft, its merged model equal to it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from aggregation.codec import decode
from aggregation.codec_config import CodecConfig
from client.app import app
from model import families
from model.base import load_base
from model.lora import expert_of, kind_of
from protos.messages import TRAIN, TrainReply
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

    lora = load_base(ws.base).with_lora()
    names = lora.names
    assert any(expert_of(n) for n in names) and {kind_of(n) for n in names} >= {"experts", "attention", "router"}
    shared = {n for n in names if n.endswith(".lora_B") and families.role_of(n) in ("shared_expert", "dense_mlp")}
    assert len(shared) == {"qwen2_moe": 6, "deepseek_v3": 9}.get(family, 0)  # shared experts, DeepSeek's dense layer 0
    config = RunConfig(workspace=str(ws.root), num_rounds=1, local_steps=2, batch_size=4, seq_len=32, eval_batches=1,
                       min_expert_tokens=1, min_members=2, round_timeout=60.0, codec="fp16", contribution="off",
                       update_norm_bound=0.0)  # so the committed change is the plain token-weighted mean
    replies: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}

    def capture(message, context):  # noqa: ANN001, ANN202 - the real ClientApp; its TRAIN replies kept
        reply = app(message, context)
        if message.metadata.message_type == TRAIN and not reply.has_error():
            parsed = TrainReply.from_record(reply.content)
            replies[parsed.member] = (parsed.num_tokens, decode(parsed.update, lora.shapes(), member=parsed.member,
                                                                max_bytes=1 << 28, seed=0, config=CodecConfig.parse("fp16")))
        return reply

    with task_identity():
        run_rounds(FakeGrid(capture, 2), config, LogReporter(), run_name="families")
    checkpoints = Checkpoints(ws.run_dir("families"))
    before, after = checkpoints.load(0), checkpoints.load(1)
    assert after is not None and before is not None and after.round == 1
    changed = {n for n in after.state if not torch.equal(after.state[n], before.state[n])}
    # every MoE layer's routed experts were trained and aggregated (tokens counted in the right layer)
    moe = families.moe_layers(load_base(ws.base).model)
    assert moe == ([1, 2] if family == "deepseek_v3" else [0, 1])
    assert {int(expert_of(n).split(":")[0]) for n in changed if expert_of(n)} == set(moe)
    assert any(kind_of(n) == "attention" for n in changed) and any(kind_of(n) == "router" for n in changed)
    assert shared <= changed
    # the shared adapters moved by the members' token-weighted mean (fedavg, lr 1: exactly), in name order
    assert len(replies) == 2
    total = sum(n for n, _ in replies.values())
    for name in shared:
        mean = sum(delta[name].double() * n for _, (n, delta) in sorted(replies.items())) / total
        assert torch.equal(after.state[name], before.state[name] + mean.float()), name

    release = export_release(ws.base, after.state, tmp_path / "release", round=1)
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(release.path / "base")
        base_logits = plain(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(plain, release.path / "adapter")
        logits = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(release.path / "merged")(input_ids=ids).logits
    assert type(plain).__name__ == FAMILIES[family][1]
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)
    torch.testing.assert_close(merged, logits, atol=1e-4, rtol=1e-4)
    loaded = {n.removeprefix("base_model.model.").replace(".default", "") for n, _ in adapted.named_parameters()}
    assert {f"{n}.weight" for n in shared} <= loaded  # the release's adapter carries every shared adapter
