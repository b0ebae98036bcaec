"""Aggregators: how the server combines hospitals' arrays. Strategies use one; they never fork.

An aggregator receives each hospital's ArrayRecord and example count and returns one
ArrayRecord. The plain aggregator returns the example-weighted mean; the CKKS aggregator
(:mod:`fedpriv.privacy.he`) returns a ciphertext sum and the plaintext total, which hospitals
decrypt and divide.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = [
    "Aggregator",
    "Contribution",
    "PlainAggregator",
    "available_aggregators",
    "create_aggregator",
    "register_aggregator",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Contribution:
    """One hospital's reply to a training round."""

    hospital: str
    arrays: ArrayRecord
    num_examples: int


class Aggregator(ABC):
    @abstractmethod
    def aggregate(
        self, contributions: Sequence[Contribution], *, reference: ArrayRecord | None = None
    ) -> ArrayRecord | None:
        """Combine contributions; ``None`` when none was usable.

        ``reference`` is what the contributions were computed from (the global model under
        FedAvg; ``None`` when they are gradients): aggregators that work on updates use it.
        """


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_aggregator(
    name: str,
) -> Callable[[Callable[..., Aggregator]], Callable[..., Aggregator]]:
    def decorator(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        if name in _REGISTRY:
            raise ValueError(f"aggregator '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_aggregators() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def create_aggregator(name: str, **kwargs: Any) -> Aggregator:
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregator '{name}'")
    return _REGISTRY[name](**kwargs)


@register_aggregator("plain")
class PlainAggregator(Aggregator):
    """Example-weighted mean, accumulated in float64 and returned in each array's dtype.

    A contribution whose keys or shapes differ from the first one is dropped with a log
    line, so one malformed reply cannot corrupt the aggregate.
    """

    def aggregate(
        self, contributions: Sequence[Contribution], *, reference: ArrayRecord | None = None
    ) -> ArrayRecord | None:
        usable = [c for c in contributions if c.num_examples > 0]
        if not usable:
            return None
        first = {k: v.numpy() for k, v in usable[0].arrays.items()}
        shapes = {k: v.shape for k, v in first.items()}
        sums = {k: np.zeros(v.shape, dtype=np.float64) for k, v in first.items()}
        total = 0
        for contribution in usable:
            arrays = {k: v.numpy() for k, v in contribution.arrays.items()}
            if {k: v.shape for k, v in arrays.items()} != shapes:
                logger.warning(
                    "dropping the update of %s: its arrays do not match the model",
                    contribution.hospital,
                )
                continue
            if not all(np.isfinite(v).all() for v in arrays.values()):
                logger.warning(
                    "dropping the update of %s: it holds NaN or infinite values",
                    contribution.hospital,
                )
                continue
            for key, value in arrays.items():
                sums[key] += contribution.num_examples * value.astype(np.float64)
            total += contribution.num_examples
        if total == 0:
            return None
        return ArrayRecord(
            {k: Array(np.asarray(sums[k] / total, dtype=first[k].dtype)) for k in first}
        )
