"""Privacy accounting: DP events, the exact and the fast epsilon, and noise calibration.

What is recorded is always the mechanism (:class:`DpEvent`), never only an epsilon, so any
accountant can recompose a history. Two ways to turn events into an epsilon:

- **exact**: the ledger's accountant (Opacus's PRV by default, or Opacus's RDP); tight but
  0.1-1 s per composition;
- **fast**: Rényi DP curves at integer orders (Opacus's analysis). The RDP of ``k`` steps of
  one mechanism is ``k`` times its one-step curve, so a history is a sum of cached vectors
  and its epsilon a fraction of a millisecond. It is a rigorous upper bound, looser than PRV
  by ~5-15 %.

Both are valid upper bounds on the true privacy loss, so the smaller one is reported and any
one of them under a cap proves the cap holds: the ledger checks with the fast one and asks
the exact one only when the fast one says a cap would be passed.

No torch at import: ``fedpriv budget`` reads ledgers (whose curves are cached in them)
without importing it. Google's dp-accounting, an independent implementation, checks all of
this in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fedpriv.config import ACCOUNTANTS
from fedpriv.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "DpEvent",
    "DpPlan",
    "calibrate_noise",
    "compose_epsilon",
    "epsilon_from_rdp",
    "merge_events",
    "plan_dp",
    "plan_for_run",
    "rdp_of",
    "rdp_per_step",
    "statistics_event",
    "statistics_noise",
]

#: Rényi orders of the fast path: integer orders only, cheap to compute (4 ms a mechanism,
#: against 20 ms with order 1.5 and 55 ms with seven fractional ones), at bounds 0-4 % looser
#: between epsilon 4 and 10 (and more above 20, where no cap is)
RDP_ORDERS = np.array(
    [2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 256],
    dtype=np.float64,
)


_USELESS_RDP = 1e30


@dataclasses.dataclass(frozen=True)
class DpEvent:
    """``steps`` Poisson-sampled Gaussian mechanisms at sample rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def merge_events(events: Iterable[DpEvent]) -> tuple[tuple[float, float, int], ...]:
    """Steps of the same mechanism added up (``k1`` then ``k2`` steps is ``k1 + k2`` steps):
    the same epsilon, and the exact accountant's cost then grows with the number of distinct
    mechanisms, not with the number of rounds. Sorted, so equal histories look equal."""
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps > 0:
            key = (float(e.noise_multiplier), float(e.sample_rate))
            merged[key] = merged.get(key, 0) + int(e.steps)
    return tuple(sorted((sigma, q, steps) for (sigma, q), steps in merged.items()))


