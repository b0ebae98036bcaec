"""The lifetime budget in real Flower simulations: a changed data file, a larger delta and a
hospital that does no DP accounting cannot get around it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedpriv
from fedpriv.config import RunConfig
from fedpriv.data import load_dataset
from fedpriv.errors import ConfigError
from fedpriv.privacy.ledger import Ledger
from fedpriv.report import build_report
from fedpriv.server.simulation import prepare_simulation, run_plan


def _csv(path: Path, rows: int, extra: int = 0) -> Path:
    """breast-cancer as a site would export it: raw values, a label column."""
    data = load_dataset("breast-cancer")
    columns = list(data.source.columns)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in range(rows + extra):
            writer.writerow([repr(float(data.source.numeric[c][i])) for c in columns])
    return path


@pytest.mark.slow  # `make test-slow`
def test_appending_a_record_or_asking_a_larger_delta_does_not_reset_anyones_budget(
    tmp_path: Path,
) -> None:
    ledgers = tmp_path / "ledgers"
    common = {
        "hospitals": 3,
        "rounds": 2,
        "epsilon": 3.0,
        "budget-epsilon": 3.2,
        "accountant": "rdp",
        "ledger-dir": str(ledgers),
        "out": str(tmp_path),
    }
    first = fedpriv.simulate(
        RunConfig.from_mapping(
            {**common, "dataset": str(_csv(tmp_path / "v1.csv", 300)), "run-name": "v1"}
        )
    )
    assert not first.stopped and first.last_round == 2
    # the same patients plus one appended record: before, every hospital trained again from
    # zero (the file hashed differently). Now every patient who trained is at its cap and
    # left out; the records the new split gives to training for the first time may train.
    second = fedpriv.simulate(
        RunConfig.from_mapping(
            {**common, "dataset": str(_csv(tmp_path / "v2.csv", 300, extra=1)), "run-name": "v2"}
        )
    )

    def trained(run: Path) -> set[int]:
        split = json.loads((run / "partitions.json").read_text())
        return {i for h in split["hospitals"] for i in h["train"]}

    again = trained(first.run_dir) & trained(second.run_dir)
    assert len(again) > 100
    privacy = json.loads((second.run_dir / "privacy.json").read_text())
    excluded = [r["excluded_for_budget"] for r in privacy["hospitals"].values()]
    assert sum(excluded) == len(again), "exactly the patients who trained before"
    (ledger_file,) = ledgers.glob("*.sqlite")
    summary = Ledger.open(ledger_file, writable=False).summary(exact=True)
    assert summary.max_epsilon <= 3.2 and summary.at_or_over == 0
    assert summary.patients == len(trained(first.run_dir) | trained(second.run_dir))
    # the same records at a larger delta: refused before anything starts
    with pytest.raises(ConfigError, match="larger than the delta 1e-05"):
        prepare_simulation(
            RunConfig.from_mapping(
                {**common, "dataset": str(tmp_path / "v1.csv"), "delta": 1e-3, "run-name": "v3"}
            )
        )
    assert not (tmp_path / "v3").exists()


# A Flower quickstart-style ClientApp: trains (here: returns the model) and reports
# metrics, and knows nothing of DP or of fedpriv's privacy reports.
stock = ClientApp()


@stock.train()
def _train(message: Message, context: object) -> Message:
    content = RecordDict(
        {
            "arrays": message.content.array_records["arrays"],
            "metrics": MetricRecord({"num-examples": 50, "train_loss": 0.3}),
        }
    )
    return Message(content=content, reply_to=message)


@stock.evaluate()
def _evaluate(message: Message, context: object) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 20, "eval_acc": 0.5})})
    return Message(content=content, reply_to=message)


def test_a_client_without_dp_accounting_voids_the_runs_dp_claim(tmp_path: Path) -> None:
    """Before, privacy.json said "dp": true with no hospital accounted, and the report
    showed "dp True, epsilon 4.000"."""
    plan = prepare_simulation(RunConfig(hospitals=2, rounds=2, out=str(tmp_path), run_name="s"))
    result = run_plan(plan, client_app=stock)
    assert result.rows
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    assert privacy["dp"] is False and privacy["dp_claim"] is False
    assert privacy["unaccounted"] and "max_epsilon" not in privacy
    assert all(row.get("unaccounted") and not row["epsilon"] for row in result.rows)
    report = build_report(result.run_dir).read_text()
    assert "No DP guarantee" in report and "4.000" not in report
