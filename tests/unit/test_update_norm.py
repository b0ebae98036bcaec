"""The bound on an honest DP-SGD update's norm (secure aggregation's derived range), checked
against independent computations: scipy's exact binomial and chi quantiles, torch's own SGD
with momentum, and real Opacus training (where the worst case is reached exactly)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fedpriv.config import RunConfig
from fedpriv.privacy.dp import DpPlan, PoissonUnits, make_private, reseed_from_os
from fedpriv.privacy.update_norm import FAILURE, dp_sgd_update_bound, run_update_bound
from fedpriv.training import get_weights, train

SETTINGS = [
    # lr, momentum, clip, sigma, sample rate, steps, units, parameters
    (1.0, 0.0, 1.0, 2.5, 1.0, 4, 73, 6274),  # the recipe on breast-cancer (n <= batch)
    (1.0, 0.0, 1.0, 1.2, 0.5, 8, 230, 6274),  # the recipe on digits
    (0.1, 0.9, 0.5, 0.8, 0.02, 200, 5000, 100_000),  # a larger hospital, with momentum
    (1.0, 0.0, 1.0, 3.0, 1.0, 1, 10, 50),  # FedSGD at a tiny hospital
]


def _weights(momentum: float, steps: int) -> np.ndarray:
    """How much the gradient of each step moves the model in the end, read off torch's own
    SGD: one unit gradient at step s, nothing at the others."""
    out = []
    for s in range(steps):
        p = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([p], lr=1.0, momentum=momentum)
        for t in range(steps):
            optimizer.zero_grad()
            p.grad = torch.ones(1) if t == s else torch.zeros(1)
            optimizer.step()
        out.append(-float(p.detach()))
    return np.asarray(out)


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_bound_holds_the_exact_quantiles_and_its_noise_part_is_tight(
    setting: tuple,
) -> None:
    lr, momentum, clip, sigma, q, steps, units, d = setting
    bound = dp_sgd_update_bound(
        lr=lr,
        momentum=momentum,
        max_grad_norm=clip,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        units=units,
        parameters=d,
    )
    p = FAILURE / 2
    expected_batch = max(1.0, units * q)
    c = _weights(momentum, steps)
    # signal: every clipped gradient of the round in one direction, the records sampled at
    # their exact (1 - p) quantile, each step's weight as torch applies it
    sampled = stats.binom.isf(p, units * steps, q) if q < 1 else units * steps
    signal = lr * clip * float(c.max()) * sampled / expected_batch
    assert bound.signal >= signal * (1 - 1e-9)
    assert bound.signal <= 1.6 * signal  # Bernstein is not far off
    # noise: N(0, s^2 I_d), s from torch's weights; its norm's exact (1 - p) quantile (chi)
    s = lr * sigma * clip * math.sqrt(float((c**2).sum())) / expected_batch
    noise = s * stats.chi.isf(p, d)
    # Gaussian concentration is loose by sqrt(2 ln(1/p)) / sqrt(d) at most: a few percent
    # for models of fedpriv's sizes, more for a toy one
    assert noise <= bound.noise <= (1.10 if d >= 1000 else 1.25) * noise


def _aligned(n: int = 20) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    """Records whose clipped gradients all point one way, round after round: one constant
    input, all of class 0, a linear model (the gradient p_1 (-1, 1) (x, 1): its direction
    is fixed, its norm 2.8 p_1 stays above the clip norm 1 over a round)."""
    x = np.full((n, 3), 1.0, dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([-3.0, 3.0]))  # class 0 unlikely: gradients >> C
    return x, y, model


def _round(x: np.ndarray, y: np.ndarray, model: nn.Module, *, sigma: float, q: float) -> float:
    """One real DP-SGD round (fedpriv's Poisson sampling and Opacus), the update's norm."""
    steps, lr, clip = 4, 0.5, 1.0
    before = get_weights(model)
    plan = DpPlan(
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps,
        rounds=1,
        max_grad_norm=clip,
        delta=1e-5,
        accountant="rdp",
        target_epsilon=1.0,
    )
    units = PoissonUnits(x, y, np.arange(y.size), sample_rate=q, steps=steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    reseed_from_os()
    private = make_private(
        model=model,
        optimizer=optimizer,
        loader=units,
        criterion=nn.CrossEntropyLoss(),
        plan=plan,
        grad_sample_mode="hooks",
    )
    train(
        private.model,
        private.loader,
        optimizer=private.optimizer,
        criterion=private.criterion,
        epochs=1,
        device=torch.device("cpu"),
        max_steps=steps,
    )
    private.close()
    after = get_weights(model)
    return float(np.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before)))


def test_real_dp_sgd_reaches_the_signal_bound_and_never_passes_the_whole_bound() -> None:
    x, y, model = _aligned()
    kwargs = {"lr": 0.5, "momentum": 0.0, "max_grad_norm": 1.0, "steps": 4, "units": 20}
    # no noise, every record every step: the bound's worst case, reached (lr C T = 2)
    norm = _round(x, y, model, sigma=0.0, q=1.0)
    exact = dp_sgd_update_bound(noise_multiplier=0.0, sample_rate=1.0, parameters=8, **kwargs)
    assert norm == pytest.approx(exact.signal, rel=1e-4) and exact.signal == pytest.approx(2.0)
    # Poisson sampling at 0.3 and noise: 30 real rounds, none over the bound
    bound = dp_sgd_update_bound(noise_multiplier=2.0, sample_rate=0.3, parameters=8, **kwargs)
    norms = []
    for _ in range(30):
        x, y, model = _aligned()
        norms.append(_round(x, y, model, sigma=2.0, q=0.3))
    assert max(norms) <= bound.total
    # the noise is Opacus's as the bound models it: with sigma 50 it dominates, and its norm
    # is about s sqrt(d), s = lr sigma C sqrt(T) / E (not, say, divided by the real batch)
    s = 0.5 * 50.0 * 1.0 * math.sqrt(4) / 20
    loud = []
    for _ in range(15):
        x, y, model = _aligned()
        loud.append(_round(x, y, model, sigma=50.0, q=1.0))
    assert 0.6 * s * math.sqrt(8) < float(np.median(loud)) < 1.4 * s * math.sqrt(8) + 2.0


def test_the_run_bound_follows_the_recipe_and_fedsgd() -> None:
    config = RunConfig(aggregation="secagg")  # the DP recipe: lr 1.0, 4 local epochs, 128
    bound = run_update_bound(config, units=73, parameters=6274)
    assert bound is not None
    assert bound.signal == pytest.approx(4.0)  # q = 1: lr C T, T = 4 epochs of one step
    sgd = run_update_bound(
        config.replace(strategy="fedsgd", server_lr=0.5), units=73, parameters=6274
    )
    assert sgd is not None and sgd.signal == pytest.approx(0.5)  # one step, lr 1, x server-lr
    assert run_update_bound(config.replace(dp=False), units=73, parameters=6274) is None
