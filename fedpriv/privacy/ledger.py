"""A hospital's persistent privacy ledger (SQLite) and budget enforcement.

One file per hospital. Per dataset identity it records every DP event (noise multiplier,
sample rate, steps, accountant, delta, run, round, time). Epsilon spent is always the
composition of the *whole* history, across rounds and runs.

Write-ahead: a round's event is committed, after the budget check and in the same
transaction, *before* training starts, so a crash can over-count but never under-count.
``BEGIN IMMEDIATE`` serialises concurrent writers (two runs on one ledger), so neither can
lose an event nor both pass the check on the same remaining budget.

A file that is not a readable fedpriv ledger is reported and left exactly as it is: never
reset, never rewritten.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpriv.errors import FedprivError
from fedpriv.privacy.dp import DpEvent, compose_epsilon

__all__ = [
    "BudgetExceeded",
    "DatasetSpend",
    "Ledger",
    "LedgerError",
    "LedgerEvent",
    "Reservation",
]

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_SECONDS = 60.0
_APPLICATION_ID = 0x66707276  # "fprv": marks the file as a fedpriv ledger

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL,
    dataset_name TEXT NOT NULL,
    hospital TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    accountant TEXT NOT NULL,
    delta REAL NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX events_by_dataset ON events (dataset_id);
CREATE TABLE budgets (
    dataset_id TEXT PRIMARY KEY,
    dataset_name TEXT NOT NULL,
    hospital TEXT NOT NULL,
    budget_epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


class LedgerError(FedprivError):
    """The ledger file cannot be used; it has been left untouched."""


class BudgetExceeded(FedprivError):
    """This round would take the hospital past its privacy budget."""

    def __init__(self, *, spent: float, projected: float, budget: float) -> None:
        self.spent = spent
        self.projected = projected
        self.budget = budget
        super().__init__(
            f"privacy budget: epsilon spent {spent:.3f}, after this round {projected:.3f}, "
            f"cap {budget:.3f}"
        )


@dataclasses.dataclass(frozen=True)
class LedgerEvent:
    dataset_id: str
    dataset_name: str
    hospital: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    recorded_at: str

    @property
    def event(self) -> DpEvent:
        return DpEvent(self.noise_multiplier, self.sample_rate, self.steps)


@dataclasses.dataclass(frozen=True)
class Reservation:
    """The outcome of a successful budget check: the event is now on record."""

    spent_before: float
    spent_after: float
    budget: float


@dataclasses.dataclass(frozen=True)
class DatasetSpend:
    """One row of ``fedpriv budget``."""

    ledger: str
    hospital: str
    dataset_name: str
    dataset_id: str
    runs: int
    rounds: int
    epsilon: float
    delta: float
    accountant: str
    budget_epsilon: float

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget_epsilon - self.epsilon)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Open with :meth:`open`; every method opens and closes its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> Ledger:
        ledger = cls(Path(path))
        if not ledger.path.exists():
            if not create:
                raise LedgerError(f"no privacy ledger at '{ledger.path}'")
            try:
                ledger.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LedgerError(f"cannot create ledger directory for '{path}': {exc}") from None
        ledger._initialise()
        return ledger

    # ---- connection and schema ---------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger '{self.path}': {exc}") from None
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise LedgerError(
                f"ledger '{self.path}' is unreadable ({exc}); it was left untouched: restore it "
                "from a backup or point to another ledger"
            ) from None
        finally:
            conn.close()

    def _initialise(self) -> None:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                tables = {
                    row[0]
                    for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                if not tables and app_id == 0 and self.path.stat().st_size == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                    conn.execute(
                        "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
                    conn.execute("INSERT INTO meta VALUES ('created_at', ?)", (_now(),))
                    conn.execute("COMMIT")
                    os.chmod(self.path, 0o600)
                    return
                conn.execute("ROLLBACK")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if app_id != _APPLICATION_ID or not {"meta", "events", "budgets"} <= tables:
                raise LedgerError(
                    f"'{self.path}' is not a fedpriv privacy ledger; it was left untouched: "
                    "point --ledger-dir / ledger-path somewhere else"
                )
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise LedgerError(
                    f"ledger '{self.path}' is damaged ({check}); it was left untouched: "
                    "restore it from a backup"
                )
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if version is None or int(version[0]) != SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger '{self.path}' has schema version {version and version[0]}, this "
                    f"fedpriv reads version {SCHEMA_VERSION}"
                )

    # ---- writing -----------------------------------------------------------------------

    def reserve(
        self,
        *,
        dataset_id: str,
        dataset_name: str,
        hospital: str,
        run_id: str,
        round_: int,
        event: DpEvent,
        accountant: str,
        delta: float,
        budget_epsilon: float,
    ) -> Reservation:
        """Check the budget and, if this round fits, record its event; atomically.

        Raises :class:`BudgetExceeded` (and records nothing) if the composed epsilon after
        this round would exceed ``budget_epsilon``.
        """
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                history = self._events(conn, dataset_id)
                before = compose_epsilon(
                    [e.event for e in history], delta=delta, accountant=accountant
                )
                after = compose_epsilon(
                    [*(e.event for e in history), event], delta=delta, accountant=accountant
                )
                now = _now()
                conn.execute(
                    "INSERT INTO budgets VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(dataset_id) DO UPDATE SET budget_epsilon=excluded.budget_epsilon,"
                    " delta=excluded.delta, accountant=excluded.accountant,"
                    " updated_at=excluded.updated_at",
                    (dataset_id, dataset_name, hospital, budget_epsilon, delta, accountant, now),
                )
                if after > budget_epsilon:
                    conn.execute("COMMIT")  # the cap is recorded; the event is not
                    raise BudgetExceeded(spent=before, projected=after, budget=budget_epsilon)
                conn.execute(
                    "INSERT INTO events (dataset_id, dataset_name, hospital, run_id, round,"
                    " noise_multiplier, sample_rate, steps, accountant, delta, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        dataset_id,
                        dataset_name,
                        hospital,
                        run_id,
                        round_,
                        event.noise_multiplier,
                        event.sample_rate,
                        event.steps,
                        accountant,
                        delta,
                        now,
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return Reservation(spent_before=before, spent_after=after, budget=budget_epsilon)

    # ---- reading -----------------------------------------------------------------------

    @staticmethod
    def _events(conn: sqlite3.Connection, dataset_id: str | None) -> list[LedgerEvent]:
        query = (
            "SELECT dataset_id, dataset_name, hospital, run_id, round, noise_multiplier,"
            " sample_rate, steps, accountant, delta, recorded_at FROM events"
        )
        params: tuple[str, ...] = ()
        if dataset_id is not None:
            query += " WHERE dataset_id = ?"
            params = (dataset_id,)
        return [LedgerEvent(*row) for row in conn.execute(query + " ORDER BY id", params)]

    def events(self, dataset_id: str | None = None) -> list[LedgerEvent]:
        with self._connect() as conn:
            return self._events(conn, dataset_id)

    def spent(self, dataset_id: str, *, delta: float, accountant: str) -> float:
        return compose_epsilon(
            [e.event for e in self.events(dataset_id)], delta=delta, accountant=accountant
        )

    def summary(self) -> list[DatasetSpend]:
        """Per dataset identity: runs, rounds, epsilon spent at the recorded delta, cap."""
        with self._connect() as conn:
            budgets = {
                row[0]: row
                for row in conn.execute(
                    "SELECT dataset_id, dataset_name, hospital, budget_epsilon, delta, accountant"
                    " FROM budgets"
                )
            }
            events = self._events(conn, None)
        rows = []
        for dataset_id in sorted({e.dataset_id for e in events} | set(budgets)):
            mine = [e for e in events if e.dataset_id == dataset_id]
            budget = budgets.get(dataset_id)
            delta = budget[4] if budget else (mine[-1].delta if mine else 1e-5)
            accountant = budget[5] if budget else (mine[-1].accountant if mine else "prv")
            rows.append(
                DatasetSpend(
                    ledger=str(self.path),
                    hospital=budget[2] if budget else mine[-1].hospital,
                    dataset_name=budget[1] if budget else mine[-1].dataset_name,
                    dataset_id=dataset_id,
                    runs=len({e.run_id for e in mine}),
                    rounds=len(mine),
                    epsilon=compose_epsilon(
                        [e.event for e in mine], delta=delta, accountant=accountant
                    ),
                    delta=delta,
                    accountant=accountant,
                    budget_epsilon=budget[3] if budget else float("inf"),
                )
            )
        return rows
