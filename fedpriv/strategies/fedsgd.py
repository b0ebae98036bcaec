"""FedSGD: each hospital sends one gradient of its local loss; the server takes the step.

The same machinery as FedAvg: hospitals run the one training loop for a single full-batch
step with learning rate 1 and report ``w_before - w_after`` (their gradient; under DP-SGD the
noisy clipped one). The server averages the gradients by example count and applies
``w <- w - server_lr * g``. With equal learning rates this is exactly FedAvg with one
full-batch local step, which tests/unit/test_strategies.py checks.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedpriv import messages as msg
from fedpriv.protocols.base import ServerSide
from fedpriv.strategies.fedavg import FedAvg

__all__ = ["FedSGD"]


class FedSGD(FedAvg):
    """FedAvg in gradient mode: the protocol's server side takes the step (plaintext), or the
    hospitals take it themselves and send the model (CKKS) or its change (secure
    aggregation)."""

    gradient = True

    def __init__(self, *, aggregator: ServerSide, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(aggregator=aggregator, **kwargs)  # type: ignore[arg-type]
        self.server_lr = server_lr

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[msg.MODE] = msg.MODE_GRADIENT
        return super().configure_train(server_round, arrays, config, grid)
