"""The privacy ledger on real SQLite files: composition, the cap, write-ahead, concurrency,
and refusing (never resetting) a damaged file."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from fedpriv.privacy.dp import DpEvent, compose_epsilon
from fedpriv.privacy.ledger import BudgetExceeded, Ledger, LedgerError

EVENT = DpEvent(1.2, 0.125, 8)


def _reserve(ledger: Ledger, *, run: str, round_: int, budget: float = 100.0, dataset: str = "d1"):  # type: ignore[no-untyped-def]
    return ledger.reserve(
        dataset_id=dataset,
        dataset_name="digits",
        hospital="hospital-0",
        run_id=run,
        round_=round_,
        event=EVENT,
        accountant="rdp",
        delta=1e-5,
        budget_epsilon=budget,
    )


def test_spend_composes_the_whole_history_across_runs(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "h.sqlite")
    for r in range(1, 4):
        _reserve(ledger, run="run-a", round_=r)
    for r in range(1, 3):
        _reserve(ledger, run="run-b", round_=r)
    _reserve(ledger, run="run-a", round_=1, dataset="other-records")
    expected = compose_epsilon([EVENT] * 5, delta=1e-5, accountant="rdp")
    assert ledger.spent("d1", delta=1e-5, accountant="rdp") == pytest.approx(expected)
    (row,) = [r for r in ledger.summary() if r.dataset_id == "d1"]
    assert (row.runs, row.rounds) == (2, 5)
    assert row.epsilon == pytest.approx(expected)
    # reopening the file finds the same history
    again = Ledger.open(tmp_path / "h.sqlite", create=False)
    assert len(again.events("d1")) == 5


def test_a_round_past_the_cap_is_refused_and_not_recorded(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "h.sqlite")
    one = compose_epsilon([EVENT], delta=1e-5, accountant="rdp")
    two = compose_epsilon([EVENT] * 2, delta=1e-5, accountant="rdp")
    cap = (one + two) / 2
    reservation = _reserve(ledger, run="r", round_=1, budget=cap)
    assert reservation.spent_before == 0.0 and reservation.spent_after == pytest.approx(one)
    with pytest.raises(BudgetExceeded) as refused:
        _reserve(ledger, run="r", round_=2, budget=cap)
    assert refused.value.projected == pytest.approx(two) and refused.value.budget == cap
    assert len(ledger.events("d1")) == 1
    (row,) = ledger.summary()
    assert row.budget_epsilon == cap and row.remaining == pytest.approx(cap - one)


def _hammer(path: str, worker: int, rounds: int) -> None:
    ledger = Ledger.open(path)
    for r in range(rounds):
        _reserve(ledger, run=f"run-{worker}", round_=r)


def test_concurrent_writers_lose_no_event(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    Ledger.open(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer, args=(str(path), w, 15)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    events = Ledger.open(path).events("d1")
    assert len(events) == 45
    assert {e.run_id for e in events} == {"run-0", "run-1", "run-2"}


def test_a_corrupted_ledger_is_reported_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    ledger = Ledger.open(path)
    _reserve(ledger, run="r", round_=1)
    data = bytearray(path.read_bytes())
    data[0:16] = b"definitely-not-s"  # destroy the SQLite header
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="left untouched"):
        Ledger.open(path)
    with pytest.raises(LedgerError):
        _reserve(Ledger(path), run="r", round_=2)
    assert path.read_bytes() == before, "a damaged ledger is never reset or rewritten"


def test_a_foreign_sqlite_file_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "someone-elses.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE patients (id INTEGER)")
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="not a fedpriv privacy ledger"):
        Ledger.open(path)
    assert path.read_bytes() == before


def test_missing_ledger_without_create(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no privacy ledger"):
        Ledger.open(tmp_path / "none.sqlite", create=False)
    assert not (tmp_path / "none.sqlite").exists()


def test_new_ledger_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    Ledger.open(path)
    assert path.stat().st_mode & 0o777 == 0o600
