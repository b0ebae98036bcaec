"""The evaluation a training reply carries: one exchange per round instead of two.

When the server's training order says so (``msg.EVALUATE_RECEIVED``), a hospital first
evaluates the model it received (the previous round's aggregate) on its held-out records and
replies that evaluation beside its update, under ``msg.EVALUATION``. The server records it as
the previous round's evaluation and evaluates the final model once at the end. Under CKKS
the evaluation is also the hospital's check of the aggregate: one it cannot decrypt to the
declared count or to bounded values is reported unusable and the order is declined, untrained
(:func:`fedpriv.client.handlers.train_and_evaluate`). Secure aggregation's unmasking keeps the
separate exchange (the next model does not exist before it); the server decides.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord

from fedpriv import messages as msg
from fedpriv.client.hospital import HospitalData, evaluate_round
from fedpriv.protocols.base import HospitalSide

__all__ = ["evaluation_metrics", "wants_evaluation"]


def wants_evaluation(order: msg.TrainingOrder) -> bool:
    return bool(order.extra.get(msg.EVALUATE_RECEIVED, False))


def evaluation_metrics(
    order: msg.TrainingOrder, data: HospitalData, arrays: ArrayRecord, *, side: HospitalSide
) -> MetricRecord:
    """The received model on this hospital's held-out records: aggregate figures only, the
    same ones an evaluation reply holds."""
    stats, figures = evaluate_round(order, data, arrays, side=side)
    metrics = MetricRecord(
        {
            "eval-loss": stats.loss,
            "eval-accuracy": stats.accuracy,
            msg.NUM_EXAMPLES: stats.num_examples,
        }
    )
    for name, value in figures.items():
        metrics[name] = float(value)
    return metrics
