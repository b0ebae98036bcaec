"""Encrypted federations in real Flower simulations reach the plaintext runs' accuracy.

Same seed, same hospitals, same recipe; under DP the noise is made reproducible with the
(insecure, test-only) insecure-dp-seed so the two runs draw identical noise.
"""

from __future__ import annotations

import json
import os
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
    # each hospital reports the time it spent decrypting the aggregate it received (round 1
    # starts from the seed's model: nothing to decrypt)
    for row in encrypted.rows:
        assert len(row["hospitals"]) == 3
    for row in encrypted.rows[1:]:
        assert all(h["he_decrypt_seconds"] >= 0 for h in row["hospitals"].values())
    # what the server kept between rounds is ciphertext, not a model
    checkpoint = torch.load(encrypted.run_dir / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {
        "ckks-ciphertext",
        "ckks-fingerprint",
        "ckks-total-examples",
    }


# fedpriv's ClientApp, except that hospital 1 under-declares its example count in round 2
# (its ciphertext encrypts the true count: the aggregate no longer adds up) and hospital 2
# falsely reports the aggregate round 5's order brings unusable; every evaluation exchange
# is noted in the file EVALUATIONS names (one line per hospital and exchange)
miscounting = ClientApp()
EVALUATIONS = "FEDPRIV_TEST_EVALUATIONS"


def _round(message: Message) -> int:
    return int(message.content.config_records["config"].get("server-round", 0))


@miscounting.train()
def _train(message: Message, context: Context) -> Message:
    reply = fedpriv_app.train_and_evaluate(message, context)
    hospital = int(context.node_config["partition-id"])
    if hospital == 1 and _round(message) == 2:
        metrics = reply.content.metric_records[msg.METRICS]
        metrics[msg.NUM_EXAMPLES] = int(metrics[msg.NUM_EXAMPLES]) - 7
    if hospital == 2 and _round(message) == 5:
        reply.content[msg.PROTOCOL] = ConfigRecord({UNUSABLE: "a lie"})
    return reply


@miscounting.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    with open(os.environ[EVALUATIONS], "a", encoding="utf-8") as log:
        log.write(f"{_round(message)} {context.node_config['partition-id']}\n")
    return fedpriv_app.handle_evaluate(message, context)


@miscounting.query()
def _query(message: Message, context: Context) -> Message:
    return fedpriv_app.handle_query(message, context)


def test_a_miscounted_ciphertext_costs_two_rounds_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under CKKS the server cannot see that a ciphertext's encrypted count differs from the
    declared one; the hospitals see it when the next round's order brings the aggregate
    (they decrypt it to evaluate and train from it), decline that round untrained, and the
    aggregate is discarded (the model before it stays) instead of every hospital failing
    from then on. One hospital claiming an aggregate unusable cannot veto a round. A round
    is one exchange: the only evaluation exchange is the final model's."""
    evaluations = tmp_path / "evaluations.txt"
    monkeypatch.setenv(EVALUATIONS, str(evaluations))  # Ray's workers inherit it
    config = RunConfig.from_mapping(
        {
            "dataset": "breast-cancer",
            "hospitals": 4,
            "rounds": 5,
            "dp": False,
            "he": True,
            "seed": 3,
            "out": str(tmp_path),
            "run-name": "miscount",
        }
    )
    result = run_plan(prepare_simulation(config), client_app=miscounting)
    assert not result.stopped and result.last_round == 5
    rows = result.rows
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    failures = {r["round"]: r.get("aggregate_failure") for r in rows if r.get("aggregate_failure")}
    assert set(failures) == {3}, failures  # round 2's aggregate, found when round 3 read it
    assert "round 2's aggregate is discarded" in failures[3]
    assert "4 of 4 hospitals" in failures[3] and "does not add up" in failures[3]
    third = rows[2]
    assert third["eval_accuracy"] is None  # nobody could evaluate the discarded aggregate
    assert len(third["declined"]) == 4  # all declined untrained
    # round 4 trained from round 1's model; round 5 went on despite hospital 2's lie
    assert rows[3]["declined"] == {} and rows[4]["eval_accuracy"] > 0.8
    assert result.final["test_accuracy"] > 0.8
    checkpoint = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 5
    # one exchange a round: the final model's evaluation is the only evaluation exchange
    lines = sorted(evaluations.read_text().split("\n")[:-1])
    assert lines == ["5 0", "5 1", "5 2", "5 3"], lines
