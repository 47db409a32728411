"""Releases: a committed round's trainable state written as files transformers and peft load.

    <release>/base/      the frozen base (HF directory: config, safetensors, tokenizer)
    <release>/adapter/   PEFT adapter: LoRA A and B + the trained router (modules_to_save)
    <release>/merged/    base with the adapter merged in (plain `AutoModelForCausalLM`)
    <release>/release.json   round, validation losses, sha256 of every file, and the sha256 of
                             the trainable state it was made from (as server/checkpoint.py
                             commits it: the hub re-exports a folder that is not this round's)

    model = AutoModelForCausalLM.from_pretrained("<release>/base")
    model = PeftModel.from_pretrained(model, "<release>/adapter")
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from model.base import LORA_INIT, MANIFEST, load_base
from model.io import atomic_write_json, sha256_file, tensors_to_bytes


def _merge(model: torch.nn.Module) -> torch.nn.Module:
    """The adapter merged into the base; an adapted output head is untied from the embedding first
    (its LoRA changes only the output side, model/lora.py)."""
    peft_head = model.get_output_embeddings()
    head = getattr(peft_head, "base_layer", None)
    if head is not None and model.config.tie_word_embeddings:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    return model.merge_and_unload()


@dataclass(frozen=True)
class Release:
    path: Path
    round: int
    files: dict[str, str]  # relative path -> sha256


def export_release(
    base_path: Path,
    state: dict[str, torch.Tensor],
    out: Path,
    *,
    round: int,
    val_loss: dict[str, float] | None = None,
) -> Release:
    """Write the release into `out` (built in a staging folder, then renamed into place)."""
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    base = load_base(base_path)
    shutil.copytree(base_path, staging / "base", ignore=shutil.ignore_patterns(LORA_INIT, MANIFEST, ".*"))
    lora = base.with_lora()
    lora.set_state(state)
    # the release ships its base, so the adapter need not carry the (tied) head weight again
    lora.model.save_pretrained(staging / "adapter", save_embedding_layers=False)
    # Point the adapter at the release's own base, relative, so the release folder can move.
    adapter_config = staging / "adapter" / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = "../base"
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    merged = _merge(lora.model)
    merged.save_pretrained(staging / "merged")
    base.tokenizer.save_pretrained(staging / "merged")

    files = {
        str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
    }
    atomic_write_json(
        staging / "release.json",
        {"round": round, "base_sha256": base.sha256, "val_loss": val_loss or {}, "sha256": files,
         "state_sha256": hashlib.sha256(tensors_to_bytes(state, torch.float32)).hexdigest()},
    )
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return Release(out, round, files)
