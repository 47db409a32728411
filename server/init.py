"""The operator's `init`: demo corpora, tokenizer and the pre-trained tiny base, built if missing.

A real operator passes `from_pretrained` (a local HF MoE checkpoint directory) instead of
pre-training; its tokenizer is used as it is and only the frozen LoRA init is added.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model import families

from model.precision import select_precision
from server.workspace import Workspace
from model.base import MANIFEST, save_base
from model.corpus import build_demo_corpora
from model.member_data import read_texts
from model.lora import LoraSpec
from model.moe import MoEConfig, build_model
from model.pretrain import pretrain
from model.tokenizer import pack, train_tokenizer
from server.rights import DEFAULT_POLICY_TOML


@dataclass(frozen=True)
class InitConfig:
    model: MoEConfig = field(default_factory=MoEConfig)
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(train_head=True, train_shared_mlp=True))
    bytes_per_domain: int = 1_500_000
    general_bytes: int = 1_500_000
    val_bytes: int = 120_000
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 2e-3
    precision: str = "auto"
    seed: int = 0


def init_workspace(
    ws: Workspace,
    config: InitConfig,
    *,
    from_pretrained: Path | None = None,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, int, float], None] | None = None,
) -> None:
    """Build whatever of corpora/ and base/ is missing (each step is skipped when present)."""
    if not (ws.corpora / "corpora.json").is_file():
        log(f"building demo corpora in {ws.corpora}")
        build_demo_corpora(
            ws.corpora, bytes_per_domain=config.bytes_per_domain, general_bytes=config.general_bytes,
            val_bytes=config.val_bytes, seed=config.seed, log=log,
        )
    if not ws.policy.is_file():
        ws.operator_dir.mkdir(parents=True, exist_ok=True)
        ws.policy.write_text(DEFAULT_POLICY_TOML)
        log(f"default usage-rights policy written to {ws.policy}")
    if (ws.base / MANIFEST).is_file():
        return
    staging = ws.root / ".base-staging"
    shutil.rmtree(staging, ignore_errors=True)
    if from_pretrained is not None:
        # refused up front, in one line naming what is missing, not later inside every member
        families.check_supported(AutoConfig.from_pretrained(from_pretrained))
        log(f"using the HF checkpoint {from_pretrained} as the frozen base")
        model = AutoModelForCausalLM.from_pretrained(from_pretrained)
        families.check_supported(model.config, [name for name, _ in model.named_parameters()])
        tokenizer = AutoTokenizer.from_pretrained(from_pretrained)
    else:
        general = read_texts(ws.general_dir)
        log(f"training a {config.model.vocab_size}-token byte-level BPE tokenizer on the general mixture")
        tokenizer = train_tokenizer(general, config.model.vocab_size)
        model = build_model(config.model, seed=config.seed)
        blocks = pack(tokenizer, general, config.pretrain_seq_len, source=str(ws.general_dir))
        precision = select_precision(config.precision)
        log(f"pre-training the base ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{config.pretrain_steps} steps, {precision.name})")
        pretrain(
            model, blocks, steps=config.pretrain_steps, batch_size=config.pretrain_batch_size,
            lr=config.pretrain_lr, precision=precision, seed=config.seed,
            on_step=(lambda s, loss: on_step(s, config.pretrain_steps, loss)) if on_step else None,
        )
    save_base(staging, model, tokenizer, config.lora, seed=config.seed)
    (staging / "fedmoe_init.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    shutil.rmtree(ws.base, ignore_errors=True)
    staging.rename(ws.base)  # the base appears whole or not at all
    log(f"base model ready in {ws.base}")
