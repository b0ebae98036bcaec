"""DP-SGD at a hospital with real Opacus: clipping, noise, the ledger's write-ahead, the
accountant carried across rounds, and models DP-SGD cannot train."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedpriv import messages as msg
from fedpriv.client.hospital import HospitalData, PrivacyState, local_data, train_round
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.models import available_models, build, register_model
from fedpriv.privacy.dp import DpPlan, make_private, reseed_from_os
from fedpriv.privacy.ledger import Ledger
from fedpriv.server.run import initial_weights, prepare_run
from fedpriv.training import get_weights, make_loader, train

MLP_ARGS = {"in_features": 30, "num_classes": 2}


def _plan(noise: float, clip: float, q: float = 1.0) -> DpPlan:
    return DpPlan(
        noise_multiplier=noise,
        sample_rate=q,
        steps_per_round=1,
        rounds=1,
        max_grad_norm=clip,
        delta=1e-5,
        accountant="rdp",
        target_epsilon=1.0,
    )


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 30)).astype(np.float32) * 5, rng.integers(0, 2, n)


def _one_step(mode: str, *, noise: float, clip: float) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = build("mlp", **MLP_ARGS)
    before = get_weights(model)
    x, y = _data()
    loader = make_loader(x, y, batch_size=64, shuffle=False)  # q = 1: every record, every step
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    reseed_from_os()  # as every hospital does before DP-SGD: the noise must not follow --seed
    private = make_private(
        model=model,
        optimizer=optimizer,
        loader=loader,
        criterion=nn.CrossEntropyLoss(),
        plan=_plan(noise, clip),
        grad_sample_mode=mode,
    )
    train(
        private.model,
        private.loader,
        optimizer=private.optimizer,
        criterion=private.criterion,
        epochs=1,
        device=torch.device("cpu"),
        max_steps=1,
    )
    private.close()
    after = get_weights(model)
    return {k: before[k] - after[k] for k in before}


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values()))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_per_sample_clipping_bounds_the_step(mode: str) -> None:
    clip = 0.01
    # without DP the same step is far longer than the clip norm, so the bound can fail
    torch.manual_seed(0)
    plain_model = build("mlp", **MLP_ARGS)
    x, y = _data()
    loss = nn.CrossEntropyLoss()(plain_model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    plain = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in plain_model.parameters()))
    assert plain > 10 * clip
    step = _norm(_one_step(mode, noise=0.0, clip=clip))
    # the mean of per-sample gradients each clipped to C has norm at most C
    assert 0 < step <= clip * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_is_added_and_is_not_reproducible(mode: str) -> None:
    first = _one_step(mode, noise=1.0, clip=0.01)
    second = _one_step(mode, noise=1.0, clip=0.01)
    difference = _norm({k: first[k] - second[k] for k in first})
    # two draws of N(0, (sigma C / B)^2) per coordinate differ by about sqrt(2 d) sigma C / B
    d = sum(v.size for v in first.values())
    expected = math.sqrt(2 * d) * 1.0 * 0.01 / 64
    assert 0.5 * expected < difference < 2.0 * expected


def test_the_same_round_twice_gives_different_noisy_updates(tmp_path: Path) -> None:
    config = RunConfig(hospitals=3, rounds=2, seed=7, run_name="t", accountant="rdp")
    data = _hospital(config)
    privacy = PrivacyState(ledger_path=tmp_path / "h.sqlite", budget_epsilon=100.0)
    first = train_round(_order(config), data, _arrays(), privacy=privacy).arrays
    second = train_round(_order(config), data, _arrays(), privacy=privacy).arrays
    assert first is not None and second is not None
    assert any(not np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def _order(config: RunConfig, round_: int = 1) -> msg.TrainingOrder:
    record = msg.order_record(config, model_name="mlp", model_args=MLP_ARGS)
    record[msg.SERVER_ROUND] = round_
    return msg.parse_order(record)


def _hospital(config: RunConfig) -> HospitalData:
    return local_data(config, {"partition-id": 0})


def _arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in initial_weights("mlp", MLP_ARGS, seed).items()})


def test_a_round_records_its_event_first_and_carries_the_accountant(tmp_path: Path) -> None:
    config = RunConfig(hospitals=3, rounds=4, epsilon=4.0, run_name="t", accountant="rdp")
    data = _hospital(config)
    privacy = PrivacyState(ledger_path=tmp_path / "h.sqlite", budget_epsilon=10.0)
    state = None
    for round_ in (1, 2):
        result = train_round(
            _order(config, round_), data, _arrays(), privacy=privacy, accountant_state=state
        )
        assert result.arrays is not None and not result.declined
        # exchanged weights carry the model's own names (no Opacus `_module.` prefix)
        assert list(result.arrays.keys()) == list(build("mlp", **MLP_ARGS).state_dict())
        state = result.accountant_state
    assert state is not None
    plan_steps = result.privacy["steps_per_round"]  # type: ignore[index]
    assert sum(h[2] for h in state["history"]) == 2 * plan_steps, "history survives rounds"
    events = Ledger.open(privacy.ledger_path).events()
    assert [e.round for e in events] == [1, 2]
    summary = Ledger.open(privacy.ledger_path).summary()
    assert summary.patients == data.train_labels.size
    assert result.privacy["epsilon"] == pytest.approx(summary.max_epsilon)  # type: ignore[index]


def test_fedsgd_under_dp_takes_one_noisy_step_per_round(tmp_path: Path) -> None:
    config = RunConfig(hospitals=3, rounds=5, strategy="fedsgd", run_name="t", accountant="rdp")
    data = _hospital(config)
    privacy = PrivacyState(ledger_path=tmp_path / "h.sqlite", budget_epsilon=10.0)
    record = msg.order_record(config, model_name="mlp", model_args=MLP_ARGS, mode=msg.MODE_GRADIENT)
    record[msg.SERVER_ROUND] = 1
    result = train_round(msg.parse_order(record), data, _arrays(), privacy=privacy)
    assert result.privacy is not None and result.privacy["steps_per_round"] == 1
    (event,) = Ledger.open(privacy.ledger_path).events()
    assert event.steps == 1 and event.sample_rate == pytest.approx(result.privacy["sample_rate"])
    assert result.accountant_state is not None
    assert sum(h[2] for h in result.accountant_state["history"]) == 1


def test_a_round_past_the_cap_is_declined_without_training(tmp_path: Path) -> None:
    config = RunConfig(hospitals=3, rounds=2, epsilon=4.0, run_name="t", accountant="rdp")
    data = _hospital(config)
    privacy = PrivacyState(ledger_path=tmp_path / "h.sqlite", budget_epsilon=0.5)
    result = train_round(_order(config), data, _arrays(), privacy=privacy)
    assert result.arrays is None and "declines the round" in result.declined
    assert result.privacy is not None and result.privacy["status"] == "declined"
    assert Ledger.open(privacy.ledger_path).events() == []


def _train_forever(ledger_path: str) -> None:
    config = RunConfig(
        hospitals=3,
        rounds=2,
        local_epochs=100_000,
        run_name="crash",
        accountant="rdp",
        noise_multiplier=1.0,
    )
    train_round(
        _order(config),
        _hospital(config),
        _arrays(),
        privacy=PrivacyState(ledger_path=Path(ledger_path), budget_epsilon=1e9),
    )


def test_a_hospital_killed_mid_round_leaves_its_event_recorded(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    process = multiprocessing.get_context("spawn").Process(target=_train_forever, args=(str(path),))
    process.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 0:
                try:
                    if Ledger.open(path, create=False).events():
                        break
                except Exception:  # the child may still be creating the file
                    pass
            time.sleep(0.2)
        assert process.is_alive(), "the round must still be training when it is killed"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
    events = Ledger.open(path, create=False).events()
    assert len(events) == 1 and events[0].run_id == "crash"


# ---- models DP-SGD cannot use -----------------------------------------------------------------

if "bn-test-net" not in available_models():

    @register_model("bn-test-net")
    class _BatchNormNet(nn.Module):
        def __init__(self, in_features: int, num_classes: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU())
            self.head = nn.Linear(16, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))


def test_batchnorm_is_refused_by_name(tmp_path: Path) -> None:
    config = RunConfig(model="bn-test-net", out=str(tmp_path), hospitals=3)
    with pytest.raises(ConfigError, match=r"BatchNorm1d layer 'body\.1'.*--fix-model"):
        prepare_run(config)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused run"


def test_fix_model_replaces_batchnorm_and_says_so(tmp_path: Path) -> None:
    config = RunConfig(model="bn-test-net", out=str(tmp_path), hospitals=3, fix_model=True)
    plan = prepare_run(config)
    assert plan.model_args["replace_batchnorm"] is True
    assert any("body.1 (BatchNorm1d(16) -> GroupNorm" in n for n in plan.notices)
    rebuilt = build(plan.model_name, **plan.model_args)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in rebuilt.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in rebuilt.modules())


def test_auto_mode_picks_ghost_for_linear_models_and_hooks_for_convolutions() -> None:
    from fedpriv.privacy.dp import resolve_grad_sample_mode

    mlp = build("mlp", **MLP_ARGS)
    cnn = build("cnn", in_channels=1, num_classes=10)
    assert resolve_grad_sample_mode(mlp, "auto", proximal=False) == "ghost"
    assert resolve_grad_sample_mode(cnn, "auto", proximal=False) == "hooks"
    assert resolve_grad_sample_mode(mlp, "auto", proximal=True) == "hooks"
    assert resolve_grad_sample_mode(cnn, "ghost", proximal=False) == "ghost"
    with pytest.raises(ConfigError, match="plain loss"):
        resolve_grad_sample_mode(mlp, "ghost", proximal=True)


def test_a_site_file_with_one_more_record_gives_nobody_a_fresh_budget(tmp_path: Path) -> None:
    """Deployment: before, a 190-record site file plus one record got a new dataset identity
    (standardisation used the whole file), so all 191 patients trained on a fresh budget."""
    from fedpriv.client.hospital import privacy_state

    rng = np.random.default_rng(0)
    lines = [",".join(f"{v:.3f}" for v in rng.normal(size=30)) + f",{i % 2}" for i in range(190)]
    header = ",".join(f"f{j}" for j in range(30)) + ",label"
    site_file = tmp_path / "site.csv"
    site_file.write_text(header + "\n" + "\n".join(lines) + "\n")
    node = {"data-path": str(site_file), "ledger-path": str(tmp_path / "ledger.sqlite")}
    config = RunConfig(rounds=1, epsilon=3.0, run_name="study-1", accountant="rdp")
    first_data = local_data(config, node)
    privacy = dataclasses.replace(privacy_state(config, node, first_data.name), budget_epsilon=3.1)
    first = train_round(_order(config), first_data, _arrays(), privacy=privacy)
    assert not first.declined and first.privacy["patients"] == first_data.train_labels.size  # type: ignore[index]
    site_file.write_text(header + "\n" + "\n".join([*lines, lines[0].replace("0.", "9.")]) + "\n")
    again = local_data(config.replace(run_name="study-2"), node)
    assert again.train_labels.size + again.held_out_labels.size == 191
    second = train_round(
        _order(config.replace(run_name="study-2")), again, _arrays(), privacy=privacy
    )
    assert second.declined and second.arrays is None
    assert second.privacy is not None
    assert second.privacy["excluded_for_budget"] == first_data.train_labels.size
