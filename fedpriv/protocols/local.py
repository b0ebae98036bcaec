"""A protocol's two sides in one process, exchanging exactly what the round loop and the
ClientApp exchange (setup queries, training replies, unmasking answers) without Flower.

For what needs a protocol without a federation around it: the protocol contract tests, the
protocol benchmarks, and audits of what the server receives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.errors import FedprivError
from fedpriv.protocols.base import Contribution, Update, create_protocol
from fedpriv.protocols.checks import Limits

__all__ = ["LocalFederation"]


class LocalFederation:
    """Hospitals ``nodes`` (Flower node ids) with ``counts`` training examples each (of
    ``patients`` patients; one per example when not given), running ``config.protocol``
    around the global model ``model``. ``received`` keeps what the server was sent, as it
    got it."""

    def __init__(
        self,
        config: RunConfig,
        nodes: Sequence[int],
        model: Mapping[str, np.ndarray],
        *,
        counts: Mapping[int, int],
        patients: Mapping[int, int] | None = None,
        node_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.model = dict(model)
        self.protocol = create_protocol(config.protocol)
        self.nodes = list(nodes)
        self.counts = dict(counts)
        self.server = self.protocol.server(
            config,
            limits=Limits(
                max_examples=config.max_examples,
                declared={self.name(n): c for n, c in self.counts.items()},
                patients={self.name(n): u for n, u in (patients or {}).items()},
            ),
            length=sum(int(np.size(v)) for v in self.model.values()),
            weight_unit=float(max(self.counts.values())),
        )
        self.sides = {n: self.protocol.hospital(config, dict(node_config or {})) for n in nodes}
        self.states = {n: RecordDict() for n in self.nodes}
        self.received: list[ArrayRecord] = []
        self.server.first, self.server.last = 1, config.rounds
        self.server.setup(None, self.nodes, self._send)

    @staticmethod
    def name(node: int) -> str:
        return f"h{node}"

    def _send(self, kind: str, contents: Mapping[int, Mapping[str, Any]]) -> dict[int, Any]:
        from fedpriv.protocols.secagg import SETUP

        answers = {}
        for node, content in contents.items():
            record: dict[str, Any] = {k: v for k, v in content.items() if isinstance(v, bytes)}
            record[SETUP] = json.dumps(
                {k: v for k, v in content.items() if not isinstance(v, bytes)}
            )
            answers[node] = (
                self.name(node),
                self.sides[node].answer(None, kind, record, node, self.states[node]),
            )
        return answers

    def order(self, node: int, server_round: int, extra: Mapping[str, Any]) -> msg.TrainingOrder:
        record = msg.order_record(self.config, model_name="", model_args={})
        record[msg.SERVER_ROUND] = server_round
        record.update(extra)
        parsed = msg.parse_order(record)
        return msg.TrainingOrder(
            config=parsed.config,
            server_round=server_round,
            model_name="",
            model_args={},
            mode=parsed.mode,
            extra=parsed.extra,
            node=node,
        )

    def encode(
        self, node: int, server_round: int, weights: Mapping[str, np.ndarray]
    ) -> ArrayRecord:
        """What hospital ``node`` sends for a round in which it trained to ``weights``."""
        update = Update(
            before=self.model,
            after=dict(weights),
            num_examples=self.counts[node],
            gradient=False,
            server_lr=self.config.server_lr,
        )
        extra = self.server.round_extra(self.nodes)
        record, _ = self.sides[node].encode(
            self.order(node, server_round, extra), update, self.states[node]
        )
        return record

    def round(
        self,
        server_round: int,
        weights: Mapping[int, Mapping[str, np.ndarray]],
        *,
        drop_in_training: Sequence[int] = (),
        drop_in_unmasking: Sequence[int] = (),
        tamper: Mapping[int, Callable[[ArrayRecord], ArrayRecord]] | None = None,
        counts: Mapping[int, Any] | None = None,
    ) -> ArrayRecord | None:
        """One round; the new global model as the server holds it (None: no aggregate)."""
        self.server.expect(self.nodes)
        records = {}
        for node in self.nodes:
            if node in drop_in_training:
                continue
            record = self.encode(node, server_round, weights[node])
            if tamper and node in tamper:
                record = tamper[node](record)
            records[node] = record
        return self.collect(
            server_round, records, counts=counts, drop_in_unmasking=drop_in_unmasking
        )

    def collect(
        self,
        server_round: int,
        records: Mapping[int, ArrayRecord],
        *,
        gradient: bool = False,
        counts: Mapping[int, Any] | None = None,
        drop_in_unmasking: Sequence[int] = (),
    ) -> ArrayRecord | None:
        """The server's side of a round whose hospitals sent ``records`` (``{node: what it
        sent}``, e.g. the :class:`~fedpriv.client.hospital.RoundResult` arrays of their real
        training rounds; ``gradient``: FedSGD's mode): the new global model as the server
        holds it (None: no aggregate). ``self.server.expect(nodes)`` must have been called
        for the round first, as :meth:`round` does."""
        reference = ArrayRecord({k: Array(np.asarray(v)) for k, v in self.model.items()})
        contributions = []
        for node, record in records.items():
            self.received.append(record)
            claimed = (counts or {}).get(node, self.counts[node])
            contributions.append(Contribution(self.name(node), record, claimed, node))
        deferred = self.server.completes_on_evaluate  # this round's, before it ends
        result = self.server.aggregate(
            contributions, reference=reference, gradient=gradient, server_round=server_round
        )
        if not deferred:
            return result
        from fedpriv.protocols.secagg import UNMASK

        request = json.loads(str(self.server.evaluate_extra()[UNMASK]))
        replies = {}
        for node in self.nodes:
            if node in drop_in_unmasking:
                continue
            try:
                replies[node] = self.sides[node].unmask(request, node, self.states[node])
            except FedprivError:
                continue
        return self.server.complete(replies)
