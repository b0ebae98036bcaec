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

import fedpriv
from fedpriv.config import RunConfig


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
