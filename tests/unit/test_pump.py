"""The event-driven message pump that replaces Flower's 0.1 s polling in simulation."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from fedpriv.server import pump


class _State:
    """Just the two link-state methods the pump uses (our logic, not Flower's, is tested)."""

    def __init__(self) -> None:
        self.pending: dict[int, list[str]] = {1: [], 2: []}
        self.lock = threading.Lock()

    def store_message_ins(self, node_id: int, message: str) -> str:
        with self.lock:
            self.pending[node_id].append(message)
        return message

    def get_message_ins(self, *, node_id: int, limit: int) -> list[str]:
        with self.lock:
            taken, self.pending[node_id] = (
                self.pending[node_id][:limit],
                self.pending[node_id][limit:],
            )
        return taken


def _run(state: _State) -> tuple[queue.Queue[Any], threading.Event, threading.Thread]:
    out: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=pump._pump, args=(state, out, {1: 0, 2: 1}, stop))
    thread.start()
    time.sleep(0.25)  # let it settle into its idle wait
    return out, stop, thread


def test_a_stored_message_reaches_the_workers_without_the_polling_delay() -> None:
    state = _State()
    out, stop, thread = _run(state)
    try:
        delays = []
        for i in range(5):
            started = time.perf_counter()
            state.store_message_ins(1 + i % 2, f"m{i}")
            assert out.get(timeout=2) == f"m{i}"
            delays.append(time.perf_counter() - started)
            time.sleep(0.15)  # back to idle before the next one
        # Flower's pump would average ~50 ms here (0.1 s sleeps); an idle wait is not a delay
        assert sorted(delays)[2] < 0.02, delays
    finally:
        stop.set()
        thread.join(timeout=2)
    assert not thread.is_alive()
    # the instance's method is the class's again
    assert "store_message_ins" not in vars(state)


def test_several_messages_for_one_node_all_move_in_one_go() -> None:
    state = _State()
    out, stop, thread = _run(state)
    try:
        started = time.perf_counter()
        with state.lock:  # stored "at once", without a signal per message...
            state.pending[1].extend(["a", "b", "c"])
        state.store_message_ins(2, "d")  # ...then one signalled store
        got = {out.get(timeout=2) for _ in range(4)}
        assert got == {"a", "b", "c", "d"}
        assert time.perf_counter() - started < 0.05
    finally:
        stop.set()
        thread.join(timeout=2)


def test_the_pump_is_installed_in_this_flower_and_removed_afterwards() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with pump.event_driven_pump() as installed:
        # fails if a Flower upgrade changed the function fedpriv replaces
        assert installed
        assert vce_api.add_messages_to_queue is pump._pump
    assert vce_api.add_messages_to_queue is original


def test_an_incompatible_flower_keeps_its_own_pump(monkeypatch: Any) -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    def changed(state: Any, queue: Any) -> None:  # a different signature
        raise AssertionError("never called here")

    monkeypatch.setattr(vce_api, "add_messages_to_queue", changed)
    with pump.event_driven_pump() as installed:
        assert not installed
        assert vce_api.add_messages_to_queue is changed
