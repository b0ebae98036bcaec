"""The independent accountant the tests check fedpriv's epsilons against: Google's
dp-accounting (PLD), never fedpriv's own code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant


def google_epsilon(
    events: Iterable[tuple[float, float, int] | Mapping[str, Any]], delta: float
) -> float:
    """Epsilon at ``delta`` of Poisson-sampled Gaussian mechanisms, each given as
    ``(noise_multiplier, sample_rate, steps)`` or as a ledger event's mapping with those keys."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for event in events:
        if isinstance(event, Mapping):
            sigma, q, steps = event["noise_multiplier"], event["sample_rate"], event["steps"]
        else:
            sigma, q, steps = event
        accountant.compose(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), int(steps)
            )
        )
    return float(accountant.get_epsilon(delta))
