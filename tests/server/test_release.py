"""The release loads as transformers + peft expect, with the output-head adapter untied on merge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from model.base import MANIFEST, BaseModelError, load_base, save_base
from server.release import export_release


@pytest.fixture()
def head_base(tiny_base_path: Path, tmp_path: Path) -> Path:
    """The tiny base saved again with the output-head adapter on (as `fedmoe init` builds bases)."""
    base = load_base(tiny_base_path)
    path = tmp_path / "head-base"
    save_base(path, base.model, base.tokenizer, dataclasses.replace(base.spec, train_head=True), seed=0)
    return path


def _trained_state(base_path: Path) -> dict[str, torch.Tensor]:
    lora = load_base(base_path).with_lora()
    generator = torch.Generator().manual_seed(3)
    return {name: torch.randn(v.shape, generator=generator) * 0.05 + v for name, v in lora.get_state().items()}


def test_head_adapter_is_part_of_the_trainable_state(head_base: Path, tiny_base_path: Path) -> None:
    lora = load_base(head_base).with_lora()
    vocab = lora.model.config.vocab_size
    assert lora.shapes()["lm_head.lora_B"] == (vocab, lora.spec.rank)
    # adding the head adapter leaves every other adapter's frozen A as it was
    plain = load_base(tiny_base_path)
    for name, a in plain.lora_init.items():
        assert torch.equal(load_base(head_base).lora_init[name], a), name


def test_merged_release_equals_adapter_and_keeps_the_input_embedding(head_base: Path, tmp_path: Path) -> None:
    state = _trained_state(head_base)
    assert "lm_head.lora_B" in state
    release = export_release(head_base, state, tmp_path / "release", round=1)
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(release.path / "base")
        embedding = plain.get_input_embeddings().weight.clone()
        adapted = PeftModel.from_pretrained(plain, release.path / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(release.path / "merged")
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        # the head's LoRA moved the output side only: the merged input embedding is the base's
        torch.testing.assert_close(merged.get_input_embeddings().weight, embedding)
        assert not torch.equal(merged.get_output_embeddings().weight, embedding)


def test_a_base_from_before_the_head_adapter_still_loads_without_it(head_base: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old-base"
    shutil.copytree(head_base, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["lora"]["train_head"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert "lm_head.lora_B" not in load_base(old).with_lora().names

    manifest["lora"]["rank_typo"] = 4
    (old / MANIFEST).write_text(json.dumps(manifest))
    try:
        load_base(old)
    except BaseModelError as exc:
        assert "rank_typo" in str(exc)
    else:
        raise AssertionError("an unknown LoRA setting was accepted")
