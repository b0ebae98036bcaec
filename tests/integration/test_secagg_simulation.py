"""Secure aggregation in real Flower simulations: the same model as plaintext aggregation,
hospitals that fail in either phase of a round, and a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedpriv
from fedpriv.client import handlers as fedpriv_app
from fedpriv.config import RunConfig
from fedpriv.report import build_report
from fedpriv.server.simulation import prepare_simulation, run_plan

COMMON = {"dataset": "breast-cancer", "hospitals": 5, "rounds": 3, "dp": False, "seed": 5}


def _model(run: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(run / "model.pt", weights_only=True).items()}


#: one FedSGD round of four hospitals under distributed noise (the two tests below)
DISTRIBUTED_NOISE = {
    "hospitals": 4,
    "rounds": 1,
    "seed": 5,
    "strategy": "fedsgd",
    "aggregation": "secagg",
    "distributed-noise": True,
}


@pytest.mark.slow  # `make test-slow`
def test_secure_aggregation_gives_the_plaintext_model_and_resumes(tmp_path: Path) -> None:
    plain = fedpriv.simulate(
        RunConfig.from_mapping({**COMMON, "out": str(tmp_path), "run-name": "p"})
    )
    settings = {**COMMON, "out": str(tmp_path), "run-name": "s", "aggregation": "secagg"}
    stopped = fedpriv.simulate(RunConfig.from_mapping({**settings, "rounds": 2}))
    assert stopped.last_round == 2
    # resumed: a new setup (new keys) for the rounds left, from the checkpoint
    masked = fedpriv.simulate(RunConfig.from_mapping(settings), resume=stopped.run_dir)
    assert masked.last_round == plain.last_round == 3
    a, b = _model(plain.run_dir), _model(masked.run_dir)
    for key in a:  # exact up to fixed-point quantisation (steps of ~1e-8)
        np.testing.assert_allclose(b[key], a[key], atol=2e-6)
    assert masked.final["test_accuracy"] == plain.final["test_accuracy"]
    rows = [
        json.loads(line) for line in (masked.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        stats = row["aggregation"]
        assert stats["protocol"] == "secagg" and stats["survivors"] == 5
        assert stats["bytes_in"] == 5 * 4 * (stats["parameters"] + 1), "4 bytes a value"
    # evaluation rides on the unmasking exchange: a row evaluates the model the hospitals
    # trained from, a run's last row its final model (one more exchange, once)
    assert [r.get("evaluated_round") for r in rows] == [0, None, None]
    assert masked.final["eval_accuracy"] == plain.final["eval_accuracy"]


# fedpriv's ClientApp, except that hospital 1 fails in round 2's training (before sending its
# masked vector) and hospital 3 in round 2's evaluation (before sending its shares)
faulty = ClientApp()


def _round(message: Message) -> int:
    return int(message.content.config_records["config"].get("server-round", 0))


@faulty.train()
def _train(message: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 1 and _round(message) == 2:
        raise RuntimeError("hospital 1 dropped out while training")
    return fedpriv_app.train_and_evaluate(message, context)


@faulty.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == 3 and _round(message) == 2:
        raise RuntimeError("hospital 3 dropped out while unmasking")
    return fedpriv_app.handle_evaluate(message, context)


@faulty.query()
def _query(message: Message, context: Context) -> Message:
    return fedpriv_app.handle_query(message, context)


def test_secure_aggregation_survives_hospitals_failing_in_either_phase(tmp_path: Path) -> None:
    config = RunConfig.from_mapping(
        {
            **COMMON,
            "out": str(tmp_path),
            "run-name": "f",
            "aggregation": "secagg",
            "secagg-threshold": 3,
            "secagg-one-exchange": False,  # every round recoverable within itself
        }
    )
    result = run_plan(prepare_simulation(config), client_app=faulty)
    assert not result.stopped and result.last_round == 3
    second = result.rows[1]
    assert second["aggregation"]["survivors"] == 4 and second["aggregation"]["dropped"] == 1
    assert "aggregate_failure" not in second
    assert any("node" in who for who in second["failed"]), second["failed"]
    assert result.rows[2]["aggregation"]["survivors"] == 5
    # the model learnt through it
    assert result.final["test_accuracy"] > 0.8


def test_secure_aggregation_with_fedsgd_and_sample_level_dp(tmp_path: Path) -> None:
    """FedSGD (the server takes the step on the unmasked mean gradient) under sample-level
    DP: the same model as plaintext aggregation with identical (test-only seeded) noise."""
    common = {
        **COMMON,
        "hospitals": 3,
        "rounds": 2,
        "strategy": "fedsgd",
        "server-lr": 0.5,
        "dp": True,
        "insecure-dp-seed": 11,
        "out": str(tmp_path),
    }
    plain = fedpriv.simulate(RunConfig.from_mapping({**common, "run-name": "p"}))
    masked = fedpriv.simulate(
        RunConfig.from_mapping({**common, "run-name": "s", "aggregation": "secagg"})
    )
    a, b = _model(plain.run_dir), _model(masked.run_dir)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=2e-6)
    spent = masked.final["epsilon"]  # per hospital: masking changes no accounting
    assert spent == plain.final["epsilon"] and len(spent) == 3
    assert all(value > 0 for value in spent.values())
    assert all(r["aggregation"]["protocol"] == "secagg" for r in masked.rows)


def test_the_dp_recipe_runs_under_secure_aggregation(tmp_path: Path) -> None:
    """What reverted the DP recipe once: its honest updates (lr 1.0, 4 local epochs) were
    over the fixed secagg-max-norm 10 and every hospital declined. At epsilon 1 the noise
    makes them larger still (about 14 on breast-cancer). The range is now derived from
    the run's DP-SGD settings and recorded in every row; nobody declines or is clipped."""
    config = RunConfig.from_mapping(
        {
            "dataset": "breast-cancer",
            "hospitals": 5,
            "rounds": 2,
            "epsilon": 1.0,
            "seed": 5,
            "aggregation": "secagg",
            "out": str(tmp_path),
            "run-name": "recipe",
        }
    )
    assert (config.lr, config.local_epochs, config.batch_size) == (1.0, 4, 128)
    result = fedpriv.simulate(config)
    assert result.last_round == 2
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    for row in rows:
        assert row["declined"] == {} and "aggregate_failure" not in row, row
        stats = row["aggregation"]
        assert stats["max_norm_from"] == "derived" and stats["max_norm"] > 10.0
        assert stats["survivors"] == 5
        assert [h["update_clipped"] for h in row["hospitals"].values()] == [0.0] * 5
    assert result.final["test_accuracy"] > 0.6


