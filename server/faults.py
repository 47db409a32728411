"""Kill points: where the tests of crash safety SIGKILL the operator's process mid-round.

`FEDMOE_KILL_AT=<point>` makes the process kill itself with SIGKILL (no cleanup, no atexit, as
a power cut or the OOM killer would) when the round loop reaches that point; unset, a kill point
costs one dictionary lookup. Hand-written: fault injection at named points of our own loop is
not something a library can place.
"""

from __future__ import annotations

import os
import signal

KILL_POINTS = (
    "after-train",  # every reply is in; nothing unmasked, nothing committed
    "after-unmask",  # secure aggregation decoded the group sums; not yet journaled
    "after-journal",  # the decoded sums are journaled; not yet committed
    "after-commit",  # the round is committed; not yet in the ledger
)
ENV = "FEDMOE_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
