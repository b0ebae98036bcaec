"""Plaintext aggregation: hospitals send their weights (FedAvg) or gradient (FedSGD); the
server checks each against the global model and takes the example-weighted mean.

The server sees every hospital's update: use ``ckks`` or ``secagg`` when it must not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpriv.protocols.base import (
    Contribution,
    GlobalWeights,
    HospitalSide,
    Protocol,
    ServerSide,
    Update,
    register_protocol,
)
from fedpriv.protocols.checks import (
    Limits,
    Rejected,
    check_arrays,
    check_count,
    outlying_norms,
    update_norm,
)

__all__ = ["PlainHospital", "PlainServer", "checked_contributions"]


def checked_contributions(
    side: ServerSide,
    contributions: Sequence[Contribution],
    reference: ArrayRecord,
    *,
    limits: Limits,
    gradient: bool,
) -> list[tuple[Contribution, dict[str, np.ndarray], int]]:
    """The contributions that pass every check, with their arrays and counts; the others
    are rejected on ``side`` (logged, listed in ``side.rejected``)."""
    base = {k: v.numpy() for k, v in reference.items()}
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    accepted = []
    for contribution in contributions:
        try:
            count = check_count(contribution.hospital, contribution.num_examples, limits)
            values = check_arrays(contribution.arrays, reference)
        except Rejected as why:
            side.reject(contribution.hospital, str(why))
            continue
        accepted.append((contribution, values, count))
    # how far each moves the model: a gradient is its own update, weights move from `base`
    norms = [update_norm(values, zero if gradient else base) for _, values, _ in accepted]
    outliers = set(outlying_norms(norms))
    for i in sorted(outliers):
        side.reject(
            accepted[i][0].hospital,
            f"its update's norm {norms[i]:.3g} is more than ten times the round's median "
            f"({float(np.median(norms)):.3g})",
        )
    return [a for i, a in enumerate(accepted) if i not in outliers]


class PlainServer(ServerSide):
    def __init__(self, *, limits: Limits, server_lr: float = 1.0) -> None:
        super().__init__()
        self.limits = limits
        self.server_lr = server_lr

    def aggregate(
        self,
        contributions: Sequence[Contribution],
        *,
        reference: ArrayRecord | None = None,
        gradient: bool = False,
        server_round: int = 0,
    ) -> ArrayRecord | None:
        self.rejected = []
        if reference is None:
            raise ValueError("the global model the hospitals started from is needed")
        accepted = checked_contributions(
            self, contributions, reference, limits=self.limits, gradient=gradient
        )
        if not accepted:
            return None
        total = sum(count for _, _, count in accepted)
        mean = {
            k: sum(count * values[k].astype(np.float64) for _, values, count in accepted) / total
            for k in reference
        }
        base = {k: v.numpy() for k, v in reference.items()}
        if gradient:  # FedSGD: the server takes the step with the mean gradient
            mean = {k: base[k].astype(np.float64) - self.server_lr * mean[k] for k in mean}
        return ArrayRecord({k: Array(np.asarray(mean[k], dtype=base[k].dtype)) for k in mean})


class PlainHospital(HospitalSide):
    def read(self, order: Any, arrays: ArrayRecord) -> GlobalWeights:
        return GlobalWeights({k: v.numpy() for k, v in arrays.items()})

    def encode(
        self, order: Any, update: Update, state: Any
    ) -> tuple[ArrayRecord, dict[str, float]]:
        if update.gradient:  # one step at learning rate 1: before - after is the gradient
            values = {k: update.before[k] - update.after[k] for k in update.before}
        else:
            values = update.after
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()}), {}


def _server(config: Any, *, limits: Limits, **_: Any) -> PlainServer:
    return PlainServer(limits=limits, server_lr=config.server_lr)


def _hospital(config: Any, node_config: Any) -> PlainHospital:
    return PlainHospital()


PLAIN = register_protocol(
    Protocol(
        name="plain",
        server=_server,
        hospital=_hospital,
        summary="the server sees each hospital's update and takes the weighted mean",
    )
)
