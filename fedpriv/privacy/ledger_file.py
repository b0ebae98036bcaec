"""The ledger's file: schema, safe opening and creation, and migration of older ledgers.

Every check here only reads. A ledger is created only where no file exists (built in a
temporary file, then linked into place); an existing file that cannot be used is described
and left exactly as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import math
import os
import sqlite3
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.config import ACCOUNTANTS
from fedpriv.errors import FedprivError
from fedpriv.privacy.identity import IDENTITY_RECORD, SiteKey, key_path_for
from fedpriv.privacy.spend import encode_members

__all__ = [
    "SCHEMA_VERSION",
    "LedgerError",
    "LedgerSettings",
    "check_file",
    "connect",
    "create",
    "migrate",
    "operational_error",
    "read_meta",
]

SCHEMA_VERSION = 2
_BUSY_TIMEOUT_SECONDS = 60.0
_APPLICATION_ID = 0x66707276  # "fprv": marks the file as a fedpriv ledger
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE patients (pid INTEGER PRIMARY KEY, first_seen TEXT NOT NULL);
CREATE TABLE identities (
    hash BLOB NOT NULL, pid INTEGER NOT NULL REFERENCES patients (pid),
    PRIMARY KEY (hash, pid)
) WITHOUT ROWID;
CREATE TABLE column_sets (cid INTEGER PRIMARY KEY, names TEXT NOT NULL UNIQUE);
CREATE TABLE cells (
    pid INTEGER NOT NULL REFERENCES patients (pid), cid INTEGER NOT NULL REFERENCES column_sets,
    hashes BLOB NOT NULL, PRIMARY KEY (pid, cid)
) WITHOUT ROWID;
CREATE TABLE versions (
    vid INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    members BLOB NOT NULL,
    everyone INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vid INTEGER NOT NULL REFERENCES versions (vid),
    hospital TEXT NOT NULL,
    dataset_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    unit TEXT NOT NULL,
    excluded INTEGER NOT NULL DEFAULT 0,
    recorded_at TEXT NOT NULL
);
CREATE TABLE plans (
    run_id TEXT NOT NULL, hospital TEXT NOT NULL, request TEXT NOT NULL, plan TEXT NOT NULL,
    created_at TEXT NOT NULL, PRIMARY KEY (run_id, hospital, request)
);
CREATE TABLE mechanisms (
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, rdp BLOB NOT NULL,
    PRIMARY KEY (noise_multiplier, sample_rate)
);
CREATE TABLE exact_spend (history TEXT PRIMARY KEY, epsilon REAL NOT NULL);
"""
_TABLES = {
    "meta",
    "patients",
    "identities",
    "column_sets",
    "cells",
    "versions",
    "events",
    "plans",
    "mechanisms",
    "exact_spend",
}


class LedgerError(FedprivError):
    """The ledger file cannot be used; it has been left untouched."""


@dataclasses.dataclass(frozen=True)
class LedgerSettings:
    """Fixed when a ledger is created: the lifetime cap per patient and the delta every
    run on it is composed at, the accountant, and how patients are identified."""

    budget_epsilon: float
    delta: float
    accountant: str = "prv"
    identity: str = IDENTITY_RECORD

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget_epsilon) and self.budget_epsilon > 0):
            raise LedgerError(
                f"a ledger's budget-epsilon must be a finite number > 0 (got {self.budget_epsilon})"
            )
        if not (0 < self.delta < 1):
            raise LedgerError(f"a ledger's delta must be in (0, 1) (got {self.delta})")
        if self.accountant not in ACCOUNTANTS:
            raise LedgerError(f"unknown accountant '{self.accountant}': use prv or rdp")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def operational_error(path: Path, exc: sqlite3.OperationalError) -> str:
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return (
            f"ledger '{path}' cannot be written ({text}): fedpriv records every round before "
            "training; make the file and its directory writable by this user. The file was "
            "left untouched"
        )
    if "locked" in text or "busy" in text:
        return f"ledger '{path}' is locked by another process for too long ({text}); try again"
    if "unable to open" in text:
        return f"ledger '{path}' cannot be opened ({text}): check its directory's permissions"
    return f"ledger '{path}' cannot be used ({text}); it was left untouched"


def connect(path: Path, *, writable: bool) -> sqlite3.Connection:
    """Never creates a file: ``mode=rw`` / ``mode=ro``."""
    uri = f"file:{_uri_path(path)}?mode={'rw' if writable else 'ro'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_SECONDS, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger '{path}': {exc}") from None
    return conn


