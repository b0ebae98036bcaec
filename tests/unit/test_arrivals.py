"""ArrivalPulls: the server asks the link state only for replies that have arrived, and
still gets, every FULL_PULL_EVERY seconds, what only a full pull returns."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from fedpriv.server import arrivals
from fedpriv.server.arrivals import ArrivalPulls


def _reply(reply_to: str) -> Any:
    """What ArrivalPulls reads of a reply: the id of the message it answers."""
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=reply_to))


class _State:
    def __init__(self) -> None:
        self.replies: dict[str, Any] = {}

    def store_message_res(self, message: Any) -> str | None:
        if message.metadata.reply_to_message_id == "refused":
            return None  # what Flower's state does with a reply it rejects
        self.replies[message.metadata.reply_to_message_id] = message
        return "stored"


class _Grid:
    """Replies the state holds, and the ids each pull asked for."""

    def __init__(self, state: Any = None) -> None:
        self.state = state
        self.asked: list[set[str]] = []
        self.expired: set[str] = set()  # answered only by a full pull (Flower's TTL verdict)

    def pull_messages(self, ids: Any) -> list[Any]:
        ids = set(ids)
        self.asked.append(ids)
        held = self.state.replies if self.state is not None else {}
        found = [held.pop(i) for i in sorted(ids) if i in held]
        return found + [_reply(i) for i in sorted(ids & self.expired)]


def test_pulls_ask_only_for_arrived_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _Grid(_State())
    pulls = ArrivalPulls(grid)
    assert pulls.tracking
    waiting = {"a", "b", "c"}
    assert list(pulls.pull(waiting)) == [] and grid.asked == [waiting]  # the first is full
    assert list(pulls.pull(waiting)) == [] and len(grid.asked) == 1  # nothing came: no call
    grid.state.store_message_res(_reply("b"))
    grid.state.store_message_res(_reply("refused"))
    (got,) = pulls.pull(waiting)
    assert got.metadata.reply_to_message_id == "b" and grid.asked[-1] == {"b"}
    # a reply the state answers by itself (an expired TTL) comes with the next full pull
    grid.expired.add("c")
    assert list(pulls.pull({"a", "c"})) == []
    monkeypatch.setattr(arrivals, "FULL_PULL_EVERY", 0.0)
    pulls._next_full = 0.0
    (late,) = pulls.pull({"a", "c"})
    assert late.metadata.reply_to_message_id == "c" and grid.asked[-1] == {"a", "c"}


def test_a_reply_noted_but_not_returned_by_a_full_pull_is_kept() -> None:
    grid = _Grid(_State())
    pulls = ArrivalPulls(grid)
    grid.state.store_message_res(_reply("a"))
    grid.state.replies.clear()  # stored after the full pull read the state, say
    assert list(pulls.pull({"a"})) == []
    grid.state.replies["a"] = _reply("a")
    (got,) = pulls.pull({"a"})  # not full: the note is still there
    assert got.metadata.reply_to_message_id == "a" and grid.asked[-1] == {"a"}


def test_without_a_state_every_pull_is_full() -> None:
    grid = _Grid()
    grid.expired = {"x"}
    pulls = ArrivalPulls(grid)
    assert not pulls.tracking
    for _ in range(3):
        assert [r.metadata.reply_to_message_id for r in pulls.pull({"x", "y"})] == ["x"]
    assert grid.asked == [{"x", "y"}] * 3


def test_close_gives_the_state_its_method_back() -> None:
    state = _State()
    pulls = ArrivalPulls(_Grid(state))
    assert "store_message_res" in vars(state)
    pulls.close()
    assert "store_message_res" not in vars(state)
    assert state.store_message_res(_reply("z")) == "stored"
