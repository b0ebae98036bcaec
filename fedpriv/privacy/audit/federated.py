"""The federated LOSS audit: for deployments, where nobody holds all the records.

Each hospital scores its own training records (members) and held-out records
(non-members) with the final model and returns only *counts*: for every threshold of a
fixed grid, how many of each have a loss at or below it. The server adds the counts and
reads the ROC, AUC and TPR at FPR off the summed curve. No per-record score, and no
record, leaves a hospital.

The same grid applied to the simulation's per-record losses gives exactly the same numbers
(tests/integration/test_audit_simulation.py checks it), and the grid is fine enough that
the AUC matches the exact one to about 0.01.
"""

from __future__ import annotations

import numpy as np

from fedpriv.privacy.audit.metrics import FPRS, resolvable

__all__ = ["LOSS_THRESHOLDS", "combine_counts", "grid_metrics", "loss_counts"]

#: loss thresholds: 0, then log-spaced from 1e-6 to 50 (cross-entropy rarely exceeds it)
LOSS_THRESHOLDS = np.concatenate([[0.0], np.geomspace(1e-6, 50.0, 399)])


def loss_counts(
    member_losses: np.ndarray, non_member_losses: np.ndarray, thresholds: np.ndarray
) -> tuple[list[int], list[int]]:
    """How many members / non-members have loss <= t, for each threshold t (a hospital's reply)."""
    m = np.sort(np.asarray(member_losses, dtype=np.float64))
    n = np.sort(np.asarray(non_member_losses, dtype=np.float64))
    return (
        np.searchsorted(m, thresholds, side="right").astype(int).tolist(),
        np.searchsorted(n, thresholds, side="right").astype(int).tolist(),
    )


def combine_counts(
    members_le: np.ndarray, non_members_le: np.ndarray, members: int, non_members: int
) -> dict[str, object]:
    """ROC-derived metrics from summed counts (the server's side)."""
    tpr = np.concatenate([[0.0], np.asarray(members_le) / max(1, members), [1.0]])
    fpr = np.concatenate([[0.0], np.asarray(non_members_le) / max(1, non_members), [1.0]])
    auc = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))
    result: dict[str, object] = {
        "auc": auc,
        "tpr_at_fpr": {str(f): float(tpr[fpr <= f + 1e-12].max()) for f in FPRS},
        "tpr_at_fpr_resolvable": {str(f): resolvable(non_members, f) for f in FPRS},
        "balanced_accuracy": float(np.max((tpr + 1 - fpr) / 2)),
        "members": int(members),
        "non_members": int(non_members),
        "thresholds": len(members_le),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }
    return result


def grid_metrics(
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    thresholds: np.ndarray = LOSS_THRESHOLDS,
) -> dict[str, object]:
    members_le, non_members_le = loss_counts(member_losses, non_member_losses, thresholds)
    return combine_counts(
        np.asarray(members_le),
        np.asarray(non_members_le),
        len(member_losses),
        len(non_member_losses),
    )
