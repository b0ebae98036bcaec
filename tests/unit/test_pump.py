"""The event-driven message pump that replaces Flower's 0.1 s polling in simulation."""

from __future__ import annotations

import queue
import threading
import time
import types
from typing import Any

from fedpriv.server import pump


class _Message:
    def __init__(self, name: str, node: int) -> None:
        self.name = name
        self.metadata = types.SimpleNamespace(dst_node_id=node, delivered_at="")


class _State:
    """Just the two link-state methods the pump uses (our logic, not Flower's, is tested):
    a store that refuses messages named "bad", and Flower's scan-every-message fetch."""

    def __init__(self) -> None:
        self.messages: list[_Message] = []
        self.lock = threading.Lock()
        self.fetches = 0

    def store_message_ins(self, message: _Message) -> str | None:
        if message.name == "bad":
            return None
        with self.lock:
            self.messages.append(message)
        return message.name

    def get_message_ins(self, *, node_id: int, limit: int | None) -> list[_Message]:
        self.fetches += 1
        with self.lock:
            found = [
                m
                for m in self.messages
                if m.metadata.dst_node_id == node_id and not m.metadata.delivered_at
            ][:limit]
        for m in found:
            m.metadata.delivered_at = "now"
        return found


def _run(
    state: _State, nodes: int = 2
) -> tuple[queue.Queue[Any], threading.Event, threading.Thread]:
    out: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    mapping = {node: node - 1 for node in range(1, nodes + 1)}
    thread = threading.Thread(target=pump._pump, args=(state, out, mapping, stop))
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
            state.store_message_ins(_Message(f"m{i}", 1 + i % 2))
            got = out.get(timeout=2)
            assert got.name == f"m{i}" and got.metadata.delivered_at, "handed out as delivered"
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


def test_messages_stored_before_it_started_are_handed_over_too() -> None:
    state = _State()
    for name in ("a", "b", "c"):
        state.store_message_ins(_Message(name, 1))
    out, stop, thread = _run(state)
    try:
        state.store_message_ins(_Message("d", 2))
        got = {out.get(timeout=2).name for _ in range(4)}
        assert got == {"a", "b", "c", "d"}
        assert out.empty()
    finally:
        stop.set()
        thread.join(timeout=2)


def test_refused_and_foreign_messages_are_not_handed_over() -> None:
    state = _State()
    out, stop, thread = _run(state)
    try:
        state.store_message_ins(_Message("bad", 1))  # the link state refused it
        state.store_message_ins(_Message("elsewhere", 99))  # not a simulated node
        state.store_message_ins(_Message("ok", 2))
        assert out.get(timeout=2).name == "ok"
        time.sleep(0.2)
        assert out.empty()
    finally:
        stop.set()
        thread.join(timeout=2)


def test_a_round_for_many_hospitals_costs_no_scan_per_hospital() -> None:
    # Flower's pump asks the state once per node per pass, and each ask scans every stored
    # message: 1,000 hospitals meant 1,000 scans of 1,000 messages per pass
    nodes = 1000
    state = _State()
    out, stop, thread = _run(state, nodes)
    try:
        fetched_at_start = state.fetches
        started = time.perf_counter()
        for node in range(1, nodes + 1):
            state.store_message_ins(_Message(f"m{node}", node))
        got = {out.get(timeout=5).name for _ in range(nodes)}
        seconds = time.perf_counter() - started
        assert len(got) == nodes
        assert state.fetches == fetched_at_start == nodes, "one fetch per node, at start only"
        assert seconds < 2.0, seconds
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
