"""Empirical epsilon lower bounds: what an attack *proves* the model is not (eps, delta)-DP for.

Three routes:

- Clopper-Pearson: a threshold is chosen on one random half of the records and evaluated
  on the other half (choosing the best threshold on the same data would overstate the
  bound); exact binomial confidence bounds on its TPR and FPR give
  ``eps >= max(log((TPR_lo - delta) / FPR_hi), log((TNR_lo - delta) / FNR_hi))``.
- Gaussian DP: the same bounds as a mu-GDP lower bound, ``mu = Phi^-1(TPR_lo) - Phi^-1(FPR_hi)``,
  converted to epsilon at the run's delta.
- One run with canaries (Steinke, Nasr, Jagielski 2023): with m canaries each included with
  probability 1/2 and r guesses of which v are right, an (eps, delta)-DP run makes
  ``P[>= v right] <= P[Bin(r, q) >= v] + 2 m delta max_i P[v-i <= Bin(r, q) < v] / i`` with
  ``q = e^eps / (1 + e^eps)``; the bound is the largest eps whose p-value is below beta.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

__all__ = [
    "SplitHalfBound",
    "clopper_pearson",
    "epsilon_from_gdp",
    "one_run_epsilon",
    "one_run_p_value",
    "split_half_bound",
]


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval for a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    lower = 0.0 if successes == 0 else stats.beta.ppf(alpha / 2, successes, trials - successes + 1)
    upper = (
        1.0
        if successes == trials
        else stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)
    )
    return float(lower), float(upper)


def _eps_from_rates(
    tpr_lo: float, fpr_hi: float, tnr_lo: float, fnr_hi: float, delta: float
) -> float:
    candidates = [0.0]
    if fpr_hi > 0 and tpr_lo - delta > 0:
        candidates.append(math.log((tpr_lo - delta) / fpr_hi))
    if fnr_hi > 0 and tnr_lo - delta > 0:
        candidates.append(math.log((tnr_lo - delta) / fnr_hi))
    return max(candidates)


def epsilon_from_gdp(mu: float, delta: float) -> float:
    """The epsilon at ``delta`` of mu-Gaussian DP (Dong, Roth, Su 2019, Corollary 2.13)."""
    if mu <= 0:
        return 0.0

    def delta_of(eps: float) -> float:
        return float(
            stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
        )

    if delta_of(0.0) <= delta:
        return 0.0
    high = 1.0
    while delta_of(high) > delta:
        high *= 2.0
        if high > 1e4:
            return float("inf")
    return float(optimize.brentq(lambda e: delta_of(e) - delta, 0.0, high))


@dataclasses.dataclass(frozen=True)
class SplitHalfBound:
    clopper_pearson: float
    gdp: float
    threshold: float
    members: int
    non_members: int
    true_positives: int
    false_positives: int
    confidence: float


def _point_epsilon(tp: int, fp: int, n_m: int, n_n: int) -> float:
    # add-one smoothing so that a threshold catching no non-member is not "infinitely" good
    tpr = (tp + 1) / (n_m + 2)
    fpr = (fp + 1) / (n_n + 2)
    fnr = 1 - tpr
    tnr = 1 - fpr
    return max(math.log(tpr / fpr), math.log(tnr / fnr))


def split_half_bound(
    members: np.ndarray,
    non_members: np.ndarray,
    *,
    delta: float,
    rng: np.random.Generator,
    confidence: float = 0.95,
) -> SplitHalfBound:
    """Choose the threshold on half of the records; bound epsilon on the other half."""
    members = np.asarray(members, dtype=np.float64)
    non_members = np.asarray(non_members, dtype=np.float64)
    m_perm = rng.permutation(members.size)
    n_perm = rng.permutation(non_members.size)
    m_a, m_b = members[m_perm[: members.size // 2]], members[m_perm[members.size // 2 :]]
    n_a, n_b = (
        non_members[n_perm[: non_members.size // 2]],
        non_members[n_perm[non_members.size // 2 :]],
    )
    candidates = np.unique(np.concatenate([m_a, n_a]))
    best, threshold = -math.inf, math.inf
    for t in candidates:
        tp = int((m_a >= t).sum())
        fp = int((n_a >= t).sum())
        value = _point_epsilon(tp, fp, m_a.size, n_a.size)
        if value > best:
            best, threshold = value, float(t)
    tp = int((m_b >= threshold).sum())
    fp = int((n_b >= threshold).sum())
    # two one-sided bounds at (1 - confidence) / 2 each, so both hold at `confidence`
    alpha = 1.0 - confidence
    tpr_lo, _ = clopper_pearson(tp, m_b.size, alpha)
    _, fpr_hi = clopper_pearson(fp, n_b.size, alpha)
    eps_cp = _eps_from_rates(tpr_lo, fpr_hi, 1 - fpr_hi, 1 - tpr_lo, delta)
    mu = 0.0
    if 0 < tpr_lo < 1 and 0 < fpr_hi < 1:
        mu = float(stats.norm.ppf(tpr_lo) - stats.norm.ppf(fpr_hi))
    mu_rev = 0.0
    if 0 < 1 - fpr_hi < 1 and 0 < 1 - tpr_lo < 1:
        mu_rev = float(stats.norm.ppf(1 - fpr_hi) - stats.norm.ppf(1 - tpr_lo))
    return SplitHalfBound(
        clopper_pearson=eps_cp,
        gdp=epsilon_from_gdp(max(mu, mu_rev), delta),
        threshold=threshold,
        members=int(m_b.size),
        non_members=int(n_b.size),
        true_positives=tp,
        false_positives=fp,
        confidence=confidence,
    )


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses right] for an (eps, delta)-DP run with m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (got v={v}, r={r}, m={m})")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # P[v - i <= Bin(r, q) < v] for i = 1..v, from the pmf at v-1, v-2, ..., 0
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    window = np.cumsum(pmf) / np.arange(1, v + 1)
    return min(1.0, tail + 2 * m * delta * float(window.max()))


def one_run_epsilon(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """The largest eps an (eps, delta)-DP run could not have produced v of r right (at 1-beta)."""
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < beta:
        low, high = high, high * 2.0
        if high > 1e3:
            return float("inf")
    for _ in range(50):
        mid = (low + high) / 2
        if one_run_p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


def one_run_guesses(
    included: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, guesses: int
) -> tuple[int, int]:
    """Guess "in" for the top guesses/2 canaries by score and "out" for the bottom guesses/2;
    returns (guesses made, guesses right)."""
    included_arr = np.asarray(included, dtype=bool)
    order = np.argsort(np.asarray(scores, dtype=np.float64))
    k = max(1, guesses // 2)
    k = min(k, included_arr.size // 2)
    outs = order[:k]
    ins = order[-k:]
    right = int(included_arr[ins].sum() + (~included_arr[outs]).sum())
    return 2 * k, right
