"""How much of a hospital's DP round is privacy accounting, and what the ledger costs.

    python benchmarks/accounting.py share --partition iid        # 10 hospitals, digits
    python benchmarks/accounting.py share --partition dirichlet  # hospitals of unequal size
    python benchmarks/accounting.py ledger --patients 1000 10000 100000 --events 1000

``share`` runs the hospitals' side of a DP simulation in one process (what one simulation
worker does, without Flower): every hospital's ``train_round`` for ``--rounds`` rounds on a
fresh ledger, under cProfile. Accounting is the cumulative time of the hospital's calls
into the ledger and the noise calibration; training is the time in ``fedpriv.training.train``
(the Opacus DP-SGD loop). Imports a worker pays once (torch's optimizer machinery, Opacus)
are done before timing. It only uses ``local_data`` / ``train_round`` /
``PrivacyState``, so the same script measures an older checkout (``--before``: run it from
that checkout's root with its own package on ``sys.path``).

``ledger`` builds a ledger with ``--patients`` patients and ``--events`` events (runs of 20
rounds, patients arriving over time, five distinct mechanisms; each run's first round is a
real reservation, its other rounds copies of that event) and times one more reservation in a
fresh Ledger object (resolution of every patient, per-patient check, recording) and the next
one, a ``fedpriv budget`` summary, and reports the file's size.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The functions whose cumulative time is the hospital's accounting, old and new code alike.
ACCOUNTING = {
    ("ledger.py", "reserve"),
    ("ledger.py", "open"),
    ("ledger.py", "plan"),
    ("hospital.py", "plan_for"),
    ("hospital.py", "_privacy_report"),
    ("hospital.py", "open_ledger"),
    ("identity.py", "records"),
}
TRAINING = {("training.py", "train")}


def _cumulative(stats: pstats.Stats, wanted: set[tuple[str, str]]) -> float:
    """Time inside ``wanted`` functions, each call counted once (a wanted function called
    from another wanted one is already inside its caller's time)."""

    def short(func: tuple[str, int, str]) -> tuple[str, str]:
        return (Path(func[0]).name, func[2])

    total = 0.0
    for func, (_, _, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if short(func) not in wanted:
            continue
        for caller, (_, _, _, cumulative) in callers.items():
            if short(caller) not in wanted:
                total += cumulative
    return total


def _warm_up() -> None:
    """What a simulation worker has after its first task: torch's optimizer machinery and
    Opacus imported (several seconds on a 2-core machine, the same before and after)."""
    import opacus.accountants.analysis.prv
    import opacus.accountants.analysis.rdp  # noqa: F401
    import torch

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def share(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedpriv import messages as msg
    from fedpriv.client.hospital import PrivacyState, local_data, train_round
    from fedpriv.config import RunConfig
    from fedpriv.data import split_for
    from fedpriv.server.run import initial_weights, resolve_model

    _warm_up()
    ledgers = Path(tempfile.mkdtemp(prefix="fedpriv-accounting-"))
    config = RunConfig(
        dataset=args.dataset,
        hospitals=args.hospitals,
        partition=args.partition,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        epsilon=4.0,
        run_name="bench",
        out=str(ledgers),
    )
    dataset, _ = split_for(config)
    model_name, model_args = resolve_model(config, dataset)
    weights = initial_weights(model_name, model_args, config.seed)
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()})
    datas = [local_data(config, {"partition-id": k}) for k in range(config.hospitals)]
    record = msg.order_record(config, model_name=model_name, model_args=model_args)
    per_round = []
    profiles: list[cProfile.Profile] = []
    for server_round in range(1, config.rounds + 1):
        record[msg.SERVER_ROUND] = server_round
        order = msg.parse_order(record)
        round_profile = cProfile.Profile()
        started = time.perf_counter()
        for data in datas:
            privacy = PrivacyState(ledger_path=ledgers / f"{data.name}.sqlite", budget_epsilon=10.0)
            round_profile.enable()
            train_round(order, data, arrays, privacy=privacy)
            round_profile.disable()
        profiles.append(round_profile)
        seconds = time.perf_counter() - started
        stats = pstats.Stats(round_profile)
        per_round.append(
            {
                "round": server_round,
                "seconds": round(seconds, 3),
                "accounting": round(_cumulative(stats, ACCOUNTING), 3),
                "training": round(_cumulative(stats, TRAINING), 3),
            }
        )
        print(json.dumps(per_round[-1]), file=sys.stderr)
    stats = pstats.Stats(profiles[0])
    for extra in profiles[1:]:
        stats.add(extra)
    total = sum(r["seconds"] for r in per_round)
    accounting = _cumulative(stats, ACCOUNTING)
    training = _cumulative(stats, TRAINING)
    return {
        "benchmark": "share",
        "dataset": args.dataset,
        "partition": args.partition,
        "hospitals": args.hospitals,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "sizes": [int(d.train_labels.size) for d in datas],
        "seconds": round(total, 2),
        "accounting_seconds": round(accounting, 2),
        "training_seconds": round(training, 2),
        "accounting_share": round(accounting / total, 3),
        "round_over_training": round(total / training, 2),
        "per_round": per_round,
    }


def ledger(args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    from fedpriv.data.datasets import RecordSource
    from fedpriv.privacy.accounting import DpEvent
    from fedpriv.privacy.ledger import Ledger, LedgerSettings

    results = []
    rounds_per_run = 20
    for patients in args.patients:
        directory = Path(tempfile.mkdtemp(prefix="fedpriv-ledger-"))
        path = directory / "site.sqlite"
        book = Ledger.open(
            path,
            create=LedgerSettings(budget_epsilon=1e6, delta=1e-6, identity="patient-column:mrn"),
        )
        assert book.key is not None
        ids = np.array([f"MRN{i:08d}" for i in range(patients)], dtype=object)
        source = RecordSource(patient_ids=ids, patient_column="mrn")
        runs = max(1, args.events // rounds_per_run)
        started = time.perf_counter()
        for run in range(runs):
            # patients arrive over time: run r sees the first (r + 1) / runs of them
            upto = max(1, patients * (run + 1) // runs)
            keyed = book.key.records(source.take(np.arange(upto)))
            sigma = 0.8 + 0.05 * (run % 5)  # a few distinct mechanisms, as real runs have
            first = book.reserve(
                keyed,
                event=DpEvent(sigma, 0.01, 100),
                hospital="site",
                dataset_name="bench",
                run_id=f"run-{run}",
                round_=1,
            )
            # the run's other rounds touch the same patients: copy its first event's row
            # (a reservation each would only repeat the same work, minutes at 100k patients)
            with sqlite3.connect(path) as conn:
                conn.executemany(
                    "INSERT INTO events (vid, hospital, dataset_name, run_id, round,"
                    " noise_multiplier, sample_rate, steps, unit, excluded, recorded_at)"
                    " SELECT vid, hospital, dataset_name, run_id, ?, noise_multiplier,"
                    " sample_rate, steps, unit, excluded, recorded_at FROM events WHERE id = ?",
                    [(r + 1, first.event_id) for r in range(1, rounds_per_run)],
                )
        build_seconds = time.perf_counter() - started
        keyed = book.key.records(source)
        fresh = Ledger.open(path)  # a new process: nothing cached
        started = time.perf_counter()
        fresh.reserve(
            keyed,
            event=DpEvent(1.0, 0.01, 100),
            hospital="site",
            dataset_name="bench",
            run_id="timed",
            round_=1,
        )
        reserve_cold = time.perf_counter() - started
        started = time.perf_counter()
        fresh.reserve(
            keyed,
            event=DpEvent(1.0, 0.01, 100),
            hospital="site",
            dataset_name="bench",
            run_id="timed",
            round_=2,
        )
        reserve_warm = time.perf_counter() - started
        started = time.perf_counter()
        identity = time.perf_counter()
        book.key.records(source)
        identity = time.perf_counter() - identity
        started = time.perf_counter()
        Ledger.open(path, writable=False, need_key=False).summary()
        summary_seconds = time.perf_counter() - started
        results.append(
            {
                "benchmark": "ledger",
                "patients": patients,
                "events": runs * rounds_per_run + 2,
                "build_seconds": round(build_seconds, 2),
                "keyed_hashes_seconds": round(identity, 3),
                "reserve_new_process_seconds": round(reserve_cold, 3),
                "reserve_next_round_seconds": round(reserve_warm, 3),
                "summary_seconds": round(summary_seconds, 3),
                "file_bytes": path.stat().st_size,
            }
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("share")
    one.add_argument("--dataset", default="digits")
    one.add_argument("--hospitals", type=int, default=10)
    one.add_argument("--partition", default="iid")
    one.add_argument("--rounds", type=int, default=5)
    one.add_argument("--local-epochs", type=int, default=2)
    two = sub.add_parser("ledger")
    two.add_argument("--patients", type=int, nargs="+", default=[1000, 10000, 100000])
    two.add_argument("--events", type=int, default=1000)
    args = parser.parse_args()
    result: Any = share(args) if args.what == "share" else ledger(args)
    envelope = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "result": result,
    }
    print(json.dumps(envelope, indent=2))


if __name__ == "__main__":
    main()
