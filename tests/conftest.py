"""Shared fixtures: one tiny embedded consortium workspace built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from server.workspace import Workspace  # noqa: E402
from model.lora import LoraSpec  # noqa: E402
from model.moe import MoEConfig  # noqa: E402
from server.init import InitConfig, init_workspace  # noqa: E402

TINY_MODEL = MoEConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
TINY_INIT = InitConfig(
    model=TINY_MODEL,
    lora=LoraSpec(rank=4, alpha=8, train_shared_mlp=True),  # as `fedmoe init`; a Mixtral has no shared MLP
    bytes_per_domain=150_000,
    general_bytes=300_000,
    val_bytes=30_000,
    pretrain_steps=300,
    pretrain_batch_size=16,
    pretrain_seq_len=64,
)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("consortium"))
    init_workspace(ws, TINY_INIT, log=lambda _: None)
    return ws


@pytest.fixture(scope="session")
def tiny_base_path(tiny_workspace: Workspace) -> Path:
    return tiny_workspace.base


@pytest.fixture()
def ws(tiny_workspace: Workspace, tmp_path: Path) -> Workspace:
    """A private copy of the tiny consortium (runs, nodes and identities start empty)."""
    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace.root, root, ignore=shutil.ignore_patterns("runs", "nodes", "identities.json"))
    return Workspace(root)