def compose_epsilon(events: Iterable[DpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all ``events``: the smaller of the exact accountant's and the
    fast RDP bound (both are rigorous upper bounds)."""
    history = merge_events(events)
    if not history:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant '{accountant}': use prv or rdp")
    fast = epsilon_from_rdp(_rdp_of_history(history), delta)
    return min(_exact(history, delta, accountant), fast)


@functools.lru_cache(maxsize=512)
def _exact(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Opacus's accountant on a merged history: its RDP (``rdp``), or its PRV accountant
    (``prv``, Gopi et al. 2021) step by step as ``PRVAccountant.get_epsilon`` does it, except
    for the size of the safe domain (see :func:`_prv_epsilon`)."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    if accountant == "rdp":
        total = sum(steps * _opacus_rdp_step(sigma, q) for sigma, q, steps in history)
        epsilon, _ = opacus_rdp.get_privacy_spent(orders=_OPACUS_ALPHAS, rdp=total, delta=delta)
        return float(epsilon)
    return _prv_epsilon(history, delta, _PRV_EPS_ERROR)


_OPACUS_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
_PRV_EPS_ERROR = 0.01


@functools.lru_cache(maxsize=4096)
def _opacus_rdp_step(sigma: float, q: float) -> np.ndarray:
    from opacus.accountants.analysis import rdp as opacus_rdp

    curve = np.asarray(
        opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_OPACUS_ALPHAS),
        dtype=np.float64,
    )
    curve.setflags(write=False)
    return curve


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, eps_error: float
) -> float:
    """``opacus.accountants.PRVAccountant.get_epsilon(delta)`` for this history, with the
    safe domain's size (an RDP tail bound, Gopi et al. remark 5.6) taken from the fast RDP
    curves, which are cached per mechanism, instead of Opacus's RDP at 99 fractional orders,
    recomputed for every call (0.5 s per mechanism). Fewer orders give a bound at least as
    large: the domain is never smaller than Opacus's, only the grid's alignment differs
    (epsilons agree to within 0.1 %, tests/unit/test_dp_accounting.py)."""
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    delta_error = delta / 1000
    steps = [k for _, _, k in history]
    total = sum(steps)
    # the safe domain (Gopi et al., remark 5.6), as Opacus's compute_safe_domain_size
    size = epsilon_from_rdp(_rdp_of_history(history), delta_error / 4)
    for sigma, q, _ in history:
        size = max(size, epsilon_from_rdp(rdp_per_step(sigma, q), delta_error / (8 * total)))
    size = max(size, eps_error) + 3
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh)
    with np.errstate(divide="ignore"):  # log(1 - q) at q = 1 (every record in every step)
        dprvs = [
            discretize(
                TruncatedPrivacyRandomVariable(
                    PoissonSubsampledGaussianPRV(q, sigma), domain.t_min, domain.t_max
                ),
                domain,
            )
            for sigma, q, _ in history
        ]
        composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=steps)
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


# ---- the fast path: RDP curves --------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP at :data:`RDP_ORDERS` of one Poisson-subsampled Gaussian step (read-only):
    Opacus's analysis (Mironov, Talwar, Zhang 2019), whose integer orders are closed sums."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    curve = np.asarray(
        opacus_rdp.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
        ),
        dtype=np.float64,
    )
    # an infinite order (no noise) is useless, never chosen; keep it finite so that sums and
    # products over histories never meet 0 * inf
    curve = np.where(np.isfinite(curve), curve, _USELESS_RDP)
    curve.setflags(write=False)
    return curve


def rdp_of(events: Iterable[DpEvent]) -> np.ndarray:
    """The RDP curve of a history: the sum of its steps' curves."""
    return _rdp_of_history(merge_events(events))


def _rdp_of_history(history: tuple[tuple[float, float, int], ...]) -> np.ndarray:
    total = np.zeros_like(RDP_ORDERS)
    for sigma, q, steps in history:
        total = total + steps * rdp_per_step(sigma, q)
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` from an RDP curve at :data:`RDP_ORDERS`: Balle et al. 2020,
    Theorem 21 (the conversion Opacus uses), in numpy so that reading a ledger needs
    neither torch nor Opacus."""
    rdp = np.asarray(rdp, dtype=np.float64)
    if not np.any(rdp > 0):
        return 0.0
    orders = RDP_ORDERS
    with np.errstate(invalid="ignore", over="ignore"):
        epsilon = (
            rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
        )
    epsilon = epsilon[np.isfinite(epsilon)]
    return float(max(0.0, epsilon.min())) if epsilon.size else math.inf


# ---- plans and calibration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DpPlan:
    """One hospital's DP-SGD settings for one run (the unit sampled is a patient)."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float
    #: epsilon of the whole planned run for a patient with no earlier history
    planned_epsilon: float = math.nan

    def round_event(self) -> DpEvent:
        return DpEvent(self.noise_multiplier, self.sample_rate, self.steps_per_round)


def plan_dp(
    *,
    num_records: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    one_step_per_round: bool,
    target_epsilon: float,
    delta: float,
    accountant: str,
    max_grad_norm: float,
    noise_multiplier: float = 0.0,
    prior: tuple[DpEvent, ...] = (),
) -> DpPlan:
    """Calibrate the noise for a hospital with ``num_records`` training units (patients, or
    records when each patient has one).

    The sample rate is Opacus's: ``1 / ceil(n / batch_size)``; an epoch is ``ceil(n / B)``
    Poisson-sampled steps. FedSGD takes one step per round. ``noise_multiplier > 0`` skips
    calibration (the planned epsilon is then whatever it gives). ``prior``: the run's other
    mechanisms on the same patients (the feature-statistics release): the noise is
    calibrated so that they and DP-SGD *together* stay at the target.
    """
    if num_records < 1:
        raise ConfigError("a hospital with no training records cannot train")
    if delta >= 1.0 / num_records:
        raise ConfigError(
            f"delta {delta:g} must be below 1/n = {1.0 / num_records:.3g} for a hospital with "
            f"{num_records} patients in training: lower --delta"
        )
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant '{accountant}': use prv or rdp")
    batches = math.ceil(num_records / batch_size)
    sample_rate = 1.0 / batches
    steps_per_round = 1 if one_step_per_round else local_epochs * batches
    if noise_multiplier <= 0:
        noise_multiplier = calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps_per_round * rounds,
            accountant=accountant,
            prior=prior,
        )
    planned = compose_epsilon(
        [*prior, DpEvent(noise_multiplier, sample_rate, steps_per_round * rounds)],
        delta=delta,
        accountant=accountant,
    )
    return DpPlan(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        max_grad_norm=max_grad_norm,
        delta=delta,
        accountant=accountant,
        target_epsilon=target_epsilon,
        planned_epsilon=planned,
    )


@functools.lru_cache(maxsize=256)
def plan_for_run(config: Any, num_records: int, *, one_step_per_round: bool) -> DpPlan:
    """:func:`plan_dp` with a run configuration's settings (a ``RunConfig``): the noise a
    hospital with ``num_records`` training units calibrates for itself."""
    return plan_dp(
        num_records=num_records,
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
        rounds=config.rounds,
        one_step_per_round=one_step_per_round,
        target_epsilon=config.epsilon,
        delta=config.delta,
        accountant=config.accountant,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=config.noise_multiplier,
        prior=tuple(e for e in (statistics_event(config),) if e is not None),
    )


def statistics_event(config: Any) -> DpEvent | None:
    """The feature-statistics release of a run (``normalisation = "federated"`` with
    sample-level DP; a ``RunConfig``): one Gaussian mechanism on every training patient of a
    hospital (sample rate 1, one step) whose epsilon alone is ``stats_epsilon``; None when
    the run releases none."""
    if config.normalisation != "federated" or not config.sample_level_dp:
        return None
    return DpEvent(statistics_noise(config.stats_epsilon, config.delta, config.accountant), 1.0, 1)


@functools.lru_cache(maxsize=64)
def statistics_noise(epsilon: float, delta: float, accountant: str) -> float:
    """The noise multiplier of a one-shot Gaussian release at ``epsilon`` (at ``delta``)."""
    return calibrate_noise(
        target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1, accountant=accountant
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[DpEvent, ...] = (),
) -> float:
    """The smallest noise multiplier (to about 0.5 %) whose epsilon is at most the target,
    composed with the ``prior`` events (other mechanisms of the run on the same patients).

    Three stages, cheapest first: bisection on the fast RDP bound (a few ms a step; never
    below the exact epsilon, so its answer is an upper end); with PRV, regula falsi on a
    coarse PRV (``eps_error`` 0.1, ten times cheaper) from there; then one or two exact
    evaluations to land just under the target. Only an answer the exact accountant (the
    ledger's) puts at or under the target is returned.
    """

    before = rdp_of(prior)
    if prior and epsilon_from_rdp(before, delta) >= target_epsilon:
        raise ConfigError(
            f"the run's other releases already spend epsilon {target_epsilon:g}: nothing is "
            "left for DP-SGD; lower stats-epsilon"
        )

    def fast(sigma: float) -> float:
        return epsilon_from_rdp(before + steps * rdp_per_step(sigma, sample_rate), delta)

    def prv(sigma: float, eps_error: float) -> float:
        history = merge_events([*prior, DpEvent(sigma, sample_rate, steps)])
        return _prv_epsilon(history, delta, eps_error)

    def exact(sigma: float) -> float:
        return compose_epsilon(
            [*prior, DpEvent(sigma, sample_rate, steps)], delta=delta, accountant=accountant
        )

    high = 1.0
    while fast(high) > target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon:g}")
    low = high / 2.0 if high > 1.0 else 0.0
    # the fast bound only brackets the PRV answer (to 5 %); with RDP it is the answer (0.5 %)
    tolerance = 0.005 if accountant == "rdp" else 0.05
    while (high - low) > tolerance * high:
        mid = 0.5 * (low + high)
        if fast(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    if accountant == "rdp":
        # the fast bound is an RDP accountant too (fewer orders: never below Opacus's)
        return high
    coarse = _regula_falsi(
        lambda sigma: prv(sigma, _COARSE_EPS_ERROR), target_epsilon, high, tolerance=0.02
    )
    sigma, epsilon = coarse, exact(coarse)
    while epsilon > target_epsilon:  # not expected: the coarse bound is the looser one
        sigma *= 1.01
        epsilon = exact(sigma)
    # then down along the local slope of log(epsilon) in log(sigma), which the coarse bound
    # measures cheaply; kept only if the exact epsilon is still at or under the target
    slope = math.log(prv(0.98 * coarse, _COARSE_EPS_ERROR) / prv(coarse, _COARSE_EPS_ERROR))
    slope /= -math.log(0.98)
    if slope > 0 and epsilon < 0.998 * target_epsilon:
        closer = sigma * (epsilon / (0.999 * target_epsilon)) ** (1.0 / slope)
        if exact(closer) <= target_epsilon:
            return closer
    return sigma


_COARSE_EPS_ERROR = 0.1


def _regula_falsi(
    epsilon: Callable[[float], float], target: float, high: float, *, tolerance: float
) -> float:
    """The smallest ``sigma`` (to ``tolerance``) with ``epsilon(sigma) <= target``, below
    ``high`` (where it holds): Illinois regula falsi on ``log(epsilon / target)``."""
    hi, f_hi = high, math.log(epsilon(high) / target)
    lo = 0.8 * hi
    f_lo = math.log(epsilon(lo) / target)
    while f_lo <= 0:  # widen until the bracket straddles the target
        hi, f_hi, lo = lo, f_lo, 0.8 * lo
        f_lo = math.log(epsilon(lo) / target)
    side = 0
    for _ in range(50):
        if hi - lo <= tolerance * hi:
            break
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        mid = min(max(mid, lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
        f_mid = math.log(epsilon(mid) / target)
        if f_mid > 0:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2
            side = 1
    return hi
