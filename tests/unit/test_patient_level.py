"""Patient-level DP-SGD: patients are sampled, and each sampled patient gives one clipped
gradient, however many records it has.

Checked against a brute-force expectation over every possible Poisson sample of a tiny
dataset, and empirically: a patient with many records is distinguishable far beyond the
accounted epsilon under record-level DP-SGD, and not under patient-level DP-SGD.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy import stats
from torch import nn

from fedpriv.privacy.accounting import DpEvent, compose_epsilon
from fedpriv.privacy.dp import DpPlan, PoissonUnits, make_private
from fedpriv.training import train


def _plan(noise: float, clip: float, q: float) -> DpPlan:
    return DpPlan(
        noise_multiplier=noise,
        sample_rate=q,
        steps_per_round=1,
        rounds=1,
        max_grad_norm=clip,
        delta=1e-5,
        accountant="prv",
        target_epsilon=1.0,
    )


def _linear(weights: np.ndarray) -> nn.Module:
    model = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weights))
    return model


def _step(
    x: np.ndarray, y: np.ndarray, units: np.ndarray, *, weights: np.ndarray, plan: DpPlan
) -> np.ndarray:
    """One DP-SGD step at learning rate 1 from ``weights``; returns the step taken."""
    model = _linear(weights)
    loader = PoissonUnits(x, y, units, sample_rate=plan.sample_rate, steps=1)
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        loader=loader,
        criterion=nn.CrossEntropyLoss(),
        plan=plan,
        grad_sample_mode="hooks",
    )
    try:
        train(
            private.model,
            private.loader,
            optimizer=private.optimizer,
            criterion=private.criterion,
            epochs=1,
            device=torch.device("cpu"),
            max_steps=1,
        )
    finally:
        private.close()
    return weights - model.weight.detach().numpy()


def _record_gradient(weights: np.ndarray, x: np.ndarray, y: int) -> np.ndarray:
    """d CE / d W for one record, by hand: (softmax(Wx) - onehot(y)) x^T."""
    logits = weights @ x
    p = np.exp(logits - logits.max())
    p /= p.sum()
    p[y] -= 1.0
    return np.outer(p, x)


def _clip(g: np.ndarray, c: float) -> np.ndarray:
    norm = float(np.linalg.norm(g))
    return g * min(1.0, c / norm) if norm > 0 else g


def test_patient_sampling_and_clipping_match_a_brute_force_expectation() -> None:
    rng = np.random.default_rng(0)
    units = np.array([0, 1, 1, 2, 2, 2])  # 3 patients with 1, 2 and 3 records
    x = rng.normal(size=(6, 4)).astype(np.float32) * 3
    y = np.array([0, 1, 0, 1, 1, 0])
    weights = rng.normal(size=(2, 4)).astype(np.float32)
    clip, q = 0.5, 0.4
    plan = _plan(0.0, clip, q)
    # brute force, independent of Opacus: every subset of patients with its probability;
    # each sampled patient contributes its clipped mean gradient; the sum is divided by
    # the expected number of patients in a batch
    per_patient = [
        _clip(
            np.mean(
                [_record_gradient(weights, x[i], y[i]) for i in np.flatnonzero(units == u)], axis=0
            ),
            clip,
        )
        for u in range(3)
    ]
    expected = np.zeros_like(weights, dtype=np.float64)
    for chosen in itertools.product([0, 1], repeat=3):
        probability = math.prod(q if c else 1 - q for c in chosen)
        expected += (
            probability * sum(g for g, c in zip(per_patient, chosen, strict=True) if c) / (3 * q)
        )
    torch.manual_seed(0)
    trials = 3000
    steps = np.stack([_step(x, y, units, weights=weights, plan=plan) for _ in range(trials)])
    mean = steps.mean(axis=0)
    standard_error = steps.std(axis=0) / math.sqrt(trials)
    assert np.all(np.abs(mean - expected) <= 4 * standard_error + 1e-6), (mean, expected)
    # the largest step is every patient at once, each clipped: never more than 3 C / (3 q)
    assert np.linalg.norm(steps.reshape(trials, -1), axis=1).max() <= 3 * clip / (3 * q) + 1e-5


def test_a_patient_is_sampled_whole_at_the_plan_rate() -> None:
    units = np.repeat(np.arange(50), np.arange(50) % 4 + 1)  # 1 to 4 records per patient
    x = np.arange(units.size, dtype=np.float32)[:, None]
    y = np.zeros(units.size, dtype=np.int64)
    loader = PoissonUnits(x, y, units, sample_rate=0.2, steps=5)
    torch.manual_seed(1)
    seen = np.zeros(50)
    batches = 0
    for _ in range(200):
        for inputs, _ in loader:
            rows = inputs[:, 0].numpy().astype(int)
            patients = np.unique(units[rows])
            # all of a sampled patient's records, and only theirs
            assert sorted(rows.tolist()) == sorted(
                np.flatnonzero(np.isin(units, patients)).tolist()
            )
            seen[patients] += 1
            batches += 1
    assert batches == 1000
    rate = seen / batches
    assert np.all(np.abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / batches))


def _distinguish(grouped: bool, noise: float, clip: float, trials: int) -> tuple[float, float]:
    """One step with and without a patient who has 8 records, ``trials`` times each; the
    step projected on that patient's gradient direction is the attacker's score."""
    rng = np.random.default_rng(3)
    others = rng.normal(size=(32, 4)).astype(np.float32)
    other_labels = rng.integers(0, 2, 32)
    special = np.tile(np.array([[6.0, -6.0, 6.0, -6.0]], dtype=np.float32), (8, 1))
    special_labels = np.ones(8, dtype=np.int64)
    weights = np.zeros((2, 4), dtype=np.float32)
    direction = _record_gradient(weights, special[0], 1)
    direction /= np.linalg.norm(direction)
    x_in = np.concatenate([others, special])
    y_in = np.concatenate([other_labels, special_labels])
    if grouped:  # patient-level: the 8 records are one patient
        units_in = np.concatenate([np.arange(32), np.full(8, 32)])
    else:  # record-level: each record its own unit
        units_in = np.arange(40)
    plan = _plan(noise, clip, 1.0)

    def score(x: np.ndarray, y: np.ndarray, units: np.ndarray) -> float:
        # the DP step times the (public) expected batch: the clipped sum plus the noise
        return (
            float(np.sum(_step(x, y, units, weights=weights, plan=plan) * direction))
            * np.unique(units).size
        )

    torch.manual_seed(4)
    present = np.array([score(x_in, y_in, units_in) for _ in range(trials)])
    absent = np.array([score(others, other_labels, np.arange(32)) for _ in range(trials)])
    # a threshold fixed in advance: 2.5 standard deviations of the (public) noise
    threshold = np.median(absent) + 2.5 * noise * clip
    tpr = np.mean(present > threshold)
    fpr = np.mean(absent > threshold)
    # Clopper-Pearson: a lower bound on TPR, an upper bound on FPR, at 95 % overall
    tpr_low = stats.beta.ppf(0.025, tpr * trials, trials - tpr * trials + 1) if tpr > 0 else 0.0
    fpr_high = stats.beta.ppf(0.975, fpr * trials + 1, trials - fpr * trials)
    lower_bound = math.log(max(tpr_low - 1e-5, 1e-12) / fpr_high) if tpr_low > 1e-5 else 0.0
    return max(lower_bound, 0.0), float(np.mean(present) - np.mean(absent))


def test_record_level_dp_under_protects_a_many_record_patient_and_patient_level_does_not() -> None:
    clip, noise, trials = 1.0, 2.5, 500
    accounted = compose_epsilon([DpEvent(noise, 1.0, 1)], delta=1e-5, accountant="prv")
    record_bound, record_shift = _distinguish(False, noise, clip, trials)
    patient_bound, patient_shift = _distinguish(True, noise, clip, trials)
    # the patient's 8 records move the step by ~8 C under record-level clipping, by C at most
    # under patient-level clipping (each mean carries noise of std ~0.11 here)
    assert record_shift > 6 * clip and patient_shift < 1.5 * clip
    assert record_bound > accounted, (record_bound, accounted)
    assert patient_bound < accounted, (patient_bound, accounted)
