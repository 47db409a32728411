"""Committed rounds into the ledger: what each round's manifest says, as signed records."""

from __future__ import annotations

from dataclasses import replace

from server.checkpoint import Checkpoints
from server.config import RunConfig
from server.ledger import Ledger, LedgerError, Record
from server.rights import SHARE


def record_in_ledger(ledger: Ledger, checkpoints: Checkpoints, config: RunConfig) -> None:
    """Append every committed round the ledger lacks, rebuilt from its manifest (idempotent): a
    "contribution" record per member that took part, and a "share" record per member known so
    far with its credited cumulative share (what rights are computed from: server/rights.py)."""
    last = ledger.latest_round() or 0
    known = {r.member for r in ledger.records()}
    for manifest in checkpoints.manifests():
        if manifest["round"] <= last or not manifest["members"]:
            continue
        steps = int(manifest.get("run_config", {}).get("local-steps", config.local_steps))  # the round's own
        budget = replace(config, local_steps=steps).token_budget
        shares = manifest.get("shares", {})
        line = {"round": manifest["round"], "release_sha256": manifest["state_sha256"], "time": manifest["time"]}
        taking_part = [
            Record(
                member=m["member"], score=float(manifest.get("scores", {}).get(m["member"], 0.0)),
                share=float(shares.get(m["member"], 0.0)),
                tokens=min(int(m["num_tokens"]), budget),  # self-reported: informational only
                bytes_up=int(m["bytes_up"]), bytes_down=int(m["bytes_down"]),
                # the member's record-level ε spent so far, as its reply said (server/validate.py checked it)
                dp_epsilon=float(m["dp_epsilon"]) if m.get("dp_epsilon") is not None else None, **line,
            )
            for m in manifest["members"]
        ]
        known |= {m["member"] for m in manifest["members"]} | set(shares)
        credited = [
            Record(member=m, score=0.0, share=float(shares.get(m, 0.0)), tokens=0, bytes_up=0, bytes_down=0,
                   dp_epsilon=None, kind=SHARE, **line)
            for m in sorted(known)
        ]
        try:
            ledger.append_round(taking_part + credited)
        except LedgerError as exc:  # e.g. a full disk: the checkpoint is the truth, the ledger follows it
            raise LedgerError(f"{exc}; round {manifest['round']} is committed and enters the ledger when the run resumes") from None
