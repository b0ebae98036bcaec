"""Membership-inference metrics from scores (higher = "more likely a member").

Everything here is a plain function of two score arrays, checked against hand-computed
values in tests/unit/test_audit_metrics.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "FPRS",
    "Roc",
    "auc",
    "balanced_accuracy",
    "bootstrap",
    "roc",
    "tpr_at_fpr",
]

#: the false-positive rates every audit reports the true-positive rate at
FPRS = (0.1, 0.01, 0.001)


@dataclasses.dataclass(frozen=True)
class Roc:
    """ROC points for "member if score >= threshold", thresholds descending."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc(members: np.ndarray, non_members: np.ndarray) -> Roc:
    members = np.asarray(members, dtype=np.float64)
    non_members = np.asarray(non_members, dtype=np.float64)
    thresholds = np.unique(np.concatenate([members, non_members]))[::-1]
    m_sorted = np.sort(members)
    n_sorted = np.sort(non_members)
    # number of scores >= t, for every threshold t
    tp = members.size - np.searchsorted(m_sorted, thresholds, side="left")
    fp = non_members.size - np.searchsorted(n_sorted, thresholds, side="left")
    tpr = np.concatenate([[0.0], tp / max(1, members.size)])
    fpr = np.concatenate([[0.0], fp / max(1, non_members.size)])
    return Roc(fpr=fpr, tpr=tpr, thresholds=np.concatenate([[np.inf], thresholds]))


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score) + 0.5 P(tie): the Mann-Whitney statistic."""
    members = np.asarray(members, dtype=np.float64)
    non_members = np.asarray(non_members, dtype=np.float64)
    if members.size == 0 or non_members.size == 0:
        return float("nan")
    ranks = stats.rankdata(np.concatenate([members, non_members]))
    rank_sum = ranks[: members.size].sum()
    u = rank_sum - members.size * (members.size + 1) / 2
    return float(u / (members.size * non_members.size))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """The largest TPR of a threshold whose FPR is at most ``fpr``."""
    curve = roc(members, non_members)
    allowed = curve.fpr <= fpr + 1e-12
    return float(curve.tpr[allowed].max()) if allowed.any() else 0.0


def resolvable(non_members: int, fpr: float) -> bool:
    """Can an FPR this small be told from zero? Only with at least 1/fpr non-members."""
    return non_members * fpr >= 1.0


def balanced_accuracy(members: np.ndarray, non_members: np.ndarray) -> float:
    """Best (TPR + TNR) / 2 over thresholds."""
    curve = roc(members, non_members)
    return float(np.max((curve.tpr + 1.0 - curve.fpr) / 2.0))


def bootstrap(
    members: np.ndarray,
    non_members: np.ndarray,
    *,
    samples: int,
    rng: np.random.Generator,
    fprs: Sequence[float] = FPRS,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals for AUC, balanced accuracy and TPR at each FPR.

    Members and non-members are resampled separately (their counts are fixed by design).
    """
    values: dict[str, list[float]] = {"auc": [], "balanced_accuracy": []}
    for f in fprs:
        values[f"tpr@{f}"] = []
    for _ in range(samples):
        m = rng.choice(members, size=members.size, replace=True)
        n = rng.choice(non_members, size=non_members.size, replace=True)
        values["auc"].append(auc(m, n))
        curve = roc(m, n)
        values["balanced_accuracy"].append(float(np.max((curve.tpr + 1 - curve.fpr) / 2)))
        for f in fprs:
            allowed = curve.fpr <= f + 1e-12
            values[f"tpr@{f}"].append(float(curve.tpr[allowed].max()))
    tail = (1.0 - level) / 2.0 * 100
    return {
        k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
        for k, v in values.items()
    }
