"""The consortium's public history, as the free-rider test's references (open-mode contribution).

Every member holds each view of the consortium model it trained from, so it can compute any
past round's change (the difference of two consecutive views) and the path so far (its newest
view minus the first). A free rider can send any of those, or a mixture, plus noise of any size.
server/scoring.score_open gives them to aggregation/free_riders.novel_descent as references:
what they explain of an update is not credited to the member that sent it.

What is kept: the changes of the last `window` committed rounds (run config `replay-window`)
and the path from round 0. A change older than the window, its part along the kept ones
removed, is the part of public history a free rider can still send with credit; the window
trades that against the server's memory (one trainable state per round kept). Kept only in
open mode; secure mode never sees an update. Rebuilt from the committed rounds on resume, so a
resumed round is judged against the same references as an uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import torch

from server.checkpoint import Checkpoints

State = dict[str, torch.Tensor]
PATH = "(path so far)"


def change_name(rnd: int) -> str:
    """A reference's name: never a member's (member names start with a letter or digit)."""
    return f"(change of round {rnd})"


class PublicHistory:
    """The last `window` rounds' changes of the committed state, and the path from round 0."""

    def __init__(self, window: int, origin: Mapping[str, torch.Tensor]) -> None:
        self.window = window
        self.origin = {k: v.clone() for k, v in origin.items()}
        self.changes: deque[tuple[int, State]] = deque(maxlen=max(window, 1))
        self.path: State | None = None

    def record(self, rnd: int, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> None:
        """Round `rnd` moved the committed state from `before` to `after`."""
        if self.window > 0:
            self.changes.append((rnd, {k: v - before[k] for k, v in after.items()}))
        self.path = {k: v - self.origin[k] for k, v in after.items()}

    def references(self) -> dict[str, State]:
        """Name -> tensors: each kept change, newest first, and the path (none before round 1)."""
        out = {change_name(rnd): change for rnd, change in reversed(self.changes)}
        if self.path is not None:
            out[PATH] = self.path
        return out

    @classmethod
    def from_checkpoints(cls, checkpoints: Checkpoints, latest: int, window: int) -> PublicHistory:
        """The history as it was after committed round `latest` (rounds 0..latest on disk)."""
        def state(rnd: int) -> State:
            committed = checkpoints.load(rnd)
            if committed is None:
                raise RuntimeError(f"{checkpoints.run_dir}: no committed round {rnd} to rebuild the public history from")
            return committed.state

        history = cls(window, state(0))
        first = max(1, latest - window + 1)
        before = state(first - 1)
        for rnd in range(first, latest + 1) if window > 0 else ():
            after = state(rnd)
            history.record(rnd, before, after)
            before = after
        if latest >= 1:
            history.path = {k: v - history.origin[k] for k, v in state(latest).items()}
        return history
