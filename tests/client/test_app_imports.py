"""A SuperNode starts a fresh ClientApp process per message: one that answers a hello or a
secure-aggregation stage must not import the training stack (seconds per message, for nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("transformers", "peft", "opacus", "bitsandbytes")
PROBE = f"""
import json, sys
from client.app import app, node_of, roster_of, secagg_handler
from client.node_config import Node
class Hints:
    base_path, members_dir, nodes_dir = "base", "members", "nodes"
node = node_of(type("Context", (), {{"node_config": {{"data-path": "/data/acme", "member": "acme", "dp": "on", "dp-target-epsilon": 8}},
                                    "run_config": {{}}}})(), Hints())
assert isinstance(node, Node) and node.member == "acme" and node.dp is not None
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


def test_a_clientapp_process_answering_a_stage_imports_no_training_stack() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
