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


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_a_release_carries_the_shared_mlp_adapters_and_its_merged_model_equals_the_adapted_one(
    family: str, tiny_base_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from model.families import role_of
    from model.lora import LoraSpec, SHARED_MLP_PARAMETERS

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "model"))
    from family_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=64))
    base_path = tmp_path / "base"
    save_base(base_path, model, AutoTokenizer.from_pretrained(tiny_base_path),
              LoraSpec(rank=4, alpha=8, train_shared_mlp=True), seed=0)
    state = _trained_state(base_path)
    lora = load_base(base_path).with_lora()
    lora.set_state(state)
    shared = {n for n in state if n.endswith(".lora_B") and role_of(n) in ("shared_expert", "dense_mlp")}
    assert len(shared) == (6 if family == "qwen2_moe" else 9)
    release = export_release(base_path, state, tmp_path / "release", round=1)

    config = json.loads((release.path / "adapter" / "adapter_config.json").read_text())
    owner = "shared_expert." if family == "qwen2_moe" else "shared_experts."
    assert {t for t in config["target_parameters"] if t in SHARED_MLP_PARAMETERS} == (
        {f"mlp.{owner}{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        | ({f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")} if family == "deepseek_v3" else set()))
    assert not {"gate_proj", "up_proj", "down_proj"} & set(config["target_modules"])
    with safe_open(str(release.path / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
        for name in shared:  # B as trained, A beside it
            key = f"base_model.model.{name}.weight"
            assert torch.equal(saved.get_tensor(key), state[name]), key
            assert key.replace(".lora_B.", ".lora_A.") in keys
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        lora.model.eval()
        trained = lora.model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(release.path / "base")
        layer = "model.layers.1.mlp.shared_expert" if family == "qwen2_moe" else "model.layers.1.mlp.shared_experts"
        frozen = plain.get_submodule(f"{layer}.up_proj").weight.clone()
        adapted = PeftModel.from_pretrained(plain, release.path / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(release.path / "merged")
        loaded = adapted(input_ids=ids).logits
        torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)  # the adapter is the trained state
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded, atol=1e-4, rtol=1e-4)
        assert not torch.equal(merged.get_submodule(f"{layer}.up_proj").weight, frozen)  # its adapter was merged in


# ---------------------------------------------------------------- where a release may be written


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_export_refuses_a_folder_that_is_not_a_release(tiny_base_path: Path, tmp_path: Path) -> None:
    from server.release import ReleaseError

    state = load_base(tiny_base_path).with_lora().get_state()
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("a user's notes\n")
    with pytest.raises(ReleaseError) as refused:
        export_release(tiny_base_path, state, notes, round=1)
    message = str(refused.value)
    assert "\n" not in message and str(notes) in message and "not a fedmoe release" in message
    assert _tree(notes) == {"notes.txt": b"a user's notes\n"} and _siblings(notes) == []

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    with pytest.raises(ReleaseError, match="not a folder"):
        export_release(tiny_base_path, state, a_file, round=1)
    assert a_file.read_text() == "keep me"


def test_export_refuses_a_release_holding_a_file_it_does_not_list(tiny_base_path: Path, tmp_path: Path) -> None:
    from server.release import ReleaseError

    state = load_base(tiny_base_path).with_lora().get_state()
    out = tmp_path / "release"
    export_release(tiny_base_path, state, out, round=1)
    (out / "adapter" / "my-eval.txt").write_text("results")
    before = _tree(out)
    with pytest.raises(ReleaseError, match="adapter/my-eval.txt"):
        export_release(tiny_base_path, state, out, round=2)
    assert _tree(out) == before


def test_export_replaces_a_release_and_a_failed_write_keeps_the_old_one(
    tiny_base_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import server.release as release_module
    from server.release import ReleaseError

    state = load_base(tiny_base_path).with_lora().get_state()
    out = tmp_path / "release"
    (out).mkdir()  # an empty folder takes a release: nothing in it to lose
    export_release(tiny_base_path, state, out, round=1)
    old = _tree(out)

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(release_module, "atomic_write_json", disk_full)  # release.json is written last
        with pytest.raises(ReleaseError) as failed:
            export_release(tiny_base_path, state, out, round=2)
    message = str(failed.value)
    assert "\n" not in message and str(out) in message and "No space left on device" in message
    assert "unchanged" in message
    assert _tree(out) == old and _siblings(out) == []  # the old release, whole; no staging left

    export_release(tiny_base_path, state, out, round=2)
    assert json.loads((out / "release.json").read_text())["round"] == 2 and _siblings(out) == []


def test_a_crash_between_the_fallback_renames_leaves_the_old_release_restorable(
    tiny_base_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without an atomic exchange the old release is renamed aside first; a crash right after
    must not lose it: the next export puts it back before anything else."""
    import server.release as release_module

    state = load_base(tiny_base_path).with_lora().get_state()
    out = tmp_path / "release"
    export_release(tiny_base_path, state, out, round=1)
    old = _tree(out)

    class Killed(BaseException):
        pass

    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self.name.endswith(".staging"):
            raise Killed  # the process dies between the two renames
        return real_rename(self, target)

    monkeypatch.setattr(release_module, "_exchange", lambda a, b: False)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", rename)
        with pytest.raises(Killed):
            export_release(tiny_base_path, state, out, round=2)
    assert not out.exists()  # the crash left it aside
    release_module._restore_interrupted_swap(out)
    assert _tree(out) == old
    export_release(tiny_base_path, state, out, round=2)
    assert json.loads((out / "release.json").read_text())["round"] == 2
    assert _siblings(out) == []


def test_cli_export_refuses_a_users_folder_with_one_line(ws, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from fedmoe.cli import app
    from server.checkpoint import Checkpoints

    Checkpoints(ws.run_dir("default")).commit(0, load_base(ws.base).with_lora().get_state(), {"val_loss": {}})
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("a user's notes\n")
    result = CliRunner().invoke(app, ["export", "--workspace", str(ws.root), "--out", str(notes)], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(notes) in lines[0], result.output
    assert _tree(notes) == {"notes.txt": b"a user's notes\n"}
