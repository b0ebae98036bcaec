"""The gradient-inversion audit's contract: it rebuilds a record from a message that reveals
it and not from one that cannot; its metrics are scikit-image's; the attacker's model of
the message is exact; under secure aggregation and CKKS it attacks the aggregate the
protocol really yields, never one hospital's update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.data import load_dataset
from fedpriv.errors import ConfigError
from fedpriv.models import initial_state
from fedpriv.privacy.audit import inversion
from fedpriv.privacy.audit.base import AuditInputs, HospitalRecords, create_audit
from fedpriv.protocols.local import LocalFederation

CNN = ("cnn", {"in_channels": 1, "num_classes": 10})
MLP = ("mlp", {"in_features": 30, "num_classes": 2})
#: enough for a single digit from one message (a few seconds on one core)
FAST = {"inversion_steps": 300, "inversion_restarts": 4, "inversion_records": 2}


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cancer() -> Any:
    return load_dataset("breast-cancer")


def _inputs(
    dataset: Any, model: tuple[str, dict], *, options: dict, seed: int = 0, **settings: Any
) -> tuple[AuditInputs, list[tuple[int, int]]]:
    perm = np.random.default_rng(0).permutation(len(dataset))
    hospitals = tuple(
        HospitalRecords(
            f"hospital-{k}", perm[100 * k : 100 * k + 80], perm[100 * k + 80 : 100 * (k + 1)]
        )
        for k in range(3)
    )
    config = RunConfig(dataset=dataset.name, hospitals=3, **settings).to_mapping()
    config["model"], config["model-args"] = model[0], dict(model[1])
    ticks: list[tuple[int, int]] = []
    inputs = AuditInputs(
        run_dir=Path("."),
        config=config,
        dataset=dataset,
        hospitals=hospitals,
        population=perm[300:],
        options=options,
        seed=seed,
        progress=lambda task, done, total: ticks.append((done, total)),
    )
    return inputs, ticks


# ---- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (3, 28, 28), (2, 5, 5)])
def test_psnr_and_ssim_agree_with_scikit_image(shape: tuple[int, ...]) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 2, shape)
    for b in (a + rng.normal(0, 0.05, shape), rng.uniform(0, 2, shape), a.copy() * 0.7):
        assert inversion.psnr(a, b, data_range=2.0) == pytest.approx(
            metrics.peak_signal_noise_ratio(a, b, data_range=2.0), rel=1e-12
        )
        side = min(shape[-2:])
        expected = metrics.structural_similarity(
            a,
            b,
            data_range=2.0,
            channel_axis=0 if len(shape) == 3 else None,
            win_size=min(7, side if side % 2 else side - 1),
        )
        assert inversion.ssim(a, b, data_range=2.0) == pytest.approx(expected, rel=1e-9)
    assert inversion.ssim(a, a, data_range=2.0) == pytest.approx(1.0)


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="inversion_view"):
        inversion.InversionSettings.from_options({"inversion_view": "everyone"})
    with pytest.raises(ConfigError, match="inversion_steps"):
        inversion.InversionSettings.from_options({"inversion_steps": "many"})
    assert inversion.InversionSettings.from_options({"inversion_batch": "4"}).batch == 4


# ---- the contract ---------------------------------------------------------------------------


def test_one_record_from_its_own_update_is_rebuilt(digits: Any) -> None:
    inputs, ticks = _inputs(digits, CNN, options=FAST, dp=False)
    audit = create_audit("inversion")
    assert audit.unmet(inputs) is None
    result = audit.run(inputs)
    assert result.verdict == "leak", result.reading
    assert result.metrics["psnr"] > 25 and result.metrics["ssim"] > 0.9
    assert result.metrics["psnr"] > result.baseline["psnr"] + 10
    assert result.metrics["leaked_records"] == 2
    entry = json.loads(json.dumps(result.to_json()))  # what audit.json holds
    assert len(entry["psnr_per_record"]) == len(entry["baseline"]["psnr_per_record"]) == 2
    assert {"psnr", "ssim"} <= set(entry["baseline"])
    assert entry["view"] == "server" and entry["protocol"] == "plain"
    assert np.asarray(entry["images"][0]["reconstruction"]).shape == (1, 8, 8)
    assert "hospital's own" in entry["attacker"]
    assert ticks[-1][0] == ticks[-1][1] > 0
    figure = inversion.figure(entry)
    assert figure is not None and len(figure.axes) == 4 * 2


def test_a_message_drowned_in_dp_noise_does_not_leak(digits: Any) -> None:
    options = {**FAST, "inversion_steps": 100, "inversion_restarts": 1}
    inputs, _ = _inputs(digits, CNN, options=options, dp=True, noise_multiplier=10.0)
    result = create_audit("inversion").run(inputs)
    assert result.verdict == "no-leak", result.reading
    assert result.metrics["psnr"] < result.baseline["psnr"]
    assert result.metrics["leaked_records"] == 0


def test_tables_report_squared_error_and_are_deterministic(cancer: Any) -> None:
    options = {"inversion_steps": 150, "inversion_restarts": 1, "inversion_records": 2}
    inputs, _ = _inputs(cancer, MLP, options=options, dp=False, seed=3)
    first = create_audit("inversion").run(inputs)
    assert first.verdict == "leak"
    assert first.metrics["mse"] < 1e-2 * first.baseline["mse"]
    assert len(first.metrics["mae_per_feature"]) == 30
    assert "psnr" not in first.metrics and first.details["images"] == []
    again = create_audit("inversion").run(inputs)
    assert again.metrics["mse_per_record"] == first.metrics["mse_per_record"]


def test_without_central_records_the_audit_says_why() -> None:
    reason = create_audit("inversion").unmet(AuditInputs(run_dir=Path("."), config={}))
    assert reason is not None and "simulation" in reason


# ---- the message and the attacker's model of it ----------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"local_epochs": 2, "batch_size": 2},  # several local steps, shuffled batches
        {"local_epochs": 2, "batch_size": 2, "momentum": 0.9},
        {"strategy": "fedsgd"},
        {"aggregation": "secagg", "batch_size": 2},
    ],
)
def test_the_attackers_model_reproduces_the_real_message(digits: Any, settings: dict) -> None:
    config = RunConfig(dataset="digits", dp=False, **settings)
    rows = np.arange(10, 14)
    chosen = [("hospital-0", 0, rows), ("hospital-1", 1, rows + 100)]
    observed = inversion.replay_round(config, *CNN, digits, chosen, seed=5)
    assert isinstance(observed, inversion.Observation)
    truth = np.concatenate([p.records for p in observed.participants])
    simulator = inversion.Simulator(
        *CNN, initial_state(CNN[0], config.seed, **CNN[1]), observed, digits.labels[truth], config
    )
    assert float(simulator.mismatch(torch.as_tensor(digits.features[truth]), "l2").detach()) < 1e-8
    others = torch.as_tensor(digits.features[truth + 500])
    assert float(simulator.mismatch(others, "l2").detach()) > 1e-2


def _individual(config: RunConfig, digits: Any, chosen: list) -> list[dict[str, np.ndarray]]:
    plain = config.replace(aggregation="plain", he=False)
    updates = []
    for hospital in chosen:
        seen = inversion.replay_round(plain, *CNN, digits, [hospital], seed=5)
        assert isinstance(seen, inversion.Observation) and seen.individual
        updates.append(seen.target)
    return updates


@pytest.mark.parametrize("aggregation", ["secagg", "ckks"])
def test_under_secure_aggregation_and_ckks_the_aggregate_is_attacked(
    digits: Any, aggregation: str, tmp_path: Path
) -> None:
    config = RunConfig(
        dataset="digits", dp=False, aggregation=aggregation, out=str(tmp_path), run_name="r"
    )
    chosen = [(f"hospital-{k}", k, np.arange(3) + 50 * k) for k in range(3)]
    observed = inversion.replay_round(config, *CNN, digits, chosen, seed=5)
    assert isinstance(observed, inversion.Observation)
    assert not observed.individual and len(observed.participants) == 3
    assert "hospitals' round-1 updates" in observed.what

    # independently: each hospital's own plaintext update, through the protocol's own round
    updates = _individual(config, digits, chosen)
    initial = initial_state(CNN[0], config.seed, **CNN[1])
    if aggregation == "ckks":
        from fedpriv.privacy.he import write_keys

        write_keys(tmp_path / "keys")
        config = config.replace(keys=str(tmp_path / "keys"))
    nodes = [k + 1 for k in range(3)]
    federation = LocalFederation(config, nodes, initial, counts=dict.fromkeys(nodes, 3))
    trained = {
        n: {k: v + update[k].astype(v.dtype) if k in update else v for k, v in initial.items()}
        for n, update in zip(nodes, updates, strict=True)
    }
    result = federation.round(1, trained)
    assert result is not None
    if federation.server.encrypted:
        order = msg.TrainingOrder(
            config=config, server_round=2, model_name=CNN[0], model_args=CNN[1], mode="weights"
        )
        new = federation.sides[nodes[0]].read(order, result).weights
    else:
        new = {k: v.numpy() for k, v in result.items()}
    for name, value in observed.target.items():
        protocol_view = new[name].astype(np.float64) - initial[name]
        np.testing.assert_allclose(value, protocol_view, atol=1e-5)
        np.testing.assert_allclose(value, np.mean([u[name] for u in updates], axis=0), atol=1e-5)
    # ... and it is not the attacked hospital's own update
    flat = np.concatenate([observed.target[k].ravel() for k in observed.target])
    own = np.concatenate([updates[0][k].ravel() for k in observed.target])
    assert np.linalg.norm(flat - own) > 0.3 * np.linalg.norm(own)


def test_client_level_dp_of_a_trusted_server_is_attacked_where_the_server_sees_it(
    digits: Any,
) -> None:
    config = RunConfig(dataset="digits", dp=True, dp_level="client", client_noise_multiplier=5.0)
    chosen = [(f"hospital-{k}", k, np.arange(2) + 50 * k) for k in range(3)]
    server = inversion.replay_round(config, *CNN, digits, chosen, seed=5)
    model = inversion.replay_round(config, *CNN, digits, chosen, view="model", seed=5)
    assert isinstance(server, inversion.Observation) and isinstance(model, inversion.Observation)
    # the trusted server receives the raw update; the released model carries the noise
    assert server.individual and "trusted server" in server.what
    assert not model.individual and len(model.participants) == 3
    raw = _individual(config.replace(dp=False, dp_level="sample"), digits, chosen[:1])[0]
    for name, value in server.target.items():
        np.testing.assert_allclose(value, raw[name], atol=1e-7)
