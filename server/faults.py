"""Kill points: where the tests of crash safety SIGKILL the operator's process mid-round.

`FEDMOE_KILL_AT=<point>` makes the process kill itself with SIGKILL (no cleanup, no atexit, as
a power cut or the OOM killer would) when it reaches that point. On a long-lived deployment,
`FEDMOE_KILL_AT_FILE=<path>` instead names a file that holds the point: the ServerApp that
reaches it deletes the file and then kills itself, so the run submitted after it goes on (the
SuperLink starts every ServerApp with its own environment, which cannot change between runs).
Unset, a kill point costs two dictionary lookups. The points, in the order a round reaches them:

    after-train     every reply is in; nothing unmasked, nothing committed    (server/rounds.py)
    in-advertise    inside a secure-aggregation stage (server/secure.py): the stage's first
    in-share        reply has counted, the others not yet; in-mask: one masked vector is in
    in-mask         its group's running sum; in-unmask: one member has revealed its shares,
    in-check        the sum is not decoded
    in-unmask
    after-unmask    the group sums are decoded; not yet journaled             (server/rounds.py)
    after-journal   the decoded sums are journaled; not yet committed         (server/rounds.py)
    mid-commit      the round's files are written; COMMITTED does not name it (server/checkpoint.py)
    after-commit    the round is committed; not yet in the ledger             (server/rounds.py)
    mid-ledger      one record of the round is inserted in the ledger's append transaction,
                    the rest and the signed head not yet                      (server/ledger/store.py)
    mid-export      a release's base and adapter are in its staging folder; the merged model,
                    release.json and the swap into place not yet              (server/release.py)

Hand-written: fault injection at named points of our own loop is not something a library can place.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_POINTS = (
    "after-train",
    "in-advertise",
    "in-share",
    "in-mask",
    "in-check",
    "in-unmask",
    "after-unmask",
    "after-journal",
    "mid-commit",
    "after-commit",
    "mid-ledger",
    "mid-export",  # not in the round loop: where a release is exported (`fedmoe export`, the hub)
)
ROUND_KILL_POINTS = KILL_POINTS[:-1]  # those a run of rounds reaches
ENV = "FEDMOE_KILL_AT"
FILE_ENV = "FEDMOE_KILL_AT_FILE"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if (path := os.environ.get(FILE_ENV)) is not None:
        try:
            armed = Path(path).read_text().strip()
        except OSError:  # not armed (or no longer: an earlier ServerApp took the kill)
            return
        if armed == name:
            try:
                Path(path).unlink()  # taken: only one ServerApp gets the kill
            except OSError:  # another ServerApp took it first
                return
            os.kill(os.getpid(), signal.SIGKILL)
