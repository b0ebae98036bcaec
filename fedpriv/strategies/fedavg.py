"""FedAvg on Flower's Message-API Strategy, with pluggable aggregation.

FedSGD (:mod:`fedpriv.strategies.fedsgd`) is the same class with two hooks overridden.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv import messages as msg
from fedpriv.strategies.aggregators import Aggregator, Contribution

__all__ = ["FedAvg", "hospital_name", "weighted_metrics"]

logger = logging.getLogger(__name__)


class FedAvg(Strategy):
    """Example-weighted averaging of hospitals' models (McMahan et al. 2017).

    ``fraction_train`` of the connected hospitals (at least ``min_train_nodes``) train each
    round, sampled with a generator seeded from ``seed`` and the round, so runs repeat.
    Every connected hospital evaluates.
    """

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        self.aggregator = aggregator
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self._current: ArrayRecord | None = None

    def summary(self) -> None:
        logger.info(
            "%s: fraction-train %.2f, min train nodes %d, aggregator %s",
            type(self).__name__,
            self.fraction_train,
            self.min_train_nodes,
            type(self.aggregator).__name__,
        )

    # ---- training --------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())
        size = max(round(len(nodes) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(nodes))
        sampled = random.Random(self.seed * 100_003 + server_round).sample(nodes, size)
        self._current = arrays
        config[msg.SERVER_ROUND] = server_round
        return self._messages(arrays, config, sorted(sampled), MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = [m.content for m in replies if not m.has_error()]
        contributions = [
            Contribution(
                hospital=hospital_name(c),
                arrays=c.array_records[msg.ARRAYS],
                num_examples=int(c.metric_records[msg.METRICS][msg.NUM_EXAMPLES]),  # type: ignore[arg-type]
            )
            for c in contents
            if msg.ARRAYS in c.array_records and msg.METRICS in c.metric_records
        ]
        arrays = (
            self.aggregator.aggregate(contributions, reference=self._reference())
            if contributions
            else None
        )
        return arrays, weighted_metrics(contents)

    def _reference(self) -> ArrayRecord | None:
        """What the hospitals' replies are relative to: the global model they started from."""
        return self._current

    # ---- evaluation ------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[msg.SERVER_ROUND] = server_round
        return self._messages(arrays, config, sorted(grid.get_node_ids()), MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return weighted_metrics([m.content for m in replies if not m.has_error()])

    # ---- helpers ---------------------------------------------------------------------

    @staticmethod
    def _messages(
        arrays: ArrayRecord, config: ConfigRecord, nodes: Sequence[int], message_type: str
    ) -> list[Message]:
        content = RecordDict({msg.ARRAYS: arrays, msg.CONFIG: config})
        return [
            Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes
        ]


def hospital_name(content: RecordDict) -> str:
    record = content.config_records.get(msg.HOSPITAL)
    if record is None:
        return "unknown hospital"
    return str(record.get(msg.HOSPITAL_NAME, "unknown hospital"))


def weighted_metrics(contents: Sequence[RecordDict]) -> MetricRecord | None:
    """Example-weighted mean of every numeric metric the hospitals reported."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0
    for content in contents:
        record = content.metric_records.get(msg.METRICS)
        if record is None:
            continue
        n = float(record.get(msg.NUM_EXAMPLES, 0))  # type: ignore[arg-type]
        total += int(n)
        for key, value in record.items():
            if key == msg.NUM_EXAMPLES or not isinstance(value, int | float):
                continue
            if value != value:  # NaN: a hospital with nothing to report on this metric
                continue
            sums[key] = sums.get(key, 0.0) + n * float(value)
            weights[key] = weights.get(key, 0.0) + n
    if total == 0:
        return None
    result = MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})
    result[msg.NUM_EXAMPLES] = total
    return result
