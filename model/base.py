"""The frozen base model directory: HF model + tokenizer + the operator's frozen LoRA A.

Layout (loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`):
    config.json, model.safetensors, tokenizer files   the frozen base, never sent in a round
    fedmoe_lora_init.safetensors                      frozen LoRA A matrices (FFA-LoRA)
    fedmoe_base.json                                  LoRA spec + sha256 of every file above
Members load it once (from the hub or a local path) and it is checked against its sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from model.io import atomic_write_json, load_tensors, save_tensors, sha256_file
from model.lora import LoraMoE, LoraSpec

LORA_INIT = "fedmoe_lora_init.safetensors"
MANIFEST = "fedmoe_base.json"


class BaseModelError(RuntimeError):
    """The base model directory is missing, incomplete or does not match its checksums."""


@dataclass
class Base:
    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: LoraSpec
    lora_init: dict[str, torch.Tensor]
    sha256: str  # of the manifest, which pins every file: one id for "this base"

    def with_lora(self) -> LoraMoE:
        return LoraMoE(self.model, self.spec, self.lora_init)


def save_base(
    path: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: LoraSpec,
    *,
    seed: int,
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_tensors(path / LORA_INIT, LoraMoE.make_lora_init(model, spec, seed=seed))
    files = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [f for f in files if f != MANIFEST]
    atomic_write_json(
        path / MANIFEST,
        {"lora": spec.as_dict(), "sha256": {f: sha256_file(path / f) for f in files}},
    )


def _spec(fields: dict[str, object]) -> LoraSpec:
    """The base's LoRA spec; bases made before the output-head adapter have no `train_head`, those
    made before the shared-MLP adapters no `train_shared_mlp` (nor their frozen A): both off."""
    known = set(LoraSpec.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BaseModelError(f"{MANIFEST}: unknown LoRA setting {unknown[0]!r}")
    return LoraSpec(**{"train_head": False, "train_shared_mlp": False, **fields})  # type: ignore[arg-type]


def load_base(path: Path, *, expected_sha256: str | None = None) -> Base:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BaseModelError(f"{path}: not a fedmoe base directory (no {MANIFEST}; run `fedmoe init`)")
    manifest_sha = sha256_file(manifest_path)
    if expected_sha256 is not None and manifest_sha != expected_sha256:
        raise BaseModelError(f"{manifest_path}: sha256 {manifest_sha[:12]}… is not the round's base {expected_sha256[:12]}…")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["sha256"].items():
        file = path / name
        if not file.is_file():
            raise BaseModelError(f"{file}: missing from the base model directory")
        if sha256_file(file) != digest:
            raise BaseModelError(f"{file}: sha256 mismatch (file changed or corrupt)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Base(
        path=path,
        model=model,
        tokenizer=tokenizer,
        spec=_spec(manifest["lora"]),
        lora_init=load_tensors(path / LORA_INIT),
        sha256=manifest_sha,
    )
