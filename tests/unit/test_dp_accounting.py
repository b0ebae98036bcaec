"""Our epsilon against Google's dp-accounting (PLD), an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from fedpriv.errors import ConfigError
from fedpriv.privacy.dp import DpEvent, calibrate_noise, compose_epsilon, plan_dp


def google_epsilon(events: list[DpEvent], delta: float) -> float:
    """Epsilon of the composed Poisson-subsampled Gaussian mechanisms, by PLD accounting."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for e in events:
        accountant.compose(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(
                    e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
        )
    return float(accountant.get_epsilon(delta))


CASES = [
    # one hospital's run: 10 rounds of 8 steps at q = 1/8
    [DpEvent(1.1, 1 / 8, 8)] * 10,
    # a long run at a small sample rate
    [DpEvent(0.9, 0.02, 500)],
    # two runs with different settings on the same records, composed in one ledger
    [DpEvent(1.5, 0.25, 4)] * 5 + [DpEvent(0.8, 0.1, 10)] * 3,
    # FedSGD: one step per round
    [DpEvent(2.0, 0.05, 1)] * 50,
]


@pytest.mark.parametrize("events", CASES)
def test_prv_epsilon_matches_google_pld_within_3_percent(events: list[DpEvent]) -> None:
    delta = 1e-5
    ours = compose_epsilon(events, delta=delta, accountant="prv")
    theirs = google_epsilon(events, delta)
    assert ours == pytest.approx(theirs, rel=0.03), (ours, theirs)


@pytest.mark.parametrize("events", CASES)
def test_rdp_epsilon_is_an_upper_bound_close_to_pld(events: list[DpEvent]) -> None:
    delta = 1e-5
    ours = compose_epsilon(events, delta=delta, accountant="rdp")
    theirs = google_epsilon(events, delta)
    # RDP conversion is looser than PLD, never tighter
    assert theirs * 0.99 <= ours <= theirs * 1.35, (ours, theirs)


def test_merging_repeated_events_changes_nothing() -> None:
    split = compose_epsilon([DpEvent(1.0, 0.1, 10)] * 6, delta=1e-5, accountant="rdp")
    whole = compose_epsilon([DpEvent(1.0, 0.1, 60)], delta=1e-5, accountant="rdp")
    assert split == pytest.approx(whole)
    assert compose_epsilon([], delta=1e-5, accountant="prv") == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_lands_at_or_just_under_the_target(accountant: str) -> None:
    plan = plan_dp(
        num_records=230,
        batch_size=32,
        local_epochs=1,
        rounds=20,
        one_step_per_round=False,
        target_epsilon=4.0,
        delta=1e-5,
        accountant=accountant,
        max_grad_norm=1.0,
    )
    assert plan.sample_rate == pytest.approx(1 / 8)  # Opacus: 1 / ceil(230 / 32)
    assert plan.steps_per_round == 8
    assert 0.97 * 4.0 <= plan.planned_epsilon <= 4.0
    # the independent accountant agrees the planned run stays under (PRV: near) the target
    run = [DpEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * 20)]
    independent = google_epsilon(run, 1e-5)
    assert independent <= 4.0 * 1.03
    if accountant == "prv":
        assert independent == pytest.approx(4.0, rel=0.03)
    # and a bit less noise would overshoot: the calibration is tight, not merely safe
    less = DpEvent(plan.noise_multiplier * 0.97, plan.sample_rate, plan.steps_per_round * 20)
    assert compose_epsilon([less], delta=1e-5, accountant=accountant) > 4.0


def test_fedsgd_plans_one_step_per_round() -> None:
    plan = plan_dp(
        num_records=100,
        batch_size=10,
        local_epochs=5,
        rounds=30,
        one_step_per_round=True,
        target_epsilon=2.0,
        delta=1e-5,
        accountant="rdp",
        max_grad_norm=1.0,
    )
    assert plan.steps_per_round == 1 and plan.sample_rate == pytest.approx(0.1)
    assert plan.planned_epsilon <= 2.0


def test_delta_must_be_below_one_over_n() -> None:
    with pytest.raises(ConfigError, match=r"delta 0\.01 must be below 1/n"):
        plan_dp(
            num_records=120,
            batch_size=32,
            local_epochs=1,
            rounds=5,
            one_step_per_round=False,
            target_epsilon=4.0,
            delta=0.01,
            accountant="prv",
            max_grad_norm=1.0,
        )


def test_calibration_is_monotone_in_the_target() -> None:
    kwargs = {"delta": 1e-5, "sample_rate": 0.1, "steps": 200, "accountant": "rdp"}
    sigmas = [calibrate_noise(target_epsilon=e, **kwargs) for e in (1.0, 4.0, 8.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


@pytest.mark.parametrize("events", CASES)
def test_our_prv_is_opacus_prv_accountant(events: list[DpEvent]) -> None:
    """fedpriv runs Opacus's PRV algorithm itself, with the safe domain sized from cached
    RDP curves (cheaper); the epsilon is Opacus's PRVAccountant's."""
    from opacus.accountants import PRVAccountant

    from fedpriv.privacy.accounting import _exact, merge_events

    accountant = PRVAccountant()
    accountant.history = [e.as_tuple() for e in events]
    theirs = accountant.get_epsilon(delta=1e-5)
    assert _exact(merge_events(events), 1e-5, "prv") == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("events", CASES)
def test_the_fast_bound_is_a_valid_rdp_bound(events: list[DpEvent]) -> None:
    """The fast path (Opacus's RDP at integer orders, our conversion) equals Google's RDP
    accountant at the same orders, and is never below the PLD epsilon."""
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedpriv.privacy.accounting import RDP_ORDERS, epsilon_from_rdp, rdp_of

    google = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    for e in events:
        google.compose(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(
                    e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
        )
    fast = epsilon_from_rdp(rdp_of(events), 1e-5)
    np.testing.assert_allclose(rdp_of(events), google.rdp, rtol=1e-6)
    assert fast == pytest.approx(google.get_epsilon(1e-5), rel=1e-6)
    assert fast >= google_epsilon(events, 1e-5) * 0.999
    assert compose_epsilon(events, delta=1e-5, accountant="prv") <= fast
