from __future__ import annotations

import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.workspace import Workspace
from model.base import load_base
from server.init import init_workspace
from conftest import TINY_INIT


def test_init_builds_a_loadable_base_and_from_pretrained_adopts_an_hf_checkpoint(tiny_workspace, tmp_path) -> None:
    # the demo base is a plain HF directory
    model = AutoModelForCausalLM.from_pretrained(tiny_workspace.base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_workspace.base)
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    assert model.config.num_local_experts == TINY_INIT.model.num_experts
    # a real operator's checkpoint directory becomes the base as it is, plus the frozen LoRA init
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_workspace.corpora, ws.corpora)
    init_workspace(ws, TINY_INIT, from_pretrained=checkpoint, log=lambda _: None)
    base = load_base(ws.base)
    with torch.no_grad():
        torch.testing.assert_close(base.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert base.with_lora().trainable_fraction() > 0


def test_from_pretrained_refuses_a_dense_checkpoint_up_front_in_one_line(tiny_workspace, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.families import UnsupportedModel

    checkpoint = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(tiny_workspace.base).save_pretrained(checkpoint)
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tiny_workspace.corpora, ws.corpora)
    try:
        init_workspace(ws, TINY_INIT, from_pretrained=checkpoint, log=lambda _: None)
    except UnsupportedModel as exc:
        message = str(exc)
    else:
        raise AssertionError("a dense Llama checkpoint was adopted as an MoE base")
    assert message == (
        "LlamaForCausalLM: no routed experts (none of num_local_experts, num_experts, n_routed_experts in its config)"
    )
    assert "\n" not in message and not ws.base.exists()
