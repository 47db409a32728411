"""Flower's side of a deployment: its executables and environment, the SuperLink connection in
FLWR_HOME, the argv of flower-superlink / flower-supernode, and the `flwr` calls fedmoe makes
(registering a member's key, submitting a run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from privacy.certs import CertLayout

CONNECTION = "fedmoe"  # name of the SuperLink connection in the private FLWR_HOME/config.toml
NODE_REFUSED = "Failed to activate SuperNode"  # flower-supernode's log when the SuperLink refuses its key


class DeployError(RuntimeError):
    """A deployment input is missing or unusable; the message names it."""


def flower_bin(name: str) -> str:
    """A Flower executable, preferably from this interpreter's environment."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    from shutil import which

    found = which(name)
    if found is None:
        raise DeployError(f"{name}: not found next to {sys.executable} or on PATH (pip install 'flwr>=1.41,<1.42')")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every Flower process fedmoe starts: private FLWR_HOME, no telemetry, no
    dependency installation at run time, this environment's executables first on PATH."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    env.update(extra or {})
    return env


def write_connection(flwr_home: Path, address: str, ca: Path, name: str = CONNECTION) -> Path:
    """Add (or replace) the SuperLink connection `name` in `$FLWR_HOME/config.toml` (Flower 1.41's
    place for connections; `[tool.flwr.federations]` in pyproject is legacy) and make it default."""
    import tomli
    import tomli_w

    path = flwr_home / "config.toml"
    config: dict[str, Any] = tomli.loads(path.read_text()) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    superlink["default"] = name
    superlink[name] = {"address": address, "root-certificates": str(ca.resolve())}
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def node_config(values: Mapping[str, str]) -> str:
    """`--node-config` of flower-supernode: space-separated key='value' (TOML strings)."""
    for key, value in values.items():
        if "'" in value or "\n" in value:
            raise DeployError(f"node config {key}: {value!r} must not contain quotes or newlines")
    return " ".join(f"{k}='{v}'" for k, v in values.items())


def run_config_string(values: Mapping[str, object]) -> str:
    """`--run-config` of `flwr run`: space-separated TOML key=value pairs."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if "'" in str(value):
                raise DeployError(f"run config {key}: {value!r} must not contain single quotes")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def superlink_argv(layout: CertLayout, database: Path, host: str, port: int, log: Path | None = None) -> list[str]:
    argv = [
        flower_bin("flower-superlink"),
        "--ssl-certfile", str(layout.server_cert), "--ssl-keyfile", str(layout.server_key),
        "--ssl-ca-certfile", str(layout.operator_ca),
        "--enable-supernode-auth",
        "--database", str(database),
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]
    return argv + (["--log-file", str(log)] if log is not None else [])


def supernode_argv(superlink: str, ca: Path, key: Path, config: Mapping[str, str], clientapp_port: int) -> list[str]:
    return [
        flower_bin("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", node_config(config),
        "--host", "127.0.0.1", "--port", str(clientapp_port),  # the local ClientApp runtime API
    ]


def register_member(flwr_home: Path, public_key: Path, name: str, connection: str = CONNECTION) -> int | None:
    """Register one member's public key with the SuperLink (Control API); idempotent. Returns the
    node id the key authenticates as, or None when it was registered before (Flower says no id)."""
    result = subprocess.run(
        [flower_bin("flwr"), "supernode", "register", str(public_key), connection, "--name", name, "--format", "json"],
        env=flower_env(flwr_home), capture_output=True, text=True, timeout=60, check=False,
    )
    text = result.stdout + result.stderr
    if result.returncode == 0 and '"success": true' in text:
        try:
            return int(json.loads(text[text.index("{"): text.rindex("}") + 1])["node-id"])
        except (ValueError, KeyError, TypeError):
            raise DeployError(f"registering {public_key}: Flower's answer names no node id: {text.strip()[-200:]}") from None
    if "already" in text.lower() or "in use" in text.lower():
        return None
    last = [line for line in text.strip().splitlines() if line.strip()][-3:]
    raise DeployError(f"registering {public_key} failed: {' '.join(last)}")


def unregister_member(flwr_home: Path, node: int, connection: str = CONNECTION) -> None:
    """Unregister a revoked member's node from the SuperLink (Control API): its key no longer
    authenticates, so its SuperNode is refused from then on."""
    result = subprocess.run(
        [flower_bin("flwr"), "supernode", "unregister", str(node), connection, "--format", "json"],
        env=flower_env(flwr_home), capture_output=True, text=True, timeout=60, check=False,
    )
    text = result.stdout + result.stderr
    if result.returncode or '"success": true' not in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-3:]
        raise DeployError(f"unregistering node {node} failed: {' '.join(last)}")


def submit(flwr_home: Path, app_dir: Path, values: Mapping[str, object], *, connection: str = CONNECTION,
           stream: bool = False) -> str:
    """Submit the app in `app_dir` to the SuperLink (`flwr run`) and return the run id."""
    if not (flwr_home / "config.toml").is_file():
        raise DeployError(f"{flwr_home / 'config.toml'}: not found (start `fedmoe serve` first, or set --flwr-home)")
    if not (app_dir / "pyproject.toml").is_file():
        raise DeployError(f"{app_dir}: no pyproject.toml (pass --app the fedmoe project folder)")
    argv = [flower_bin("flwr"), "run", str(app_dir), connection, "--format", "json"]
    if values:
        argv += ["--run-config", run_config_string(values)]
    result = subprocess.run(argv, env=flower_env(flwr_home), capture_output=True, text=True, timeout=300, check=False)
    text = result.stdout
    try:
        reply = json.loads(text[text.index("{"): text.rindex("}") + 1])
    except ValueError:
        reply = {}
    if result.returncode or not reply.get("success"):
        detail = (result.stderr or text).strip().splitlines()[-3:]
        raise DeployError(f"flwr run failed: {' '.join(detail)}")
    run_id = str(reply["run-id"])
    if stream:
        subprocess.run([flower_bin("flwr"), "log", run_id, connection, "--stream"], env=flower_env(flwr_home), check=False)
    return run_id

