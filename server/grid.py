"""One message exchange over Flower's Grid: push, then pull replies as they come until a deadline.

The round loop's only way of talking to members (TRAIN and the secure-aggregation stages), so it
runs the same in Flower's simulation engine and on a real SuperLink.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    on_reply: Callable[[int], None] = lambda done: None,
    *,
    poll: float = 0.2,
) -> list[Message]:
    """Replies that arrived within `timeout` seconds; `on_reply(count)` after each one."""
    if not messages:
        return []
    ids = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while ids and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(ids)):
            ids.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            on_reply(len(replies))
        if ids:
            time.sleep(poll)
    return replies
