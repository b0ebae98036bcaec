"""One exchange with the hospitals: push the messages, then pull the replies on the
server's own short interval.

Flower 1.41's ``Grid.send_and_receive`` on a real SuperLink (``HttpGrid``) sleeps 3 s
between pulls (hard-coded), so every exchange waited up to 3 s after the last hospital had
replied. A pull is one small request to the SuperLink, so the server pulls every
:data:`PULL_INTERVAL` seconds instead; Flower's in-memory grid (simulation) keeps its own
``pull_interval``. The SuperNodes' own 3 s poll is Flower's and is not touched.

A pull costs time in proportion to the replies still awaited (Flower's in-memory link state
checks each one under the lock its workers need to store replies), so with thousands of
simulated hospitals the server waits at least :data:`PULL_BACKOFF` times as long as its last
pull took before the next: pulling stays a small share of the server's time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PULL_INTERVAL", "send_and_receive"]

#: seconds between the server's pulls for replies on a real SuperLink
PULL_INTERVAL = 0.1
#: the wait after a pull is at least this many times the pull's own duration
PULL_BACKOFF = 4.0


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float, interval: float | None = None
) -> list[Message]:
    """The replies that came back within ``timeout`` seconds (the same contract as
    ``Grid.send_and_receive``: a message with no reply by then simply has none)."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        # a grid that only exchanges (e.g. an in-process transport): its own way
        return list(grid.send_and_receive(messages, timeout=timeout))
    if interval is None:
        interval = float(getattr(grid, "pull_interval", PULL_INTERVAL))
    waiting = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting:
        pulled_at = time.monotonic()
        for reply in grid.pull_messages(waiting):
            replies.append(reply)
            waiting.discard(reply.metadata.reply_to_message_id)
        now = time.monotonic()
        if not waiting or now >= deadline:
            break
        time.sleep(min(max(interval, PULL_BACKOFF * (now - pulled_at)), deadline - now))
    return replies