@pytest.mark.slow  # `make test-slow`: two simulations (about 45 s of CPU)
def test_distributed_noise_sum_holds_the_full_noise_and_no_more(tmp_path: Path) -> None:
    """Distributed noise in real simulations: 4 hospitals, secagg's majority threshold t = 3,
    c = 1 colluder by default, so each hospital adds sigma / sqrt(2) and the unmasked sum
    2 sigma^2 C^2 (the full noise twice over; local noise would put 4 there). Every patient
    is sampled (q = 1) and both runs start from the same model, so their models after one
    round differ by the noise alone: N(0, 2 k z^2 C^2 / N^2) per value, z the share, N the
    examples. The chi-square bound below fails with probability 2e-6."""
    from scipy import stats

    from tests.reference_dp import google_epsilon

    common = {**DISTRIBUTED_NOISE, "dataset": "breast-cancer", "out": str(tmp_path)}
    runs = [
        fedpriv.simulate(
            RunConfig.from_mapping({**common, "run-name": n, "ledger-dir": str(tmp_path / n)})
        )
        for n in ("a", "b")
    ]
    (row,) = runs[0].rows
    assert row["declined"] == {} and row["aggregation"]["survivors"] == 4
    assert row["aggregation"]["threshold"] == 3 and row["aggregation"]["noise_colluders"] == 1
    examples = sum(int(h["train_examples"]) for h in row["hospitals"].values())
    privacy = json.loads((runs[0].run_dir / "privacy.json").read_text())
    reports = list(privacy["hospitals"].values())
    sigma = reports[0]["noise_multiplier"]
    for report in reports:
        assert report["sample_rate"] == 1.0 and report["noise_multiplier"] == sigma
        split = report["distributed_noise"]
        assert split["honest_shares"] == 2
        # (scaled up by 1 + sqrt(d) step / C for secure aggregation's rounding: ~3e-5)
        assert split["added_noise_multiplier"] == pytest.approx(sigma / np.sqrt(2), rel=1e-3)
        assert split["added_noise_multiplier"] > sigma / np.sqrt(2)
        # the recorded epsilon: the full sigma; the fallback: this hospital's share alone
        assert report["epsilon"] == pytest.approx(google_epsilon(report["events"], 1e-5), rel=0.03)
        assert split["fallback_planned_epsilon"] == pytest.approx(
            google_epsilon([(sigma / np.sqrt(2), 1.0, 1)], 1e-5), rel=0.03
        )
        # the same, per patient for life, from the ledger (an RDP bound: above, not far)
        assert (
            0.97 * split["fallback_planned_epsilon"]
            <= split["fallback_epsilon"]
            <= 1.3 * split["fallback_planned_epsilon"]
        )
    assert privacy["distributed_noise"]["conditional"] is True
    assert "at most 1 hospitals collude" in privacy["distributed_noise"]["assumption"]
    fallback = privacy["distributed_noise"]["max_fallback_epsilon"]
    page = " ".join(build_report(runs[0].run_dir).read_text().split())
    assert "This guarantee is conditional" in page and "at most 1 hospitals collude" in page
    assert page.count("This guarantee is conditional") == 1, "stated once, at the top"
    assert f"epsilon &le; {fallback:.2f} per patient for life" in page

    a, b = _model(runs[0].run_dir), _model(runs[1].run_dir)
    difference = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in a])
    share = sigma / np.sqrt(2)  # C = 1, server-lr = 1
    variance = 2 * 4 * share**2 / examples**2
    chi2 = float(np.sum(difference**2)) / variance
    low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], difference.size)
    assert low < chi2 < high, (chi2, difference.size)
    # each hospital adding all of its noise (twice the variance) is far outside
    assert not low < chi2 / 2 < high


