"""Pull from the simulation's link state only the replies that have arrived.

Flower 1.41's in-memory link state answers a pull (``get_message_res``) by walking every
awaited message id several times under the lock its workers need to store their replies
(metadata, TTL and node-availability checks): O(awaited) per pull, whether or not anything
came. At 3,000 simulated hospitals 60 % of the server's samples were in those pulls
(BENCHMARKS.md, issue 14).

:class:`ArrivalPulls` wraps the state's ``store_message_res`` (for this state object only,
the way :mod:`fedpriv.server.pump` wraps ``store_message_ins``) to note the id each reply
answers, and a pull then asks the state for the noted ids among those awaited: O(arrived).
What the hook cannot see, Flower's own verdicts on messages that never get a reply (a TTL
that expired, a node gone offline), still comes back: every :data:`FULL_PULL_EVERY` seconds
the pull asks for every awaited id, as Flower's grid does. If the state does not look as
expected, every pull is a full one (just slower).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["FULL_PULL_EVERY", "ArrivalPulls"]

#: seconds between full pulls (every awaited id), for replies only Flower's state makes
FULL_PULL_EVERY = 5.0


class ArrivalPulls:
    """Pulls for an in-memory grid (one with a ``state`` link state); see the module."""

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self._arrived: set[str] = set()
        self._next_full = 0.0
        state = getattr(grid, "state", None)
        original: Any = getattr(state, "store_message_res", None)
        self._state = state if callable(original) else None
        if self._state is None:
            return

        def store_and_note(message: Any, *args: Any, **kwargs: Any) -> Any:
            stored = original(message, *args, **kwargs)
            if stored is not None:  # the state refused nothing: the reply can be pulled
                self._arrived.add(str(message.metadata.reply_to_message_id))
            return stored

        self._state.store_message_res = store_and_note

    @property
    def tracking(self) -> bool:
        return self._state is not None

    def pull(self, message_ids: Iterable[str]) -> Iterable[Any]:
        wanted = {str(m) for m in message_ids}
        now = time.monotonic()
        if self._state is None or now >= self._next_full:
            self._next_full = now + FULL_PULL_EVERY
            replies = list(self._grid.pull_messages(wanted))
            # forget only what came: a reply stored during this pull is pulled next time
            self._arrived.difference_update(str(r.metadata.reply_to_message_id) for r in replies)
            return replies
        ready = self._arrived.intersection(wanted)  # one C call: safe beside the workers
        if not ready:
            return []
        self._arrived.difference_update(ready)
        return self._grid.pull_messages(ready)

    def close(self) -> None:
        """Give the state its own method back."""
        if self._state is not None:
            with contextlib.suppress(AttributeError):
                del self._state.store_message_res
            self._state = None