def _uri_path(path: Path) -> str:
    from urllib.parse import quote

    return quote(str(path.resolve()))


def _mode_text(mode: int) -> str:
    return stat.filemode(mode)


def check_file(path: Path, *, writable: bool) -> None:
    """What is wrong with an existing ledger file, said plainly; the file is only read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise LedgerError(f"ledger '{path}' is a link to a file that does not exist") from None
    except OSError as exc:
        raise LedgerError(f"ledger '{path}' cannot be examined: {exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LedgerError(f"ledger '{path}' is not a regular file")
    # mode bits count even for root: a file its owner made unreadable is not to be read
    if not os.access(path, os.R_OK) or not info.st_mode & 0o444:
        raise LedgerError(
            f"ledger '{path}' cannot be read by this user (permissions "
            f"{_mode_text(info.st_mode)}, owner uid {info.st_uid}): give this user read and "
            "write access; the file was left untouched"
        )
    if info.st_size == 0:
        raise LedgerError(
            f"ledger '{path}' is an empty file (0 bytes), not a ledger: if it once held a "
            "history it was truncated, restore it from the site's backup; fedpriv never creates "
            "a ledger over an existing file (it was left untouched)"
        )
    with path.open("rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise LedgerError(
            f"'{path}' is not a fedpriv privacy ledger (not an SQLite database, or its header "
            "is damaged); it was left untouched: restore it from the site's backup, or point "
            "--ledger-dir / ledger-path elsewhere"
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    journal = path.with_name(path.name + "-journal")
    hot = journal.exists() and journal.stat().st_size > 0  # SQLite rolls a crash back itself
    if page_size and pages and info.st_size < page_size * pages and not hot:
        raise LedgerError(
            f"ledger '{path}' is truncated ({info.st_size} bytes, its header says "
            f"{page_size * pages}); it was left untouched: restore it from the site's backup"
        )
    if writable:
        directory = path.parent
        if not os.access(path, os.W_OK) or not info.st_mode & 0o222:
            raise LedgerError(
                f"ledger '{path}' is read-only (permissions {_mode_text(info.st_mode)}, owner "
                f"uid {info.st_uid}): fedpriv records every round before training, so the file "
                "must be writable by this user (it is fine otherwise, and was left untouched)"
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise LedgerError(
                f"the directory of ledger '{path}' is not writable by this user: SQLite keeps "
                "its journal beside the ledger, so the directory must be writable too (the "
                "ledger was left untouched)"
            )


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    except sqlite3.DatabaseError as exc:
        raise LedgerError(
            f"ledger '{path}' is damaged ({exc}); it was left untouched: restore it from the "
            "site's backup"
        ) from None
    if app_id != _APPLICATION_ID or "meta" not in tables:
        raise LedgerError(
            f"'{path}' is not a fedpriv privacy ledger; it was left untouched: point "
            "--ledger-dir / ledger-path somewhere else"
        )
    try:
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        check, meta = str(exc), {}
    if check != "ok":
        raise LedgerError(
            f"ledger '{path}' is damaged ({check}); it was left untouched: restore it from the "
            "site's backup"
        )
    version = meta.get("schema_version")
    if version == "1":
        raise LedgerError(
            f"ledger '{path}' was written by an older fedpriv (per-dataset accounting, schema "
            f"1): `fedpriv budget migrate --ledger {path}` converts it to per-patient "
            "accounting without losing an event (and keeps a copy); it was left untouched"
        )
    if version != str(SCHEMA_VERSION) or not tables >= _TABLES:
        raise LedgerError(
            f"ledger '{path}' has schema version {version}, this fedpriv reads version "
            f"{SCHEMA_VERSION}; it was left untouched"
        )
    return meta


def create(path: Path, settings: LedgerSettings, *, events: Sequence[tuple[Any, ...]] = ()) -> None:
    """A new ledger and its key, where no file exists; never over an existing file.

    The database is built in a temporary file and linked into place (``link`` fails if
    anything appeared at the path meanwhile). ``events`` (migration only): rows of an older
    ledger, recorded against every patient."""
    key_file = key_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger's directory for '{path}': {exc}") from None
    with _creation_lock(path):
        if path.exists():  # another process created it first
            return
        _create_locked(path, key_file, settings, events)


@contextlib.contextmanager
def _creation_lock(path: Path) -> Iterator[None]:
    """Serialise processes that find no ledger at once (simulated hospitals start together)."""
    lock = path.with_name(f".{path.name}.creating")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LedgerError(f"cannot create ledger '{path}': {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _create_locked(
    path: Path, key_file: Path, settings: LedgerSettings, events: Sequence[tuple[Any, ...]]
) -> None:
    if key_file.exists():
        raise LedgerError(
            f"'{key_file}' exists but its ledger '{path}' does not: was the ledger deleted? "
            "Restore it from the site's backup. Starting a new ledger would forget every "
            "patient's spend; if that is what the ethics board decided, delete the key first"
        )
    key = SiteKey.create(key_file)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("BEGIN")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            meta = {
                "schema_version": str(SCHEMA_VERSION),
                "created_at": now(),
                "budget_epsilon": repr(settings.budget_epsilon),
                "delta": repr(settings.delta),
                "accountant": settings.accountant,
                "identity": settings.identity,
                "key_check": key.check_value(),
            }
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            if events:
                conn.execute(
                    "INSERT INTO versions (vid, digest, size, members, everyone, created_at)"
                    " VALUES (1, 'everyone', 0, ?, 1, ?)",
                    (encode_members(np.empty(0, np.int64)), now()),
                )
                conn.executemany(
                    "INSERT INTO events (vid, hospital, dataset_name, run_id, round,"
                    " noise_multiplier, sample_rate, steps, unit, excluded, recorded_at)"
                    " VALUES (1, ?, ?, ?, ?, ?, ?, ?, 'record', 0, ?)",
                    events,
                )
            conn.execute("COMMIT")
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        finally:
            conn.close()
        os.chmod(tmp, 0o600)
        os.link(tmp, path)
    except FileExistsError:
        key_file.unlink(missing_ok=True)
        raise LedgerError(
            f"'{path}' appeared while the ledger was being created; it was left untouched"
        ) from None
    except BaseException:
        key_file.unlink(missing_ok=True)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def migrate(
    path: str | Path,
    *,
    identity: str = IDENTITY_RECORD,
    delta: float | None = None,
    budget_epsilon: float | None = None,
) -> tuple[Path, int]:
    """Convert a schema-1 (per-dataset) ledger to per-patient accounting, keeping every
    event: they are recorded against every patient the site will ever train (an older
    ledger did not know which patients a run touched, so this can only over-count).
    Returns the copy of the original and the number of events carried over."""
    file = Path(path).expanduser()
    check_file(file, writable=True)
    conn = connect(file, writable=False)
    try:
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version is None or version[0] != "1":
            raise LedgerError(f"ledger '{file}' is not a schema-1 ledger; nothing to migrate")
        rows = conn.execute(
            "SELECT hospital, dataset_name, run_id, round, noise_multiplier, sample_rate, steps,"
            " recorded_at, delta, accountant FROM events ORDER BY id"
        ).fetchall()
        budgets = conn.execute("SELECT budget_epsilon, delta, accountant FROM budgets").fetchall()
    except sqlite3.DatabaseError as exc:
        raise LedgerError(
            f"ledger '{file}' cannot be read ({exc}); it was left untouched"
        ) from None
    finally:
        conn.close()
    deltas = [b[1] for b in budgets] + [r[8] for r in rows]
    caps = [b[0] for b in budgets]
    accountants = [b[2] for b in budgets] + [r[9] for r in rows]
    settings = LedgerSettings(
        budget_epsilon=budget_epsilon if budget_epsilon is not None else min(caps, default=10.0),
        # the smallest delta any run used: composing at it can only report more
        delta=delta if delta is not None else min(deltas, default=1e-5),
        # the tighter accountant if any run used it (the record composes all at one)
        accountant="prv" if "prv" in accountants or not accountants else "rdp",
        identity=identity,
    )
    if key_path_for(file).exists():
        raise LedgerError(
            f"'{key_path_for(file)}' already exists beside a schema-1 ledger: move it away first "
            "(nothing was changed)"
        )
    backup = file.with_name(file.name + ".schema1.bak")
    try:
        fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LedgerError(
            f"'{backup}' already exists: move it away first (nothing was changed)"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(file.read_bytes())
        handle.flush()
        os.fsync(handle.fileno())
    staging = file.with_name(f".{file.name}.migrating")
    staging.unlink(missing_ok=True)
    key_path_for(staging).unlink(missing_ok=True)
    create(staging, settings, events=[r[:8] for r in rows])
    os.replace(key_path_for(staging), key_path_for(file))
    os.replace(staging, file)
    return backup, len(rows)
