"""Normalisation from federated statistics in a real Flower simulation: every hospital
releases its noisy sums once (a ledger event), the server's combination reaches every
hospital and the run directory, the composed epsilon stays at the run's target (checked
with Google's dp-accounting), and a resumed run asks for no second release (a second
request is refused by the hospital anyway: tests/unit/test_feature_statistics.py); a lying
hospital is capped and a malformed release rejected while the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedpriv
from fedpriv import messages as msg
from fedpriv.client import handlers as fedpriv_app
from fedpriv.config import RunConfig
from fedpriv.data import dataset_for
from fedpriv.data.schema import builtin_schema
from fedpriv.data.splits import split_for
from fedpriv.privacy.accounting import statistics_event
from fedpriv.privacy.ledger import Ledger
from fedpriv.privacy.statistics import COUNT_WEIGHT, SQUARE_WEIGHT, STATS_SUMS, influence_bound
from fedpriv.server.prepare import prepare_run
from fedpriv.server.rundir import RunDirectory
from fedpriv.server.simulation import prepare_simulation, run_plan
from fedpriv.server.statistics import needs_statistics
from tests.reference_dp import google_epsilon


def test_federated_statistics_run_end_to_end_and_are_charged_once(tmp_path: Path) -> None:
    config = RunConfig(
        dataset="breast-cancer",
        hospitals=3,
        rounds=1,
        normalisation="federated",
        accountant="rdp",
        out=str(tmp_path),
        run_name="fed",
        insecure_dp_seed=0,
    )
    result = fedpriv.simulate(config)
    assert not result.stopped and result.rows[-1]["test_accuracy"] is not None
    names = {f"hospital-{k}" for k in range(3)}
    # the server's combination, in config.json: what every hospital normalised with
    run_config, _, _ = RunDirectory.open(result.run_dir).read_config()
    reference = json.loads(run_config.feature_statistics)
    schema = builtin_schema("breast-cancer")
    assert schema is not None and set(reference) == set(schema.feature_names)
    statistics = json.loads((result.run_dir / "statistics.json").read_text())
    assert statistics["released"] == 3 and set(statistics["hospitals"]) == names
    assert all(h["status"] == "released" for h in statistics["hospitals"].values())
    # the central test split is normalised by them too: (x - centre) / scale
    dataset = dataset_for(run_config)
    assert dataset.raw_features is not None
    centre, scale = reference["mean radius"]
    assert np.allclose(dataset.features[:, 0], (dataset.raw_features[:, 0] - centre) / scale)
    # an auditor reloads the run with the inputs the model was trained and tested on
    from fedpriv.privacy.audit.run import load_run

    audited = load_run(result.run_dir)
    assert audited.dataset is not None
    assert np.allclose(audited.dataset.features, dataset.features)
    # the ledger holds one release per hospital (round 0) before its training round
    event = statistics_event(run_config)
    assert event is not None
    ledger = Ledger.open(tmp_path / "fed" / "ledgers" / "simulated-hospitals.sqlite")
    releases = [e for e in ledger.events() if e.round == 0]
    assert {e.hospital for e in releases} == names and len(releases) == 3
    assert all((e.noise_multiplier, e.sample_rate, e.steps) == event.as_tuple() for e in releases)
    # each hospital's reported history composes release and training, at most the target
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    assert privacy["statistics_release"]["event"]["noise_multiplier"] == event.noise_multiplier
    for report in privacy["hospitals"].values():
        events = report["events"]
        assert {(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events} >= {
            event.as_tuple()
        }
        assert len(events) == 2 and report["epsilon"] <= config.epsilon
        assert google_epsilon(events, config.delta) <= config.epsilon + 0.02

    # a resumed run takes the statistics from config.json: no second release is asked for
    plan = prepare_run(config.replace(rounds=2), resume_dir=result.run_dir, central=False)
    assert plan.config.feature_statistics == run_config.feature_statistics
    assert not needs_statistics(plan.config)


# fedpriv's ClientApp, except that two hospitals lie in their statistics release: hospital 0
# claims a billion patients with every value at the top of every range, hospital 1 sends NaN
lying = ClientApp()


@lying.train()
def _train(message: Message, context: Context) -> Message:
    return fedpriv_app.handle_train(message, context)


@lying.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    return fedpriv_app.handle_evaluate(message, context)


@lying.query()
def _query(message: Message, context: Context) -> Message:
    reply = fedpriv_app.handle_query(message, context)
    record = reply.content.config_records.get(msg.STATISTICS)
    partition = int(context.node_config["partition-id"])
    if record is not None and partition in (0, 1):
        sums = list(record[STATS_SUMS])  # type: ignore[arg-type]
        d = (len(sums) - 1) // 2
        if partition == 0:
            n = 1e9
            sums = [COUNT_WEIGHT * n] + [0.5 * n] * d + [SQUARE_WEIGHT * n * 0.125] * d
        else:
            sums[1] = float("nan")
        record[STATS_SUMS] = sums
    return reply


@pytest.mark.slow  # `make test-slow`: six hospitals; the server path runs in make test
def test_a_lying_hospital_is_capped_and_a_malformed_one_rejected_in_a_real_simulation(
    tmp_path: Path,
) -> None:
    """Six hospitals; one claims a billion patients at the top of every range (plausible
    shape, so only the weight cap stops it), one sends NaN (rejected). The run trains on; the
    liar's share stays within the documented bound and no centre is pulled past it (beyond
    the honest estimate's noise)."""
    config = RunConfig(
        dataset="breast-cancer",
        hospitals=6,
        rounds=1,
        normalisation="federated",
        accountant="rdp",
        out=str(tmp_path),
        run_name="liars",
        insecure_dp_seed=0,
    )
    result = run_plan(prepare_simulation(config), client_app=lying)
    assert not result.stopped and result.rows[-1]["test_accuracy"] is not None
    statistics = json.loads((result.run_dir / "statistics.json").read_text())
    assert set(statistics["rejected"]) == {"hospital-1"}
    assert "non-finite" in statistics["rejected"]["hospital-1"]
    assert statistics["released"] == 5
    liar = statistics["hospitals"]["hospital-0"]
    bound = influence_bound(5)
    assert liar["capped"] and liar["share"] <= bound
    # the honest hospitals' exact pooled means (what no one computed in the run), per feature
    dataset, split = split_for(config)
    schema = builtin_schema("breast-cancer")
    assert schema is not None and dataset.raw_features is not None
    honest = np.concatenate([h.train for h in split.hospitals[2:]])
    low = np.array([f.minimum for f in schema.features])
    span = np.array([f.maximum for f in schema.features]) - low
    truth = (np.clip(dataset.raw_features[honest], low, low + span).mean(axis=0) - low) / span
    reference = json.loads(RunDirectory.open(result.run_dir).read_config()[0].feature_statistics)
    centres = (np.array([reference[f.name][0] for f in schema.features]) - low) / span
    # the liar pulls towards 1 by at most its share; 0.3 of the range covers the release noise
    assert np.all(centres <= truth + liar["share"] * (1 - truth) + 0.3)
    assert np.median(centres) < 0.9  # before: every centre at the top of its range
