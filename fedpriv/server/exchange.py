"""One exchange with the hospitals: push the messages, then pull the replies on the
server's own short interval.

Flower 1.41's ``Grid.send_and_receive`` on a real SuperLink (``HttpGrid``) sleeps 3 s
between pulls (hard-coded), so every exchange waited up to 3 s after the last hospital had
replied. A pull is one small request to the SuperLink, so the server pulls every
:data:`PULL_INTERVAL` seconds instead; Flower's in-memory grid (simulation) keeps its own
``pull_interval``. The SuperNodes' own 3 s poll is Flower's and is not touched.

While nothing arrives the interval grows (x :data:`PULL_GROWTH`, up to
:data:`MAX_PULL_INTERVAL`) and it starts again short when a reply comes: at most about a
second's delay after the last hospital, against Flower's 3 s, for a tenth of the pulls.

A pull costs time in proportion to the replies still awaited (Flower's in-memory link state
checks each one under the lock its workers need to store replies), so with thousands of
simulated hospitals the server waits at least :data:`PULL_BACKOFF` times as long as its last
pull took before the next: pulling stays a small share of the server's time.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["MAX_PULL_INTERVAL", "PULL_INTERVAL", "quicken_object_pulls", "send_and_receive"]

#: seconds between the server's pulls for replies on a real SuperLink
PULL_INTERVAL = 0.1
#: the wait after a pull is at least this many times the pull's own duration
PULL_BACKOFF = 4.0
#: on a real SuperLink, each pull that brings nothing waits this much longer than the last,
#: up to MAX_PULL_INTERVAL: a pull costs the SuperLink a TLS request, and on a coordinator
#: sharing its cores (a pilot on one host) eight pulls a second took a quarter of a core
PULL_GROWTH = 1.5
MAX_PULL_INTERVAL = 1.0
#: a reply's objects not yet all on the SuperLink: retry after this long, doubling up to the
#: cap (Flower's defaults: 1 s doubling to 10 s)
OBJECT_PULL_BACKOFF = 0.05
OBJECT_PULL_BACKOFF_CAP = 0.5


def quicken_object_pulls(grid: Any) -> bool:
    """Shorten the backoff of a real SuperLink grid's object pulls; True if it did.

    A SuperNode registers its reply with the SuperLink first and uploads the reply's objects
    (the model) after; measured on one host, the upload took about 4 s. A server pull that
    lands in that window makes Flower 1.41's ``HttpGrid.pull_messages`` wait for the objects
    with its ``pull_objects`` defaults, 1, 2, 4, 8 s ...: replies that had arrived sat 5-24 s
    on the SuperLink, up to two thirds of a round. The grid's module gets the same function
    with a 50 ms backoff capped at 0.5 s (its keyword arguments, nothing else changed); in
    this ServerApp process only, and only once.
    """
    module = sys.modules.get(type(grid).__module__)
    original = getattr(module, "pull_objects", None)
    if module is None or original is None or getattr(original, "fedpriv_quick", False):
        return False
    quick = functools.partial(
        original, initial_backoff=OBJECT_PULL_BACKOFF, backoff_cap=OBJECT_PULL_BACKOFF_CAP
    )
    quick.fedpriv_quick = True  # type: ignore[attr-defined]
    module.pull_objects = quick  # type: ignore[attr-defined]
    return True


def send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float, interval: float | None = None
) -> list[Message]:
    """The replies that came back within ``timeout`` seconds (the same contract as
    ``Grid.send_and_receive``: a message with no reply by then simply has none)."""
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        # a grid that only exchanges (e.g. an in-process transport): its own way
        return list(grid.send_and_receive(messages, timeout=timeout))
    own: Any = getattr(grid, "pull_interval", None)
    on_superlink = interval is None and own is None
    if on_superlink:  # start at PULL_INTERVAL, back off while nothing arrives
        interval, longest = PULL_INTERVAL, MAX_PULL_INTERVAL
        quicken_object_pulls(grid)
    else:  # Flower's in-memory grid (simulation) keeps its own short interval
        interval = float(interval if interval is not None else own)
        longest = interval
    # in memory, a pull's duration is its cost (it scans the awaited replies under a lock);
    # on a SuperLink it is mostly waiting for a reply's objects to finish uploading
    backoff = 0.0 if on_superlink else PULL_BACKOFF
    waiting = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    wait = interval
    while waiting:
        pulled_at = time.monotonic()
        arrived = 0
        for reply in grid.pull_messages(waiting):
            replies.append(reply)
            waiting.discard(reply.metadata.reply_to_message_id)
            arrived += 1
        now = time.monotonic()
        if not waiting or now >= deadline:
            break
        # a reply often comes with others close behind: pull again soon; otherwise wait longer
        wait = interval if arrived else min(wait * PULL_GROWTH, longest)
        time.sleep(min(max(wait, backoff * (now - pulled_at)), deadline - now))
    return replies
