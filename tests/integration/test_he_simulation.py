"""Encrypted federations in real Flower simulations reach the plaintext runs' accuracy.

Same seed, same hospitals, same recipe; under DP the noise is made reproducible with the
(insecure, test-only) insecure-dp-seed so the two runs draw identical noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

import fedpriv
from fedpriv import messages as msg
from fedpriv.client import handlers as fedpriv_app
from fedpriv.config import RunConfig
from fedpriv.protocols.base import UNUSABLE
from fedpriv.server.simulation import prepare_simulation, run_plan

# slow real simulations: `make test-slow` (CI runs it too), not `make test`
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("strategy", "dp"),
    # FedSGD's encrypted path (the hospital takes the server's step) is the same with or
    # without DP; FedAvg's is checked both ways
    [("fedavg", False), ("fedavg", True), ("fedsgd", True)],
)
def test_encrypted_run_matches_the_plaintext_run(tmp_path: Path, strategy: str, dp: bool) -> None:
    common = {
        "dataset": "breast-cancer",
        "hospitals": 3,
        "rounds": 2,
        "strategy": strategy,
        "server-lr": 0.5,
        "dp": dp,
        "insecure-dp-seed": 11,
        "out": str(tmp_path),
        "seed": 3,
    }
    plain = fedpriv.simulate(RunConfig.from_mapping({**common, "run-name": "plain"}))
    encrypted = fedpriv.simulate(RunConfig.from_mapping({**common, "run-name": "he", "he": True}))
    assert encrypted.last_round == plain.last_round == 2
    assert abs(encrypted.final["test_accuracy"] - plain.final["test_accuracy"]) <= 0.005
    # the decrypted final model is the plaintext model up to CKKS's precision
    a = torch.load(plain.run_dir / "model.pt", weights_only=True)
    b = torch.load(encrypted.run_dir / "model.pt", weights_only=True)
    for key in a:
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), atol=1e-4)
    he = json.loads((encrypted.run_dir / "he.json").read_text())["rounds"]
    assert [r["round"] for r in he] == [1, 2]
    for entry in he:
        assert entry["rejected"] == [] and entry["hospitals"] == 3
        assert entry["bytes_up_per_param"] > 4 and entry["server_aggregate_seconds"] > 0
        assert entry["client_encrypt_seconds_mean"] > 0
    # each hospital reports the time it spent decrypting the aggregate it evaluated
    for row in encrypted.rows:
        assert all(h["he_decrypt_seconds"] >= 0 for h in row["hospitals"].values())
        assert len(row["hospitals"]) == 3
    # what the server kept between rounds is ciphertext, not a model
    checkpoint = torch.load(encrypted.run_dir / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {
        "ckks-ciphertext",
        "ckks-fingerprint",
        "ckks-total-examples",
    }


# fedpriv's ClientApp, except that hospital 1 under-declares its example count in round 2
# (its ciphertext encrypts the true count: the aggregate no longer adds up) and hospital 2
# falsely reports round 3's aggregate unusable
miscounting = ClientApp()


def _round(message: Message) -> int:
    return int(message.content.config_records["config"].get("server-round", 0))


@miscounting.train()
def _train(message: Message, context: Context) -> Message:
    reply = fedpriv_app.handle_train(message, context)
    if int(context.node_config["partition-id"]) == 1 and _round(message) == 2:
        metrics = reply.content.metric_records[msg.METRICS]
        metrics[msg.NUM_EXAMPLES] = int(metrics[msg.NUM_EXAMPLES]) - 7
    return reply


@miscounting.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    reply = fedpriv_app.handle_evaluate(message, context)
    if int(context.node_config["partition-id"]) == 2 and _round(message) == 3:
        reply.content[msg.PROTOCOL] = ConfigRecord({UNUSABLE: "a lie"})
    return reply


@miscounting.query()
def _query(message: Message, context: Context) -> Message:
    return fedpriv_app.handle_query(message, context)


def test_a_miscounted_ciphertext_costs_one_round_not_the_run(tmp_path: Path) -> None:
    """Under CKKS the server cannot see that a ciphertext's encrypted count differs from the
    declared one; the hospitals see it when they decrypt, and the round is discarded (the
    model stays) instead of every hospital failing from then on. One hospital claiming an
    aggregate unusable cannot veto a round."""
    config = RunConfig.from_mapping(
        {
            "dataset": "breast-cancer",
            "hospitals": 4,
            "rounds": 3,
            "dp": False,
            "he": True,
            "seed": 3,
            "out": str(tmp_path),
            "run-name": "miscount",
        }
    )
    result = run_plan(prepare_simulation(config), client_app=miscounting)
    assert not result.stopped and result.last_round == 3
    first, second, third = result.rows
    assert "aggregate_failure" not in first and "aggregate_failure" not in third
    assert "does not add up" in second["aggregate_failure"]
    assert "4 of 4 hospitals" in second["aggregate_failure"]
    assert second["eval_accuracy"] is None  # nobody could evaluate the discarded aggregate
    # round 3 trained (had the bad aggregate been installed, no hospital could decrypt it)
    assert third["eval_accuracy"] > 0.8 and result.final["test_accuracy"] > 0.8
    checkpoint = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 3
