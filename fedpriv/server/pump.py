"""Hand the server's messages to simulated hospitals as soon as they are stored.

Flower 1.41's simulation engine moves messages from its link state to the Ray workers in a
thread (``add_messages_to_queue`` in ``flwr.server.superlink.fleet.vce.vce_api``, not
configurable) that sleeps 0.1 s between passes, and each pass asks the in-memory link state
for every node's next message (``get_message_ins``), which scans every stored message for
each node under the state's lock: O(nodes x messages) per pass. With 1,000 hospitals that
scan was 49-72 % of the server's time (BENCHMARKS.md, issue 14).

:func:`event_driven_pump` swaps that thread's function, for the duration of one simulation,
for one that is handed each message as the server stores it (it wraps the state's
``store_message_ins``) and puts it on the workers' queue at once, marked delivered exactly as
``get_message_ins`` marks it: no latency, no polling, O(1) per message. Messages stored
before it started are fetched once the way Flower does. It is used only if Flower's function
still has the signature it was written against; otherwise Flower's own runs unchanged (just
slower).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: the parameters of the Flower function this replaces, in order
EXPECTED_PARAMETERS = ("state", "queue", "nodes_mapping", "f_stop")
#: longest wait between checks of the stop event when nothing is stored
IDLE_WAIT = 0.1


def _pump(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Move each instruction the server stores to the workers' queue as it is stored."""
    stored: collections.deque[Any] = collections.deque()
    signal = threading.Event()
    original_store = state.store_message_ins

    def store_and_hand_over(message: Any, *args: Any, **kwargs: Any) -> Any:
        message_id = original_store(message, *args, **kwargs)
        if message_id is not None and message.metadata.dst_node_id in nodes_mapping:
            stored.append(message)
            signal.set()
        return message_id

    state.store_message_ins = store_and_hand_over
    try:
        for node_id in list(nodes_mapping.keys()):  # stored before this pump started
            for message in state.get_message_ins(node_id=node_id, limit=None):
                queue.put(message)
        while not f_stop.is_set():
            signal.wait(IDLE_WAIT)
            signal.clear()  # before draining: a store while draining is drained too
            while stored:
                message = stored.popleft()
                if message.metadata.delivered_at:  # stored twice, or already fetched
                    continue
                # what Flower's get_message_ins records when it hands a message out
                message.metadata.delivered_at = datetime.datetime.now(tz=datetime.UTC).isoformat()
                queue.put(message)
    finally:
        with contextlib.suppress(AttributeError):
            del state.store_message_ins  # back to the class's method


def _compatible(function: Callable[..., Any]) -> bool:
    try:
        parameters = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return parameters == EXPECTED_PARAMETERS


@contextlib.contextmanager
def event_driven_pump() -> Iterator[bool]:
    """Within the block, Flower's simulation engine uses :func:`_pump`; yields whether it
    could be installed."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        yield False
        return
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or not _compatible(original):
        logger.debug("Flower's simulation message pump has changed; keeping Flower's own")
        yield False
        return
    vce_api.add_messages_to_queue = _pump
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