@pytest.mark.slow  # `make test-slow`: one simulation (about 35 s here)
def test_distributed_noise_trains_when_patients_hold_several_records(tmp_path: Path) -> None:
    """Patients with one to four visits each, named in a patient column. The shares used to
    be sized for one record per patient, and every hospital declined round 1; sized from
    the records and patients each hospital declares, all train, the run's rho is the
    largest a_i sigma_i, and each hospital's epsilon is dp-accounting's for its events."""
    from tests.reference_dp import google_epsilon
    from tests.unit.test_distributed_noise import _visits

    config = RunConfig.from_mapping(
        {
            **DISTRIBUTED_NOISE,
            "dataset": str(_visits(tmp_path / "visits.csv")),
            "patient-column": "patient",
            "out": str(tmp_path),
            "run-name": "visits",
            "ledger-dir": str(tmp_path / "ledgers"),
        }
    )
    result = fedpriv.simulate(config)
    assert result.last_round == 1 and len(result.rows) == 1, "declined: no round"
    (row,) = result.rows
    assert row["declined"] == {} and row["aggregation"]["survivors"] == 4
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    needs = []
    for name, report in privacy["hospitals"].items():
        examples = int(row["hospitals"][name]["train_examples"])
        assert report["patients"] < examples, "several records per patient"
        a = examples / max(1.0, report["patients"] * report["sample_rate"])
        needs.append(a * report["noise_multiplier"])
        assert report["epsilon"] == pytest.approx(google_epsilon(report["events"], 1e-5), rel=0.03)
    scales = {r["distributed_noise"]["scale"] for r in privacy["hospitals"].values()}
    assert len(scales) == 1 and scales.pop() == pytest.approx(max(needs), rel=1e-9)


def test_one_exchange_rounds_lose_a_round_to_a_dropout_then_recover(tmp_path: Path) -> None:
    """The default: one exchange a round while everyone answers. Hospital 1 fails in round
    2's training: round 2's masked updates are discarded (the model stays), rounds 3-5 are
    two-exchange ones (hospital 3's failure to unmask in round 2 never happens: round 2 had
    no unmasking), and the run ends with a model that learnt."""
    config = RunConfig.from_mapping(
        {
            **COMMON,
            "rounds": 5,
            "out": str(tmp_path),
            "run-name": "o",
            "aggregation": "secagg",
            "secagg-threshold": 3,
        }
    )
    assert config.secagg_one_exchange
    result = run_plan(prepare_simulation(config), client_app=faulty)
    assert not result.stopped and result.last_round == 5
    rows = result.rows
    assert [r["aggregation"]["exchanges"] for r in rows] == [1, 1, 2, 2, 2]
    assert "discarded" in rows[1]["aggregate_failure"]
    assert rows[1]["aggregation"]["survivors"] == 4 and rows[1]["aggregation"]["dropped"] == 1
    assert all("aggregate_failure" not in r for r in rows[2:])
    assert [r["aggregation"]["survivors"] for r in rows[2:]] == [5, 5, 5]
    # the evaluations: carried on the next order in one-exchange rounds, on the unmasking
    # exchange in the others; each row describes the model its round trained from
    assert [r.get("evaluated_round") for r in rows] == [0, 1, 2, 3, None]
    assert result.final["test_accuracy"] > 0.8
