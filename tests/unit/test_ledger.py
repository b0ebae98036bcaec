"""The per-patient privacy ledger on real SQLite files.

Escapes that reset a patient's budget (changing the data file between runs), per-patient
epsilons against Google's dp-accounting recomputed from the events, the cap, one delta per
ledger, damaged files refused untouched, concurrency, kill -9 at any moment, and migration
of a ledger written by the previous (per-dataset) code.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedpriv.data import load_dataset
from fedpriv.data.datasets import RecordSource
from fedpriv.privacy.accounting import DpEvent, compose_epsilon
from fedpriv.privacy.identity import key_path_for
from fedpriv.privacy.ledger import Ledger, LedgerError, LedgerSettings, migrate

FIXTURES = Path(__file__).parent.parent / "fixtures"
EVENT = DpEvent(1.2, 0.125, 8)
ONE = compose_epsilon([EVENT], delta=1e-5, accountant="prv")
TWO = compose_epsilon([EVENT, EVENT], delta=1e-5, accountant="prv")
#: a cap that lets every patient take one round of EVENT, and none a second
ONE_ROUND_CAP = (ONE + TWO) / 2


def google_epsilon(events: list[DpEvent], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for e in events:
        accountant.compose(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(
                    e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
        )
    return float(accountant.get_epsilon(delta))


def settings(
    cap: float = 100.0, *, identity: str = "record", delta: float = 1e-5
) -> LedgerSettings:
    return LedgerSettings(budget_epsilon=cap, delta=delta, identity=identity)


def reserve(ledger: Ledger, source: RecordSource, *, run: str = "run", round_: int = 1, **kw):  # type: ignore[no-untyped-def]
    assert ledger.key is not None
    return ledger.reserve(
        ledger.key.records(source),
        event=kw.pop("event", EVENT),
        hospital=kw.pop("hospital", "st-mary"),
        dataset_name="site.csv",
        run_id=run,
        round_=round_,
        **kw,
    )


# ---- data files that change between studies -----------------------------------------------

HEADER = ["age", "bp", "chol", "label"]


def _rows(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [
        [
            str(rng.randint(20, 90)),
            f"{rng.uniform(90, 180):.1f}",
            f"{rng.uniform(3, 8):.2f}",
            str(i % 2),
        ]
        for i in range(n)
    ]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _source(path: Path, **kw: str) -> RecordSource:
    return load_dataset(
        str(path), label_column=kw.get("label", "label"), patient_column=kw.get("patient", "")
    ).source


def _drop(
    header: list[str], rows: list[list[str]], column: str
) -> tuple[list[str], list[list[str]]]:
    i = header.index(column)
    return [h for h in header if h != column], [
        [v for j, v in enumerate(r) if j != i] for r in rows
    ]


# change: (new header and rows from the old ones, how many records are new)
RECORD_MODE_CHANGES = {
    "append one record": (lambda h, r: (h, [*r, ["55", "130.0", "5.55", "1"]]), 1),
    "reorder records": (lambda h, r: (h, list(reversed(r))), 0),
    "remove records": (lambda h, r: (h, r[5:]), 0),
    "reorder columns": (lambda h, r: (h[::-1], [x[::-1] for x in r]), 0),
    "reformat numbers": (lambda h, r: (h, [[f"{float(x[0]):.2f}", *x[1:]] for x in r]), 0),
    "drop a feature column": (lambda h, r: _drop(h, r, "chol"), 0),
    "add a feature column": (
        lambda h, r: ([*h, "bmi"], [[*x, str(20 + i % 7)] for i, x in enumerate(r)]),
        0,
    ),
}


@pytest.mark.parametrize("change", sorted(RECORD_MODE_CHANGES))
def test_a_changed_file_keeps_every_patients_history_without_a_patient_column(
    tmp_path: Path, change: str
) -> None:
    """Before, the ledger keyed a site's budget by a hash of its whole (standardised) file,
    so each of these changes gave every record a fresh budget."""
    rows = _rows(40)
    original = _write(tmp_path / "site.csv", HEADER, rows)
    ledger = Ledger.open(tmp_path / "l.sqlite", create=settings(ONE_ROUND_CAP))
    first = reserve(ledger, _source(original))
    assert not first.declined and first.patients == 40
    transform, new = RECORD_MODE_CHANGES[change]
    header, changed_rows = transform(HEADER, rows)
    changed = _write(tmp_path / "changed.csv", header, changed_rows)
    second = reserve(ledger, _source(changed), run="next", min_patients=1)
    # every record already seen is recognised, and is at the cap: only new ones may train
    assert second.excluded == len(changed_rows) - new, change
    assert second.patients == new
    assert bool(second.declined) == (new == 0)


def test_changing_the_label_column_keeps_history(tmp_path: Path) -> None:
    rows = _rows(30)
    path = _write(tmp_path / "site.csv", HEADER, rows)
    ledger = Ledger.open(tmp_path / "l.sqlite", create=settings(ONE_ROUND_CAP))
    assert reserve(ledger, _source(path)).patients == 30
    # the same file, another study: 'age' is now what is predicted, 'label' a feature
    second = reserve(ledger, _source(path, label="age"), run="next")
    assert second.declined and second.excluded == 30


def test_patients_keep_their_history_across_every_change_when_named(tmp_path: Path) -> None:
    rows = [[f"P{i // 3:03d}", *r] for i, r in enumerate(_rows(60))]  # 20 patients, 3 records each
    header = ["mrn", *HEADER]
    path = _write(tmp_path / "site.csv", header, rows)
    ledger = Ledger.open(
        tmp_path / "l.sqlite", create=settings(ONE_ROUND_CAP, identity="patient-column:mrn")
    )
    first = reserve(ledger, _source(path, patient="mrn"))
    assert first.patients == 20 and np.bincount(first.units).tolist() == [3] * 20
    # drop a column, relabel, reorder, and add two records of a new patient
    h2, r2 = _drop(header, rows, "bp")
    r2 = [*reversed(r2), ["P900", "40", "5.0", "1"], ["P900", "41", "5.1", "1"]]
    changed = _write(tmp_path / "v2.csv", h2, r2)
    second = reserve(ledger, _source(changed, patient="mrn", label="chol"), run="v2")
    assert second.excluded == 20 and second.patients == 1
    assert second.records.sum() == 2, "both records of the new patient train, as one unit"
    spend = ledger.patient("P000")
    assert spend.known and spend.events == 1
    assert ledger.patient("P900").events == 1
    assert not ledger.patient("nobody").known


def test_one_way_of_identifying_patients_per_ledger(tmp_path: Path) -> None:
    rows = [[str(1000 + i), *r] for i, r in enumerate(_rows(10))]  # numeric IDs: a feature too
    path = _write(tmp_path / "site.csv", ["mrn", *HEADER], rows)
    ledger = Ledger.open(tmp_path / "l.sqlite", create=settings())
    reserve(ledger, _source(path))  # without the patient column: records
    with pytest.raises(LedgerError, match="identifies patients by the content of each record"):
        reserve(ledger, _source(path, patient="mrn"))


# ---- per-patient spend, checked independently ------------------------------------------------


def test_each_patients_epsilon_is_the_composition_of_the_events_it_was_in(tmp_path: Path) -> None:
    ids = np.array([f"P{i}" for i in range(30)], dtype=object)
    everyone = RecordSource(patient_ids=ids, patient_column="mrn")
    ledger = Ledger.open(tmp_path / "l.sqlite", create=settings(identity="patient-column:mrn"))
    a, b, c = DpEvent(1.1, 0.1, 20), DpEvent(0.9, 0.25, 8), DpEvent(1.5, 0.05, 100)
    history: dict[str, list[DpEvent]] = {str(p): [] for p in ids}
    plan = [  # (patients in the call, event): runs on changing subsets of the site's patients
        (np.arange(0, 20), a),
        (np.arange(0, 20), a),
        (np.arange(10, 30), b),
        (np.arange(25, 30), c),
        (np.arange(0, 30), b),
    ]
    for k, (rows, event) in enumerate(plan):
        result = reserve(ledger, everyone.take(rows), event=event, round_=k + 1, exact=True)
        assert not result.declined
        for p in ids[rows]:
            history[str(p)].append(event)
    for patient in ("P0", "P12", "P22", "P27"):
        spend = ledger.patient(patient, exact=True)
        expected = google_epsilon(history[patient], 1e-5)
        assert spend.exact and spend.epsilon == pytest.approx(expected, rel=0.03), patient
    summary = ledger.summary(exact=True)
    worst = max(google_epsilon(h, 1e-5) for h in history.values())
    assert summary.max_epsilon == pytest.approx(worst, rel=0.03)
    assert summary.patients == 30 and summary.events == 5
    assert sum(n for _, _, n in summary.groups) == 30
    # the groups are the distinct histories (P0-9, P10-19, P20-24, P25-29)
    assert len(summary.groups) == 4


def test_the_fast_bound_never_undercuts_the_exact_epsilon(tmp_path: Path) -> None:
    """Every round is checked with the RDP bound; only near the cap is the exact one asked."""
    ids = np.array([f"P{i}" for i in range(5)], dtype=object)
    ledger = Ledger.open(tmp_path / "l.sqlite", create=settings(identity="patient-column:mrn"))
    source = RecordSource(patient_ids=ids, patient_column="mrn")
    for r in range(1, 6):
        fast = reserve(ledger, source, round_=r)
        assert not fast.exact
    exact = ledger.patient("P0", exact=True)
    assert ledger.patient("P0").epsilon >= exact.epsilon
    assert exact.epsilon == pytest.approx(google_epsilon([EVENT] * 5, 1e-5), rel=0.03)


# ---- the cap ---------------------------------------------------------------------------------


def test_patients_at_the_cap_are_left_out_and_counted(tmp_path: Path) -> None:
    ids = np.array([f"P{i}" for i in range(20)], dtype=object)
    source = RecordSource(patient_ids=ids, patient_column="mrn")
    ledger = Ledger.open(
        tmp_path / "l.sqlite", create=settings(ONE_ROUND_CAP, identity="patient-column:mrn")
    )
    reserve(ledger, source.take(np.arange(12)))  # 12 patients spend their budget
    second = reserve(ledger, source, run="b", min_patients=5)
    assert second.excluded == 12 and second.patients == 8
    assert second.epsilon_after <= ONE_ROUND_CAP
    assert not second.included[second.units[:12]].any()
    assert second.included[second.units[12:]].all()
    # too few left: the hospital declines and nothing is recorded
    third = reserve(ledger, source, run="c", min_patients=5)
    assert third.declined and "fewer than the 5 needed" in third.declined
    assert len(ledger.events()) == 2
    summary = ledger.summary()
    assert summary.at_or_over == 0  # nobody passed the cap
    assert ledger.summary(threshold=ONE * 0.99).at_or_over == 20


def test_a_declined_round_reports_the_exact_spend(tmp_path: Path) -> None:
    ids = np.array([f"P{i}" for i in range(5)], dtype=object)
    source = RecordSource(patient_ids=ids, patient_column="mrn")
    ledger = Ledger.open(
        tmp_path / "l.sqlite", create=settings(ONE_ROUND_CAP, identity="patient-column:mrn")
    )
    reserve(ledger, source)
    declined = reserve(ledger, source, round_=2)
    assert declined.declined and declined.exact
    assert declined.epsilon_after == pytest.approx(ONE, rel=1e-6)


# ---- one cap and one delta per ledger ---------------------------------------------------------


def test_a_ledger_refuses_a_larger_delta_a_higher_cap_and_notes_a_lower_one(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.sqlite", create=settings(4.0, delta=1e-5))
    with pytest.raises(LedgerError, match=r"delta 0.001 is larger than the delta 1e-05"):
        ledger.check_request(settings(4.0, delta=1e-3))
    with pytest.raises(LedgerError, match="cannot be raised"):
        ledger.check_request(settings(10.0, delta=1e-5))
    assert ledger.check_request(settings(4.0, delta=1e-6)) == []
    (notice,) = ledger.check_request(settings(2.0, delta=1e-5))
    assert "the lower cap applies to this run" in notice
    # reopening finds the settings it was created with, whatever is asked now
    again = Ledger.open(tmp_path / "l.sqlite", create=settings(9.0, delta=1e-3))
    assert (again.settings.budget_epsilon, again.settings.delta) == (4.0, 1e-5)


@pytest.mark.parametrize("cap", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_ledger_cannot_be_created_with_a_meaningless_cap(cap: float) -> None:
    with pytest.raises(LedgerError, match="finite number > 0"):
        settings(cap)


# ---- damage is never a reset ------------------------------------------------------------------


def _made(tmp_path: Path) -> Path:
    """A ledger with 5 patients and one round on record."""
    path = tmp_path / "l.sqlite"
    ledger = Ledger.open(path, create=settings())
    reserve(ledger, _source(_write(tmp_path / "s.csv", HEADER, _rows(5))))
    return path


def _foreign(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE patients (id INTEGER)")


DAMAGE = {
    "empty file": (lambda p: p.write_bytes(b""), "empty file \\(0 bytes\\)"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    "garbage": (lambda p: p.write_bytes(b"x" * 5000), "not a fedpriv privacy ledger"),
    "foreign sqlite": (_foreign, "not a fedpriv privacy ledger"),
    "read-only": (lambda p: p.chmod(0o444), "is read-only .*was left untouched"),
    "unreadable": (lambda p: p.chmod(0o000), "cannot be read by this user"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_ledger_is_refused_with_what_is_wrong_and_never_rewritten(
    tmp_path: Path, damage: str
) -> None:
    path = _made(tmp_path)
    act, message = DAMAGE[damage]
    act(path)
    mode = path.stat().st_mode
    path.chmod(0o600)
    before = path.read_bytes()
    path.chmod(mode)
    with pytest.raises(LedgerError, match=message) as refused:
        Ledger.open(path, create=settings())
    if damage == "read-only":
        assert "backup" not in str(refused.value), "a read-only file is fine: no restore"
    path.chmod(0o600)
    assert path.read_bytes() == before, "a damaged ledger is never reset or rewritten"


def test_a_read_only_ledger_can_still_be_read(tmp_path: Path) -> None:
    path = _made(tmp_path)
    path.chmod(0o444)
    assert Ledger.open(path, writable=False).summary().patients == 5


def test_the_key_is_checked_and_never_recreated_for_an_existing_ledger(tmp_path: Path) -> None:
    path = _made(tmp_path)
    key = key_path_for(path)
    saved = key.read_bytes()
    key.unlink()
    with pytest.raises(LedgerError, match=r"key .* is missing.*restore it"):
        Ledger.open(path, create=settings())
    assert not key.exists()
    key.write_bytes(b"00" * 32 + b"\n")
    with pytest.raises(LedgerError, match="is not the key of ledger"):
        Ledger.open(path)
    key.write_bytes(saved)
    # a key whose ledger is gone: deleting the ledger alone never starts a fresh budget
    path.unlink()
    with pytest.raises(LedgerError, match=r"exists but its ledger .* does not"):
        Ledger.open(path, create=settings())
    assert not path.exists()


def test_a_new_ledger_and_its_key_are_private_to_their_owner(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    Ledger.open(path, create=settings())
    assert path.stat().st_mode & 0o777 == 0o600
    assert key_path_for(path).stat().st_mode & 0o777 == 0o600


def test_missing_ledger_without_create(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no privacy ledger"):
        Ledger.open(tmp_path / "none.sqlite")
    assert not (tmp_path / "none.sqlite").exists()


# ---- concurrency and crashes ------------------------------------------------------------------


def _hammer(path: str, worker: int, rounds: int) -> None:
    ledger = Ledger.open(path)
    source = RecordSource(
        patient_ids=np.array([f"P{i}" for i in range(50)], dtype=object), patient_column="mrn"
    )
    for r in range(rounds):
        reserve(ledger, source, run=f"run-{worker}", round_=r)


def test_concurrent_writers_lose_no_event(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    Ledger.open(path, create=settings(1e9, identity="patient-column:mrn"))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer, args=(str(path), w, 10)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=180)
        assert w.exitcode == 0
    events = Ledger.open(path).events()
    assert len(events) == 30
    assert {e.run_id for e in events} == {"run-0", "run-1", "run-2"}
    assert Ledger.open(path).summary().patients == 50, "no patient was created twice"


def _reserve_forever(path: str, acknowledged: str) -> None:
    ledger = Ledger.open(path)
    source = RecordSource(
        patient_ids=np.array([f"P{i}" for i in range(200)], dtype=object), patient_column="mrn"
    )
    with open(acknowledged, "a") as out:
        for r in range(1_000_000):
            result = reserve(ledger, source, round_=r, event=DpEvent(50.0, 0.01, 1))
            out.write(f"{result.event_id}\n")
            out.flush()
            os.fsync(out.fileno())


def test_kill_9_at_any_moment_never_undercounts(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    acknowledged = tmp_path / "acked.txt"
    Ledger.open(path, create=settings(1e9, identity="patient-column:mrn"))
    acknowledged.touch()
    context = multiprocessing.get_context("spawn")
    rng = random.Random(1)
    for _ in range(4):
        done = len(acknowledged.read_text().split())
        process = context.Process(target=_reserve_forever, args=(str(path), str(acknowledged)))
        process.start()
        deadline = time.monotonic() + 120
        while len(acknowledged.read_text().split()) == done and time.monotonic() < deadline:
            time.sleep(0.05)  # the child is in its loop once it acknowledged a round
        time.sleep(rng.random() * 0.3)  # then somewhere in a reservation, or between two
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        ledger = Ledger.open(path)  # opens (SQLite rolls back an interrupted write)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        recorded = {e.id for e in ledger.events()}
        acked = {int(x) for x in acknowledged.read_text().split()}
        assert acked <= recorded, "a round the hospital went on to train is always on record"
    assert len(recorded) >= 4
    # and it goes on: a new round after the crashes is recorded
    one = RecordSource(patient_ids=np.array(["P0"], dtype=object), patient_column="mrn")
    assert reserve(Ledger.open(path), one, run="after").event_id


# ---- migration of a ledger written by the previous code ----------------------------------------


def test_a_schema_1_ledger_is_refused_until_migrated_and_migration_keeps_every_event(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite"
    shutil.copy(FIXTURES / "ledger-schema1.sqlite", path)
    original = path.read_bytes()
    with pytest.raises(LedgerError, match=r"older fedpriv .*budget migrate"):
        Ledger.open(path)
    assert path.read_bytes() == original
    backup, count = migrate(path)
    assert count == 6 and backup.read_bytes() == original
    ledger = Ledger.open(path)
    assert ledger.settings.delta == 1e-6, "the smallest delta any run used"
    assert ledger.settings.budget_epsilon == 6.0, "the smallest cap recorded"
    events = ledger.events()
    assert [(e.run_id, e.round) for e in events] == [
        ("run-a", 1),
        ("run-a", 2),
        ("run-a", 3),
        ("run-b", 1),
        ("run-b", 2),
        ("run-c", 1),
    ]
    # old events count against every patient the site trains from now on
    legacy = [e.event for e in events]
    result = reserve(ledger, _source(_write(tmp_path / "s.csv", HEADER, _rows(3))), exact=True)
    assert result.epsilon_before >= compose_epsilon(legacy, delta=1e-6, accountant="prv")
    assert result.epsilon_after == pytest.approx(google_epsilon([*legacy, EVENT], 1e-6), rel=0.03)
    with pytest.raises(LedgerError, match="not a schema-1 ledger"):
        migrate(path)
