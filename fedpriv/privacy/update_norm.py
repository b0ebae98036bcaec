"""How large an honest hospital's DP-SGD update can be: a high-probability bound on its norm.

Secure aggregation needs one (:mod:`fedpriv.protocols.secagg`): its fixed-point range must
hold every honest update, and the server, which cannot see any single update, can only check
that the *sum* stays within what honest hospitals could have sent. A fixed number (the old
``secagg-max-norm`` 10) does not know the run: with the DP recipe (lr 1.0, 4 local epochs)
honest breast-cancer updates have norm 10.4-10.9 and every hospital declined.

One round of DP-SGD at a hospital (Opacus, the mean over the *expected* batch ``E = m q`` of
its ``m`` units sampled at rate ``q``) takes ``T`` steps

    g_t = (sum_{i in B_t} clip_C(grad_i) + sigma C xi_t) / E,    xi_t ~ N(0, I_d)

and SGD with learning rate ``eta`` and momentum ``mu`` moves the model by
``delta = -eta sum_s c_s g_s`` with ``c_s = (1 - mu^(T-s+1)) / (1 - mu) <= 1 / (1 - mu)``.
So ``||delta|| <= signal + ||noise||`` where

- ``signal <= eta C X / ((1 - mu) E)``, ``X = sum_t |B_t|`` the records sampled over the round:
  Binomial(m T, q), bounded by Bernstein's inequality (and never above ``m T``);
- ``noise ~ N(0, s^2 I_d)``, ``s = eta sigma C sqrt(sum_s c_s^2) / E``, whose norm exceeds
  ``s (sqrt(d) + sqrt(2 ln(1/p)))`` with probability at most ``p`` (the norm is 1-Lipschitz
  and ``E||xi|| <= sqrt(d)``: Gaussian concentration).

With ``p = FAILURE / 2`` for each part, an honest update exceeds the bound with probability at
most ``FAILURE`` (1e-9) a round. The signal part is a worst case (every clipped gradient of the
round pointing the same way); the noise part is tight (within a few percent of the exact chi
quantile for models of fedpriv's sizes). tests/unit/test_update_norm.py checks both against
scipy's exact binomial and chi quantiles and against real Opacus training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fedpriv.privacy.accounting import plan_for_run

__all__ = ["FAILURE", "UpdateBound", "dp_sgd_update_bound", "run_update_bound"]

#: the probability, per hospital and round, that an honest update exceeds its bound
FAILURE = 1e-9


@dataclasses.dataclass(frozen=True)
class UpdateBound:
    """An honest DP-SGD update's norm is at most ``signal + noise`` (probability 1 - FAILURE)."""

    #: the clipped gradients' part, at worst
    signal: float
    #: the Gaussian noise's part, at its (1 - FAILURE/2) quantile
    noise: float

    @property
    def total(self) -> float:
        return self.signal + self.noise


def dp_sgd_update_bound(
    *,
    lr: float,
    momentum: float,
    max_grad_norm: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    units: int,
    parameters: int,
    scale: float = 1.0,
    failure: float = FAILURE,
) -> UpdateBound:
    """The bound for one round of ``steps`` DP-SGD steps by a hospital training ``units``
    units (patients) at ``sample_rate``, on a model of ``parameters`` values; ``scale``
    multiplies the update (FedSGD: the server learning rate applied to the gradient)."""
    if steps < 1 or units < 1 or parameters < 1:
        raise ValueError("a DP-SGD round has at least one step, one unit and one parameter")
    if not 0 <= momentum < 1 or not 0 < sample_rate <= 1:
        raise ValueError("momentum must be in [0, 1) and the sample rate in (0, 1]")
    log_inverse = math.log(2.0 / failure)  # each part gets failure / 2
    expected_batch = max(1.0, units * sample_rate)  # Opacus's divisor (fedpriv.privacy.dp)
    trials = units * steps
    mean = trials * sample_rate
    variance = trials * sample_rate * (1.0 - sample_rate)
    # Bernstein: P(X >= mean + t) <= exp(-t^2 / (2 (variance + t / 3)))
    excess = log_inverse / 3.0 + math.sqrt((log_inverse / 3.0) ** 2 + 2.0 * log_inverse * variance)
    sampled = min(float(trials), mean + excess)
    signal = lr * max_grad_norm * sampled / ((1.0 - momentum) * expected_batch)
    weights = [(1.0 - momentum ** (steps - s)) / (1.0 - momentum) for s in range(steps)]
    spread = lr * noise_multiplier * max_grad_norm * math.sqrt(sum(w * w for w in weights))
    noise = spread / expected_batch * (math.sqrt(parameters) + math.sqrt(2.0 * log_inverse))
    return UpdateBound(signal=scale * signal, noise=scale * noise)


def run_update_bound(config: Any, *, units: int, parameters: int) -> UpdateBound | None:
    """The bound for a hospital training ``units`` units under the run's settings (the noise
    it will calibrate for itself, its sample rate and steps: :func:`plan_for_run`), on a model of
    ``parameters`` values; None without DP-SGD at the hospitals (nothing bounds the update)."""
    if not config.sample_level_dp:
        return None
    gradient = config.strategy == "fedsgd"  # one step at learning rate 1, scaled by server-lr
    plan = plan_for_run(config, units, one_step_per_round=gradient)
    return dp_sgd_update_bound(
        lr=1.0 if gradient else config.lr,
        momentum=0.0 if gradient else config.momentum,
        max_grad_norm=plan.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        units=units,
        parameters=parameters,
        scale=config.server_lr if gradient else 1.0,
    )
