"""FedSGD: each hospital sends one gradient of its local loss; the server takes the step.

The same machinery as FedAvg: hospitals run the one training loop for a single full-batch
step with learning rate 1 and report ``w_before - w_after`` (their gradient; under DP-SGD the
noisy clipped one). The server averages the gradients by example count and applies
``w <- w - server_lr * g``. With equal learning rates this is exactly FedAvg with one
full-batch local step, which tests/unit/test_strategies.py checks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedpriv import messages as msg
from fedpriv.strategies.aggregators import Aggregator
from fedpriv.strategies.fedavg import FedAvg

__all__ = ["FedSGD", "apply_gradient"]


class FedSGD(FedAvg):
    def __init__(self, *, aggregator: Aggregator, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(aggregator=aggregator, **kwargs)  # type: ignore[arg-type]
        self.server_lr = server_lr

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[msg.MODE] = msg.MODE_GRADIENT
        return super().configure_train(server_round, arrays, config, grid)

    def _reference(self) -> ArrayRecord | None:
        return None  # gradients are updates already

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        gradient, metrics = super().aggregate_train(server_round, replies)
        if getattr(self.aggregator, "encrypted", False):
            # Under HE each hospital took the step itself (it alone can read the model):
            # the sum is already the new model.
            return gradient, metrics
        if gradient is None or self._current is None:
            return None, metrics
        return apply_gradient(self._current, gradient, self.server_lr), metrics


def apply_gradient(weights: ArrayRecord, gradient: ArrayRecord, lr: float) -> ArrayRecord:
    """``weights - lr * gradient``, key by key, keeping each array's dtype."""
    updated = {}
    for key, array in weights.items():
        w = array.numpy()
        g = gradient[key].numpy()
        updated[key] = Array(np.asarray(w.astype(np.float64) - lr * g, dtype=w.dtype))
    return ArrayRecord(updated)
