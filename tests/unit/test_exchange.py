"""The server's own pull loop (fedpriv.server.exchange) against a grid that answers late."""

from __future__ import annotations

import time
import types
from collections.abc import Iterable
from typing import Any

from fedpriv.server.exchange import send_and_receive


class _Grid:
    """Replies to message i become available ``delays[i]`` seconds after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pulls = 0
        self.pushed_at = 0.0

    def push_messages(self, messages: Iterable[Any]) -> list[str | None]:
        self.pushed_at = time.monotonic()
        return [f"m{i}" if m != "refused" else None for i, m in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        elapsed = time.monotonic() - self.pushed_at
        return [
            types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id=m))
            for m in sorted(message_ids)
            if elapsed >= self.delays[int(m[1:])]
        ]


def test_replies_are_collected_soon_after_they_arrive_not_on_a_3_s_beat() -> None:
    grid = _Grid([0.05, 0.3, 0.6])
    started = time.monotonic()
    replies = send_and_receive(grid, ["a", "b", "c"], timeout=10, interval=0.05)
    seconds = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.6 <= seconds < 1.5, seconds  # Flower's HttpGrid would wait 3 s per pull
    assert 5 <= grid.pulls <= 20


def test_a_missing_reply_ends_at_the_timeout_with_the_others() -> None:
    grid = _Grid([0.0, 99.0])
    started = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=0.5, interval=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.5 <= time.monotonic() - started < 1.5


def test_a_message_the_link_refused_is_not_waited_for() -> None:
    grid = _Grid([0.0, 0.0])
    started = time.monotonic()
    replies = send_and_receive(grid, ["a", "refused"], timeout=30, interval=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - started < 1.0


def test_the_grids_own_interval_is_kept_when_it_has_one() -> None:
    grid = _Grid([0.35])
    grid.pull_interval = 0.1  # type: ignore[attr-defined]
    send_and_receive(grid, ["a"], timeout=10)
    assert 3 <= grid.pulls <= 6


def test_a_grid_that_only_exchanges_is_used_as_it_is() -> None:
    class _Exchanging:
        def send_and_receive(self, messages: Iterable[Any], *, timeout: float) -> list[Any]:
            return [f"reply to {m}" for m in messages]

    assert send_and_receive(_Exchanging(), ["a"], timeout=1) == ["reply to a"]  # type: ignore[arg-type]
