"""Which node speaks for which member: a member's name is bound to its sender, never taken from
what a message says.

In a deployment the binding is the consortium's registration: `fedmoe serve` registers each
member's node-auth public key with the SuperLink, which answers with the node id that key
authenticates as, and records member -> node id in a registry file (FEDMOE_MEMBER_REGISTRY,
set for the ServerApp by `fedmoe serve`). With a registry, a name not in it, or a name sent
by any node but its own, is refused. Without one (the embedded simulation, where node ids
are fresh each run and the nodes are this machine's), a name is bound to the first node that
says it for the life of the run's process, both ways: a node cannot later speak for a second
member, and no other node can take the name; a name first said by two nodes in the same round
is bound to neither, and neither counts.

Every HELLO, TRAIN reply and secure-aggregation stage reply is checked against it where it
arrives; a mismatch is one UpdateRejected naming the node and the name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from aggregation.codec import UpdateRejected

REGISTRY_ENV = "FEDMOE_MEMBER_REGISTRY"
LOCAL_ENV = "FEDMOE_LOCAL_SIMULATION"  # "1": the embedded simulation, where first claim is expected
UNBOUND_WARNING = (
    "no member registry (FEDMOE_MEMBER_REGISTRY): a member's name is bound to the first node that says it "
    "in this run; start the SuperLink with `fedmoe serve` so that names are bound to registered node keys"
)


class MemberBinding:
    def __init__(self, registry: Mapping[str, int] | None = None, source: str = "the registry", *, warn: bool = False) -> None:
        self.registry = None if registry is None else dict(registry)  # {}: a registry nobody is in
        self.source = source
        self.node_of: dict[str, int] = {}
        self.member_of: dict[int, str] = {}
        self.warn = warn  # no registry outside the embedded simulation: the run says so

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MemberBinding:
        """The registry named by FEDMOE_MEMBER_REGISTRY, if set: a missing file is a registry
        nobody is in yet, an unreadable one is fatal (a deployment never falls back to trusting
        names). Unset: first claim per run (the simulation's case; a warning says so)."""
        env = os.environ if env is None else env
        path = env.get(REGISTRY_ENV, "")
        if not path:
            return cls(warn=env.get(LOCAL_ENV) != "1")
        return cls(load_registry(Path(path)) if Path(path).exists() else {}, source=path)

    def claim(self, member: str, node: int) -> None:
        """Accept that `node` speaks for `member`, or raise UpdateRejected."""
        if self.registry is not None:
            expected = self.registry.get(member)
            if expected is None:
                raise UpdateRejected(f"node {node}: member {member!r} is not registered in {self.source}")
            if expected != node:
                raise UpdateRejected(f"node {node} spoke as {member!r}, who is registered as node {expected}")
            return
        holder = self.node_of.get(member)
        if holder is not None and holder != node:
            raise UpdateRejected(f"node {node} spoke as {member!r}, whom node {holder} speaks for in this run")
        spoken = self.member_of.get(node)
        if spoken is not None and spoken != member:
            raise UpdateRejected(f"node {node} spoke as {member!r} after speaking as {spoken!r} in this run")
        self.node_of[member], self.member_of[node] = node, member

    def settle(self, claims: Mapping[int, str]) -> dict[int, str]:
        """One exchange's claims (node -> name) at once, so that arrival order decides nothing:
        binds what may be bound and returns node -> why for the claims refused."""
        refused = self.contested(claims)
        for node, member in sorted(claims.items()):
            if node in refused:
                continue
            try:
                self.claim(member, node)
            except UpdateRejected as exc:
                refused[node] = str(exc)
        return refused

    def contested(self, claims: Mapping[int, str]) -> dict[int, str]:
        """Of one round's claims (node -> name), those that cannot be settled: a name that two or
        more nodes say, that no registry and no earlier round binds. None of them counts (the
        order replies arrive in must not decide whose the name is)."""
        if self.registry is not None:
            return {}
        by_name: dict[str, list[int]] = {}
        for node, member in claims.items():
            if self.member_of.get(node, member) == member:  # a node bound to another name is refused anyway
                by_name.setdefault(member, []).append(node)
        return {
            node: f"node {node}: {member!r} is claimed by nodes {sorted(nodes)} this round and bound to none of them"
            for member, nodes in by_name.items() if len(nodes) > 1 and member not in self.node_of
            for node in nodes
        }


def load_registry(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{path}: member registry unreadable: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                             for k, v in data.items()):
        raise RuntimeError(f"{path}: member registry must map member names to node ids")
    return data


def record_registration(path: Path, member: str, node: int) -> None:
    """Add member -> node id to the registry (`fedmoe serve`, when the SuperLink registers a key)."""
    data = load_registry(path) if path.is_file() else {}
    data[member] = node
    _write_registry(path, data)


def forget_registration(path: Path, member: str) -> None:
    """Drop a revoked member from the registry: its name is refused from then on."""
    data = load_registry(path) if path.is_file() else {}
    data.pop(member, None)
    _write_registry(path, data)


def _write_registry(path: Path, data: Mapping[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(data), sort_keys=True, indent=1) + "\n")
    tmp.replace(path)
