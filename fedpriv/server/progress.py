"""What the researcher watching ``flwr run --stream`` (or ``flwr log``) sees of a run: one
line per round, from the row the round appended to ``metrics.jsonl``.

``fedpriv simulate`` draws its own progress bar from the same rows; a ServerApp started by
Flower has only its log, which Flower forwards to the researcher's terminal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["round_line", "round_logger"]

logger = logging.getLogger(__name__)

#: how much of a hospital's decline or failure reason a progress line keeps
REASON_CHARS = 160


def round_line(row: dict[str, Any], rounds: int) -> str:
    """One round in one line: federated accuracy, each hospital's epsilon, who declined."""
    parts = [f"round {row['round']}/{rounds}:"]
    parts.append(f"federated accuracy {_fmt(row.get('eval_accuracy'))}")
    if row.get("eval_loss") is not None:
        parts.append(f"(loss {_fmt(row['eval_loss'])})")
    if row.get("test_accuracy") is not None:
        parts.append(f"central test accuracy {_fmt(row['test_accuracy'])}")
    trained = [h for h, entry in row.get("hospitals", {}).items() if "train_examples" in entry]
    parts.append(f"| {len(trained)} trained")
    epsilons: dict[str, float] = row.get("epsilon") or {}
    if row.get("unaccounted"):
        parts.append(f"| NO DP accounting from {', '.join(row['unaccounted'])}")
    if epsilons:
        bound = "" if row.get("epsilon_exact") else " (upper bounds)"
        each = ", ".join(f"{h} {e:.3f}" for h, e in sorted(epsilons.items()))
        parts.append(f"| epsilon per hospital{bound}: {each}")
    if row.get("client_epsilon") is not None:
        parts.append(f"| client-level epsilon {_fmt(row['client_epsilon'])}")
    for label, key in (("declined", "declined"), ("failed", "failed"), ("refused", "rejected")):
        entries: dict[str, str] = row.get(key) or {}
        if entries:
            each = "; ".join(f"{h}: {_short(r)}" for h, r in sorted(entries.items()))
            parts.append(f"| {label}: {each}")
    if row.get("aggregate_failure"):
        parts.append(f"| no aggregate: {_short(str(row['aggregate_failure']))}")
    parts.append(f"| {float(row.get('seconds', 0.0)):.1f} s")
    return " ".join(parts)


def round_logger(rounds: int) -> Callable[[dict[str, Any]], None]:
    """An ``on_round`` callback for :func:`fedpriv.server.run.serve` that logs each round."""

    def log_round(row: dict[str, Any]) -> None:
        logger.info("%s", round_line(row, rounds))

    return log_round


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _short(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."
