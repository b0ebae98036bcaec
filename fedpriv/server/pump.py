"""Hand the server's messages to simulated hospitals as soon as they are stored.

Flower 1.41's simulation engine moves messages from its link state to the Ray workers in a
thread that sleeps 0.1 s between passes (``add_messages_to_queue`` in
``flwr.server.superlink.fleet.vce.vce_api``, not configurable). A round is two exchanges
(train, evaluate), so at ~0.15 s of real work per round that sleep alone made a round take
twice as long as a plain loop (BENCHMARKS.md, issue 2).

:func:`event_driven_pump` swaps that thread's function, for the duration of one simulation,
for one that waits on an event set whenever the server stores a message: no latency, and no
busy polling either. It is used only if Flower's function still has the signature it was
written against; otherwise Flower's own runs unchanged (just slower).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: the parameters of the Flower function this replaces, in order
EXPECTED_PARAMETERS = ("state", "queue", "nodes_mapping", "f_stop")
#: longest wait between passes when no store was signalled (Flower's own interval)
IDLE_WAIT = 0.1
#: a pass starts once stores have been quiet this long: the server stores a round's messages
#: in a burst, and each pass scans every stored message once per node (O(nodes x messages)
#: in Flower's in-memory link state), so one pass per burst, not one per message
QUIET = 0.002
MAX_SETTLE = 0.05


def _pump(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Move stored instructions to the workers' queue whenever the server stores some."""
    stored = threading.Event()
    original_store = state.store_message_ins

    def store_and_signal(*args: Any, **kwargs: Any) -> Any:
        result = original_store(*args, **kwargs)
        stored.set()
        return result

    state.store_message_ins = store_and_signal
    try:
        while not f_stop.is_set():
            stored.clear()  # before the pass: a store during the pass triggers another one
            moved = False
            for node_id in list(nodes_mapping.keys()):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    moved = True
            if moved:
                continue  # a node may hold more than one: pass again at once
            if stored.wait(IDLE_WAIT):
                settle_until = time.monotonic() + MAX_SETTLE
                # let the burst of stores finish (but never wait long for it)
                while stored.wait(QUIET) and time.monotonic() < settle_until:
                    stored.clear()
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
