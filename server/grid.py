"""One message exchange over Flower's Grid: push, then pull replies as they come until a deadline.

The round loop's only way of talking to members (TRAIN and the secure-aggregation stages), so it
runs the same in Flower's simulation engine and on a real SuperLink. `arriving` hands over each
reply as it is pulled and keeps none, pulling at most PULL_BATCH at a time, so that a caller that
folds replies into a sum as they come (the masked inputs, server/secure.py) never holds more than
that many; `exchange` collects them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

PULL_BATCH = 8  # replies asked for in one pull: what a pull can bring in at once, whatever the members' count


def arriving(grid: Grid, messages: list[Message], timeout: float, *, poll: float = 0.2) -> Iterator[Message]:
    """Each reply that arrives within `timeout` seconds, as it is pulled (in the order sent)."""
    if not messages:
        return
    waiting = dict.fromkeys(grid.push_messages(messages))  # message ids not answered yet, in the order sent
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        ids = list(waiting)
        for start in range(0, len(ids), PULL_BATCH):
            for reply in grid.pull_messages(ids[start: start + PULL_BATCH]):
                waiting.pop(reply.metadata.reply_to_message_id, None)
                yield reply
        if waiting:
            time.sleep(poll)


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    on_reply: Callable[[int], None] = lambda done: None,
    *,
    poll: float = 0.2,
) -> list[Message]:
    """Replies that arrived within `timeout` seconds; `on_reply(count)` after each one."""
    replies: list[Message] = []
    for reply in arriving(grid, messages, timeout, poll=poll):
        replies.append(reply)
        on_reply(len(replies))
    return replies
