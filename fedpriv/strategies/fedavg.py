"""FedAvg on Flower's Message-API Strategy; how updates are combined is the protocol's.

FedSGD (:mod:`fedpriv.strategies.fedsgd`) is the same class in gradient mode.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv import messages as msg
from fedpriv.protocols.base import Contribution, ServerSide

__all__ = ["FedAvg", "hospital_name", "weighted_metrics"]

logger = logging.getLogger(__name__)


class FedAvg(Strategy):
    """Example-weighted averaging of hospitals' models (McMahan et al. 2017).

    ``fraction_train`` of the connected hospitals (at least ``min_train_nodes``) train each
    round, sampled with a generator seeded from ``seed`` and the round, so runs repeat.
    Every connected hospital evaluates. ``aggregator`` is the protocol's server side.
    """

    #: FedSGD: hospitals send gradients (one step at learning rate 1)
    gradient = False

    def __init__(
        self,
        *,
        aggregator: ServerSide,
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
        sampled = sorted(random.Random(self.seed * 100_003 + server_round).sample(nodes, size))
        self._current = arrays
        config[msg.SERVER_ROUND] = server_round
        self.aggregator.expect(sampled)
        for key, value in self.aggregator.round_extra(sampled).items():
            config[key] = value
        return self._messages(arrays, config, sampled, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        usable = [m for m in replies if not m.has_error()]
        contributions = [
            Contribution(
                hospital=hospital_name(m.content),
                arrays=m.content.array_records[msg.ARRAYS],
                # as claimed: the protocol's server side checks it
                num_examples=m.content.metric_records[msg.METRICS].get(msg.NUM_EXAMPLES),
                node=int(m.metadata.src_node_id),
            )
            for m in usable
            if msg.ARRAYS in m.content.array_records and msg.METRICS in m.content.metric_records
        ]
        assert self._current is not None, "configure_train comes first"
        arrays = (
            self.aggregator.aggregate(
                contributions,
                reference=self._current,
                gradient=self.gradient,
                server_round=server_round,
            )
            if contributions
            else None
        )
        refused = {name for name, _ in self.aggregator.rejected}
        return arrays, weighted_metrics(
            [m.content for m in usable if hospital_name(m.content) not in refused]
        )

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
        raw = record.get(msg.NUM_EXAMPLES, 0)
        n = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else 0.0
        if not math.isfinite(n) or n <= 0:  # a claim no one can weigh by
            continue
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
