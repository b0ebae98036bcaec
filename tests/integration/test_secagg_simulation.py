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
from fedpriv.server.simulation import prepare_simulation, run_plan

COMMON = {"dataset": "breast-cancer", "hospitals": 5, "rounds": 3, "dp": False, "seed": 5}


def _model(run: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(run / "model.pt", weights_only=True).items()}


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
    return fedpriv_app.handle_train(message, context)


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
