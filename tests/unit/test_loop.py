"""The round loop's sorting of replies: trained, declined, failed, and never answered."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedpriv import messages as msg
from fedpriv.server.loop import _split_replies


def _reply(to: str, hospital: str, *, status: str | None = None, error: str | None = None) -> Any:
    record = ConfigRecord({msg.HOSPITAL_NAME: hospital})
    if status is not None:
        record[msg.STATUS] = status
        record[msg.REASON] = "budget exhausted"
    return SimpleNamespace(
        metadata=SimpleNamespace(reply_to_message_id=to, src_node_id=0),
        content=RecordDict({msg.HOSPITAL: record}),
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
    )


def test_replies_are_split_and_a_silent_hospital_counts_as_failed() -> None:
    sent = {"m1": 11, "m2": 12, "m3": 13, "m4": 14}
    replies = [
        _reply("m1", "st-mary"),
        _reply("m2", "county", status=msg.STATUS_DECLINED),
        _reply("m3", "?", error="Traceback ...\nnode unavailable"),
        # m4 never answered: the round timed out first
    ]
    ok, declined, failed = _split_replies(replies, sent)
    assert [r.metadata.reply_to_message_id for r in ok] == ["m1"]
    assert declined == {"county": "budget exhausted"}
    assert failed == {
        "node 13": "node unavailable",
        "node 14": "no reply before the round timeout (round-timeout)",
    }


def test_without_the_sent_messages_nothing_is_invented() -> None:
    ok, declined, failed = _split_replies([_reply("m1", "st-mary")])
    assert len(ok) == 1 and declined == {} and failed == {}
