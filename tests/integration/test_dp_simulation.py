"""DP in real Flower simulations: the accounted epsilon, the ledger across runs, the cap,
and client-level DP. Epsilons are re-derived with Google's dp-accounting."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import fedpriv
from fedpriv.config import RunConfig
from fedpriv.privacy.dp import DpEvent, compose_epsilon
from fedpriv.privacy.ledger import Ledger
from tests.reference_dp import google_epsilon


def _epsilon(events: list[dict], delta: float) -> float:
    return compose_epsilon(
        [DpEvent(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events],
        delta=delta,
        accountant="rdp",
    )


def test_dp_run_accounts_every_round_and_learns(tmp_path: Path) -> None:
    config = RunConfig(
        dataset="breast-cancer",
        hospitals=5,
        rounds=10,
        epsilon=4.0,
        out=str(tmp_path),
        run_name="dp",
    )
    result = fedpriv.simulate(config)
    assert not result.stopped
    rows = result.rows
    assert result.final["test_accuracy"] >= 0.85, "DP-SGD at epsilon 4 still learns"
    names = {f"hospital-{k}" for k in range(5)}
    # an upper bound (RDP) every round, growing; the exact (PRV) epsilon at the last round
    assert not any(row["epsilon_exact"] for row in rows[:-1]) and rows[-1]["epsilon_exact"]
    for earlier, later in itertools.pairwise(rows[:-1]):
        assert set(later["epsilon"]) == names
        assert all(later["epsilon"][h] > earlier["epsilon"][h] for h in names)
    assert all(rows[-1]["epsilon"][h] > rows[-3]["epsilon"][h] for h in names)
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    assert privacy["dp_level"] == "sample"
    for name, report in privacy["hospitals"].items():
        for key in (
            "epsilon",
            "delta",
            "accountant",
            "budget_epsilon",
            "noise_multiplier",
            "sample_rate",
            "events",
        ):
            assert key in report, key
        # the most spent patient's history: this run's one mechanism, every round of it
        (event,) = report["events"]
        assert event["steps"] == 10 * report["steps_per_round"]
        # the run's accountant survived across rounds (context.state): it saw every step
        assert report["run_accountant_steps"] == event["steps"]
        assert report["epsilon_exact"], "the last round records the exact epsilon"
        assert report["epsilon"] <= 4.0
        assert report["patients"] > 0 and report["excluded_for_budget"] == 0
        assert report["epsilon"] == pytest.approx(rows[-1]["epsilon"][name])
        # anyone can recompute the figure from the listed events
        assert google_epsilon(report["events"], report["delta"]) == pytest.approx(
            report["epsilon"], rel=0.03
        )
    assert privacy["max_epsilon"] == pytest.approx(max(rows[-1]["epsilon"].values()))
    assert privacy["dp_claim"] and privacy["max_epsilon_exact"]


def test_a_second_run_starts_from_the_first_runs_spend_and_stops_at_the_cap(
    tmp_path: Path,
) -> None:
    ledgers = tmp_path / "ledgers"
    common = {
        "dataset": "breast-cancer",
        "hospitals": 3,
        "rounds": 3,
        "epsilon": 3.0,
        "ledger-dir": str(ledgers),
        "out": str(tmp_path),
        "accountant": "rdp",
    }
    first = fedpriv.simulate(RunConfig.from_mapping({**common, "run-name": "first"}))
    assert not first.stopped
    spent = first.final["epsilon"]
    assert all(2.5 < e <= 3.0 for e in spent.values())
    # a cap that leaves room for exactly one more round of the same mechanism
    report = json.loads((first.run_dir / "privacy.json").read_text())["hospitals"]

    def plus(r: dict, rounds: int) -> list[dict]:  # the history and `rounds` more rounds
        (e,) = r["events"]
        return [{**e, "steps": e["steps"] + rounds * r["steps_per_round"]}]

    one_more = max(_epsilon(plus(r, 1), r["delta"]) for r in report.values())
    two_more = min(_epsilon(plus(r, 2), r["delta"]) for r in report.values())
    assert one_more < two_more
    cap = (one_more + two_more) / 2
    second = fedpriv.simulate(
        RunConfig.from_mapping({**common, "run-name": "second", "budget-epsilon": cap})
    )
    # the second run continued the first run's spend, then every hospital hit its cap
    assert second.rows, "one round fitted under the cap"
    assert all(second.rows[0]["epsilon"][h] > spent[h] for h in spent)
    assert second.stopped and "declines" in second.stopped
    assert second.last_round == 1
    (path,) = ledgers.glob("*.sqlite")
    summary = Ledger.open(path, writable=False).summary(exact=True)
    assert summary.runs == 2 and summary.max_epsilon <= cap
    assert summary.events == 3 * 4, "the declined round was never recorded"
    privacy = json.loads((second.run_dir / "privacy.json").read_text())
    assert all(r["status"] == "declined" for r in privacy["hospitals"].values())
    assert all(
        r["patients"] == 0 and r["excluded_for_budget"] > 0 for r in privacy["hospitals"].values()
    )


def test_client_level_dp_reports_a_hospital_level_epsilon(tmp_path: Path) -> None:
    config = RunConfig(
        dataset="breast-cancer",
        hospitals=3,
        rounds=2,
        dp_level="both",
        client_noise_multiplier=0.8,
        client_clip_norm=2.0,
        out=str(tmp_path),
        run_name="c",
    )
    result = fedpriv.simulate(config)
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    client = privacy["client_level"]
    assert client["rounds"] == 2 and client["sample_rate"] == 1.0
    assert client["epsilon"] == pytest.approx(
        google_epsilon(client["events"], client["delta"]), rel=0.03
    )
    assert result.final["client_epsilon"] == pytest.approx(client["epsilon"])
    assert set(privacy["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
