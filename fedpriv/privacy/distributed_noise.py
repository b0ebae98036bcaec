"""Distributed noise: under secure aggregation, each hospital adds only its share of the
record-level noise of a one-step (FedSGD) round (``distributed-noise = true``).

Without it, every hospital's DP-SGD step adds the full Gaussian noise ``sigma C`` its own
patients need, and the sum the server unmasks carries ``k`` of them. The server never sees
one update, only the sum, so what protects a patient of hospital ``i`` is the noise *in the
sum*. Each hospital therefore adds ``sigma C / sqrt(t - c)`` (in the units of the sum, see
``scale`` below), and the sum holds at least the full ``sigma C`` from honest hospitals.

Threat model (the guarantee is conditional on it; privacy.json and the ledger's run plan say
so):

- the server is honest-but-curious: it runs the protocol (the same orders to everyone) and
  tries to learn from what it sees;
- at most ``c`` hospitals (``noise-colluders``) collude with it: they know, and can subtract,
  their own noise shares (a hospital that adds no noise at all counts as one of them);
- hospitals may drop out: secure aggregation (:mod:`fedpriv.protocols.secagg`) unmasks a
  round only when at least its threshold ``t`` of the hospitals sent their masked update,
  and never unmasks one alone or a sum over fewer.

So any sum the server can unmask holds the shares of at least ``t - c`` honest hospitals,
each ``N(0, (sigma C)^2 / (t - c))`` per value: in total at least ``(sigma C)^2``. One
patient's clipped gradient enters one hospital's sum only (sensitivity ``C``); the Poisson
sampling of patients is that hospital's own (rate ``q``); the other hospitals' terms do not
depend on the patient. So each round, the sum is (post-processing of) a Poisson-subsampled
Gaussian mechanism with noise multiplier at least ``sigma`` on that hospital's patients, and
the hospital's ledger records ``(sigma, q, steps)``: the accounting of local noise, unchanged.
If the assumption fails (more than ``c`` colluders, or a server that deviates and unmasks a
sum over fewer than ``t`` hospitals), a patient is still covered by its own hospital's share:
multiplier ``sigma / sqrt(t - c)`` (assuming its own hospital honest). Both epsilons are
reported.

The default ``c`` is the project's threat model: a minority of the ``k`` hospitals may
collude, ``floor((k - 1) / 2)``, capped at ``t - 1`` because secure aggregation itself gives
nothing against ``t`` colluders (they could unmask a hospital's update). With the default
threshold (a majority, ``t = floor(k / 2) + 1``) that leaves ``t - c = 1`` for odd ``k``
(no gain: each hospital adds all of its noise) and 2 for even ``k``; a larger threshold (at
the price of rounds lost to drop-outs) or a smaller ``c`` gives more.

Units. A hospital's update enters the secure sum as ``a_i (G_i + Z_i)`` times factors common
to every hospital (learning rate, the weight unit), where ``G_i`` is its sum of clipped
gradients, ``Z_i`` its noise and ``a_i = n_i / max(1, u_i q_i)`` (its example count over its
expected batch of patients). A patient of ``i`` moves the sum by ``a_i C``; so hospital ``j``
adds multiplier ``rho / (a_j sqrt(t - c))``, with one ``rho`` (``scale``) for the run, at least
``a_i sigma_i`` for every hospital ``i``: the server takes the largest over the hospitals'
declared sizes, and each hospital checks ``a_i sigma_i <= rho`` before it trains (and
declines the round otherwise, its event already recorded: its patients would be
under-protected). With one record per patient ``a_i = 1 / q_i``; a patient with several
records makes ``a_i`` larger, so the server needs both counts of each hospital: before round
1 every hospital declares its training records ``n_i`` and the patients ``u_i`` they belong
to (its patient column; without one, its distinct records), and ``sigma_i``, ``q_i`` follow
from ``u_i`` as the hospital computes them itself (:func:`noise_scale`). A declaration
without a patient count (an older site) means one record per patient. The check is what
makes the declaration safe: each hospital checks what it really holds, so whatever it
declared it is never under-protected. A declaration that makes its ``a_i sigma_i`` look
smaller than it is (typically more patients than it has, e.g. one per record, or fewer
records) leaves ``rho`` short of its need and it declines every round; one that makes it
look larger only raises everyone's noise (its claims are capped by its declared records,
and a cohort under ``min-patients`` has no say).

Disclosure. A declaration tells the server two counts per site: the size of its training
set and of the cohort behind it (so also the mean records per patient). That is a small
disclosure about the site, not about a patient, of the kind already made (the record count
was declared before, and every round's reply carries an example count); neither count is
protected by DP. A site for which its number of patients is itself sensitive should not
take part under distributed noise.

Rounding. Secure aggregation rounds every value of a hospital's vector to its fixed-point
grid (step ``s`` in the units of the sum, about 1e-8 of the range), so one patient can move
the sum by up to ``sqrt(d) s`` more than ``a_i C``. As for client-level distributed DP (the
README), that is counted as sensitivity: every hospital scales its share up by
``1 + sqrt(d) s' / C`` (``s'``: the step in the units of a hospital's gradient sum, ``rounding``
below; ``a_i >= 1``, so this covers every hospital), about 3e-5 on breast-cancer's MLP. The
argument treats the rounding as a bounded perturbation of the contribution, not as a discrete
mechanism (Kairouz, Liu, Steinke 2021 analyse that exactly); the same holds for client-level DP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.errors import ConfigError, FedprivError
from fedpriv.privacy.accounting import (
    DpEvent,
    DpPlan,
    compose_epsilon,
    plan_for_run,
    statistics_event,
)

__all__ = [
    "ASSUMPTION",
    "NoiseSplit",
    "default_colluders",
    "noise_scale",
    "sum_scale",
    "usable_size",
]

#: what the guarantee rests on, in words (privacy.json, the privacy report)
ASSUMPTION = (
    "conditional: holds while at most {t} hospitals collude with the server and it unmasks "
    "only sums over at least {m} hospitals (secure aggregation's threshold); otherwise "
    "fallback_epsilon"
)

#: relative slack of the hospital's check a_i sigma_i <= rho (float rounding in the JSON order)
_SLACK = 1e-9


def default_colluders(hospitals: int, threshold: int) -> int:
    """A minority of the ``hospitals``, and fewer than the secure-aggregation threshold."""
    return max(0, min((hospitals - 1) // 2, threshold - 1))


def sum_scale(*, examples: int, units: int, sample_rate: float) -> float:
    """``a_i``: how a hospital's summed clipped gradients and noise enter the secure sum
    (its secagg weight, the example count, over Opacus's divisor, the expected batch)."""
    return examples / max(1.0, units * sample_rate)


def noise_scale(
    config: Any, declared: Mapping[str, int], patients: Mapping[str, int] | None = None
) -> float:
    """``rho`` for a run: the largest ``a_i sigma_i`` of the declared hospitals, each with the
    noise it calibrates for its patients (:func:`plan_for_run`) and ``a_i`` from its declared
    training records (``declared``) and the patients they belong to (``patients``;
    :func:`sum_scale`). A hospital that declared no patient count holds one record per
    patient. Hospitals declared with fewer than ``min-patients`` patients, or with counts that
    cannot be (not whole, negative, more patients than records), have no say: the first
    because a liar claiming a tiny hospital would raise everyone's noise, the second because
    nothing sound can be computed from them (an honest hospital never sends them)."""
    patients = patients or {}
    values = []
    for name, records in declared.items():
        size = usable_size(records, patients.get(name, records))
        if size is None or size[1] < config.min_patients:
            continue
        examples, units = size
        try:
            plan = plan_for_run(config, units, one_step_per_round=True)
        except ConfigError:  # this hospital cannot train at all; it says why itself
            continue
        a = sum_scale(examples=examples, units=units, sample_rate=plan.sample_rate)
        values.append(a * plan.noise_multiplier)
    if not values:
        raise FedprivError(
            "distributed noise: no hospital declared enough training patients to size the noise"
        )
    return max(values)


def usable_size(examples: Any, patients: Any) -> tuple[int, int] | None:
    """A declared ``(records, patients)`` as ints, or None when they cannot be a hospital's
    (not whole numbers, negative, more patients than records, records of no patient)."""
    counts = []
    for value in (examples, patients):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            return None
        if not (math.isfinite(float(value)) and float(value).is_integer() and value >= 0):
            return None
        counts.append(int(value))
    if counts[1] > counts[0] or (counts[0] > 0 and counts[1] == 0):
        return None
    return counts[0], counts[1]


@dataclasses.dataclass(frozen=True)
class NoiseSplit:
    """One run's split of the record-level noise across hospitals."""

    #: ``t``: secure aggregation unmasks only sums over at least this many hospitals
    threshold: int
    #: ``c``: hospitals assumed at most to collude with the server
    colluders: int
    #: ``rho``: the noise multiplier, in the units of the sum, honest shares add up to
    scale: float
    #: secure aggregation's fixed-point step in units of a hospital's gradient sum (its step
    #: times the weight unit over the server learning rate); 0: no rounding
    rounding: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.colluders < self.threshold:
            raise FedprivError(
                f"distributed noise: {self.colluders} colluders against a threshold of "
                f"{self.threshold}: secure aggregation protects nothing then"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise FedprivError(f"distributed noise: unusable noise scale {self.scale!r}")

    @property
    def honest(self) -> int:
        """Honest hospitals in any sum the server can unmask, at least."""
        return self.threshold - self.colluders

    def added(self, plan: DpPlan, scale_of_hospital: float, *, values: int = 0) -> float:
        """The noise multiplier this hospital adds itself, for a secure-aggregation vector of
        ``values`` values; FedprivError if the run's shares would not cover its own patients
        (``a_i sigma_i > rho``)."""
        needed = scale_of_hospital * plan.noise_multiplier
        if needed > self.scale * (1 + _SLACK):
            raise FedprivError(
                f"distributed noise: this hospital's patients need noise {needed:.6g} in the "
                f"sum, the run's shares give {self.scale:.6g} (it holds other records or "
                "patients than it declared, or some of its patients were left out for budget "
                "or merged by its ledger): it declines the round"
            )
        rounding = 1.0 + math.sqrt(values) * self.rounding / plan.max_grad_norm
        return rounding * self.scale / (scale_of_hospital * math.sqrt(self.honest))

    def fallback_multiplier(self, plan: DpPlan) -> float:
        """What covers a patient if the assumption fails: its hospital's own share."""
        return plan.noise_multiplier / math.sqrt(self.honest)

    def fallback_epsilon(self, plan: DpPlan, config: Any) -> float:
        """The whole planned run's epsilon for a patient if the assumption fails (the run's
        other releases, e.g. the feature statistics, included as planned)."""
        prior = [e for e in (statistics_event(config),) if e is not None]
        event = DpEvent(
            self.fallback_multiplier(plan), plan.sample_rate, plan.steps_per_round * plan.rounds
        )
        return compose_epsilon([*prior, event], delta=plan.delta, accountant=plan.accountant)

    def record(self) -> dict[str, Any]:
        """The assumption, as the ledger's run plan keeps it."""
        return {"colluders": self.colluders, "threshold": self.threshold, "scale": self.scale}

    def report(self, plan: DpPlan, added: float, config: Any) -> dict[str, Any]:
        """The privacy report's account of the split (privacy.json, per hospital)."""
        return {
            "colluders": self.colluders,
            "threshold": self.threshold,
            "honest_shares": self.honest,
            "scale": self.scale,
            "rounding": self.rounding,
            "added_noise_multiplier": added,
            "conditional_noise_multiplier": plan.noise_multiplier,
            "fallback_noise_multiplier": self.fallback_multiplier(plan),
            "planned_epsilon": plan.planned_epsilon,
            "fallback_planned_epsilon": self.fallback_epsilon(plan, config),
            "assumption": ASSUMPTION.format(t=self.colluders, m=self.threshold),
        }
