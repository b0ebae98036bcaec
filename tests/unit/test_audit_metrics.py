"""Audit formulas against hand-computed values and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedpriv.privacy.audit.attacks import AttackInputs, create_attack
from fedpriv.privacy.audit.bounds import (
    clopper_pearson,
    epsilon_from_gdp,
    one_run_epsilon,
    one_run_guesses,
    one_run_p_value,
    split_half_bound,
)
from fedpriv.privacy.audit.federated import grid_metrics, loss_counts
from fedpriv.privacy.audit.metrics import (
    auc,
    balanced_accuracy,
    bootstrap,
    resolvable,
    roc,
    tpr_at_fpr,
)


def test_auc_by_hand() -> None:
    # pairs (member, non-member): (3,1)=1 (3,2)=1 (2,1)=1 (2,2)=0.5 -> 3.5 / 4
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert auc(np.array([1.0, 1.0]), np.array([1.0])) == pytest.approx(0.5)
    assert auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_roc_tpr_at_fpr_and_balanced_accuracy_by_hand() -> None:
    members = np.array([0.9, 0.8, 0.7, 0.2])
    non_members = np.array([0.85, 0.3, 0.1, 0.05, 0.0])
    curve = roc(members, non_members)
    assert curve.fpr[0] == 0 and curve.tpr[0] == 0 and curve.fpr[-1] == 1 and curve.tpr[-1] == 1
    # threshold 0.9 catches 1 member, no non-member: TPR 0.25 at FPR 0
    assert tpr_at_fpr(members, non_members, 0.0) == pytest.approx(0.25)
    # FPR <= 0.2 allows one false positive (0.85): threshold 0.7 -> TPR 0.75
    assert tpr_at_fpr(members, non_members, 0.2) == pytest.approx(0.75)
    # (TPR + TNR)/2: threshold 0.7 -> (0.75 + 0.8) / 2; threshold 0.2 -> (1 + 0.6) / 2 is best
    assert balanced_accuracy(members, non_members) == pytest.approx(0.8)


def test_resolvability_needs_one_over_fpr_non_members() -> None:
    assert resolvable(100, 0.01) and not resolvable(99, 0.01) and not resolvable(999, 0.001)


def test_bootstrap_interval_covers_the_estimate() -> None:
    rng = np.random.default_rng(0)
    members, non_members = rng.normal(0.5, 1, 300), rng.normal(0, 1, 300)
    intervals = bootstrap(members, non_members, samples=200, rng=rng)
    low, high = intervals["auc"]
    assert low < auc(members, non_members) < high and high - low < 0.15


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (37, 120), (1, 1000)])
def test_clopper_pearson_against_binomial_tails(k: int, n: int) -> None:
    alpha = 0.05
    low, high = clopper_pearson(k, n, alpha)
    # the defining property, through scipy's binomial (not beta) distribution
    if k > 0:
        assert stats.binom.sf(k - 1, n, low) == pytest.approx(alpha / 2, rel=1e-6)
    else:
        assert low == 0.0
    if k < n:
        assert stats.binom.cdf(k, n, high) == pytest.approx(alpha / 2, rel=1e-6)
    else:
        assert high == 1.0


def test_clopper_pearson_textbook_values() -> None:
    assert clopper_pearson(0, 10, 0.05)[1] == pytest.approx(0.3085, abs=1e-4)
    low, high = clopper_pearson(5, 10, 0.05)
    assert (low, high) == (pytest.approx(0.1871, abs=1e-4), pytest.approx(0.8129, abs=1e-4))


def test_split_half_bound_on_textbook_counts() -> None:
    # 1000 members all scored 1, 1000 non-members all scored 0: on the evaluation half
    # TP = 500 / 500, FP = 0 / 500, so eps >= log(TPR_lo / FPR_hi) with CP bounds at 95%.
    members, non_members = np.ones(1000), np.zeros(1000)
    bound = split_half_bound(members, non_members, delta=0.0, rng=np.random.default_rng(1))
    tpr_lo = clopper_pearson(500, 500, 0.05)[0]
    fpr_hi = clopper_pearson(0, 500, 0.05)[1]
    assert bound.true_positives == 500 and bound.false_positives == 0
    assert bound.clopper_pearson == pytest.approx(math.log(tpr_lo / fpr_hi))
    assert bound.clopper_pearson == pytest.approx(math.log(0.992649 / 0.007351), rel=1e-3)
    # identical distributions prove nothing
    rng = np.random.default_rng(2)
    same = split_half_bound(rng.normal(size=2000), rng.normal(size=2000), delta=1e-5, rng=rng)
    assert same.clopper_pearson < 0.3


def test_gdp_conversion_inverts_the_delta_formula() -> None:
    mu, delta = 1.0, 1e-5
    eps = epsilon_from_gdp(mu, delta)
    back = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert back == pytest.approx(delta, rel=1e-6)
    assert epsilon_from_gdp(0.0, delta) == 0.0
    assert epsilon_from_gdp(0.5, delta) < eps < epsilon_from_gdp(2.0, delta)


def test_one_run_bound_known_case() -> None:
    # delta = 0, all r guesses right: p-value q^r, so the bound solves q = beta^(1/r)
    r, beta = 100, 0.05
    q = beta ** (1 / r)
    expected = math.log(q / (1 - q))
    assert one_run_epsilon(1000, r, r, delta=0.0, beta=beta) == pytest.approx(expected, rel=1e-6)
    # delta > 0 can only weaken the bound; chance-level guessing proves nothing
    assert one_run_epsilon(1000, r, r, delta=1e-5, beta=beta) <= expected
    assert one_run_epsilon(1000, 100, 50, delta=1e-5) == 0.0
    assert one_run_p_value(10, 4, 4, 0.0, 0.0) == pytest.approx(1 / 16)


def test_one_run_guesses_take_the_extremes() -> None:
    included = [True, False, True, False, True, False]
    scores = [5.0, 0.0, 4.0, 1.0, 0.5, 3.0]
    r, v = one_run_guesses(included, scores, 4)
    # top two (5.0, 4.0) guessed in: both right; bottom two (0.0, 0.5) guessed out: one right
    assert (r, v) == (4, 3)


def test_federated_counts_reproduce_the_grid_roc() -> None:
    rng = np.random.default_rng(3)
    m_loss, n_loss = rng.exponential(0.2, 500), rng.exponential(0.4, 400)
    halves = [(m_loss[:250], n_loss[:150]), (m_loss[250:], n_loss[150:])]
    thresholds = np.geomspace(1e-4, 10, 300)
    summed_m = np.sum([loss_counts(m, n, thresholds)[0] for m, n in halves], axis=0)
    summed_n = np.sum([loss_counts(m, n, thresholds)[1] for m, n in halves], axis=0)
    whole_m, whole_n = loss_counts(m_loss, n_loss, thresholds)
    assert summed_m.tolist() == whole_m and summed_n.tolist() == whole_n
    assert grid_metrics(m_loss, n_loss)["auc"] == pytest.approx(auc(-m_loss, -n_loss), abs=0.01)


def test_attacks_rank_members_first_on_planted_signal() -> None:
    rng = np.random.default_rng(4)
    n, k = 400, 8
    member = np.arange(n) < n // 2
    reference_in = np.zeros((k, n), dtype=bool)
    for j in range(0, k, 2):
        half = rng.permutation(n)[: n // 2]
        reference_in[j, half] = True
        reference_in[j + 1] = ~reference_in[j]
    difficulty = rng.normal(0, 3, n)  # per-record offsets that LOSS cannot see through
    ref_logit = difficulty[None, :] + 2.0 * reference_in + rng.normal(0, 0.3, (k, n))
    target_logit = difficulty + 2.0 * member + rng.normal(0, 0.3, n)
    prob = 1 / (1 + np.exp(-target_logit))
    inputs = AttackInputs(
        target_loss=-np.log(prob),
        target_logit=target_logit,
        target_prob=prob,
        reference_logit=ref_logit,
        reference_prob=1 / (1 + np.exp(-ref_logit)),
        reference_in=reference_in,
        population_prob=1 / (1 + np.exp(-(rng.normal(0, 3, 300)))),
        population_reference_prob=1 / (1 + np.exp(-(rng.normal(0, 3, (k, 300))))),
    )
    results = {
        name: create_attack(name).scores(inputs)
        for name in ("loss", "lira", "lira-offline", "rmia")
    }
    aucs = {name: auc(s[member], s[~member]) for name, s in results.items()}
    assert aucs["lira"] > 0.95 and aucs["lira-offline"] > 0.9
    assert aucs["lira"] > aucs["loss"] + 0.2, "calibrating per record beats the raw loss"
    assert aucs["rmia"] > aucs["loss"]
