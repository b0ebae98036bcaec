"""What every aggregation protocol is: two sides of one way of combining hospitals' updates.

A protocol is one registered piece (one module): the **hospital side** reads the global model
the server sent and encodes what the hospital sends back (weights, a gradient, ciphertexts,
a masked vector); the **server side** checks every contribution against the global model
and combines the usable ones, and may run a setup phase once per run (key agreement). The
round loop and the hospital's training round call these two sides and never branch on a
protocol's name.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord

from fedpriv.errors import FedprivError

if TYPE_CHECKING:
    from fedpriv.privacy.distributed_noise import NoiseSplit

__all__ = [
    "UNUSABLE",
    "AggregateUnusable",
    "Contribution",
    "GlobalWeights",
    "HospitalSide",
    "Protocol",
    "ServerSide",
    "Update",
    "available_protocols",
    "create_protocol",
    "register_protocol",
]


#: protocol record key of an evaluation reply: why this hospital cannot use the new aggregate
UNUSABLE = "aggregate-unusable"


class AggregateUnusable(FedprivError):
    """The server's new aggregate cannot be turned into a model at this hospital (it does
    not decrypt to the example count the server reports, or to finite, bounded values)."""


@dataclasses.dataclass(frozen=True)
class Contribution:
    """One hospital's reply to a training round, as the server received it."""

    hospital: str
    arrays: ArrayRecord
    num_examples: Any  # as claimed: checked by the server side, never trusted
    node: int = 0


@dataclasses.dataclass(frozen=True)
class Update:
    """What a hospital's round produced, before a protocol encodes it.

    ``before`` is the global model it started from, ``after`` its model after local
    training. Under FedSGD (``gradient``) the hospital took one step at learning rate 1, so
    ``before - after`` is its (noisy, clipped) gradient.
    """

    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    num_examples: int
    gradient: bool
    server_lr: float
    #: the most an honest update of this round can measure (L2, DP-SGD's high-probability
    #: bound, :mod:`fedpriv.privacy.update_norm`); 0: nothing bounds it (no DP-SGD)
    norm_bound: float = 0.0

    def weights(self) -> dict[str, np.ndarray]:
        """The model the hospital proposes: its trained weights, or, under FedSGD, the
        server's step taken with its gradient."""
        if not self.gradient:
            return self.after
        return {
            k: self.before[k] - self.server_lr * (self.before[k] - self.after[k])
            for k in self.before
        }

    def delta(self) -> dict[str, np.ndarray]:
        """The change it proposes to the global model (``weights() - before``)."""
        proposed = self.weights()
        return {k: np.asarray(proposed[k], dtype=np.float64) - self.before[k] for k in self.before}


@dataclasses.dataclass
class GlobalWeights:
    """The global model as a hospital reads it, and figures to report about reading it
    (e.g. ``he-decrypt-seconds``)."""

    weights: dict[str, np.ndarray]
    figures: dict[str, float] = dataclasses.field(default_factory=dict)


class HospitalSide(ABC):
    """A protocol at one hospital: built once per process for a run's settings and the
    site's own node config (its keys)."""

    @abstractmethod
    def read(self, order: Any, arrays: ArrayRecord) -> GlobalWeights:
        """The global model from what the server sent."""

    @abstractmethod
    def encode(
        self, order: Any, update: Update, state: Any
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """What this hospital sends for its update, and figures to report (seconds, flags)."""

    def answer(
        self, order: Any, kind: str, query: Mapping[str, Any], node: int, state: Any
    ) -> dict[str, Any]:
        """A setup query of this protocol (a record's content in, one out)."""
        from fedpriv.errors import FedprivError

        raise FedprivError(f"aggregation '{type(self).__name__}' has no setup query {kind!r}")

    def unmask(self, request: Mapping[str, Any], node: int, state: Any) -> dict[str, Any]:
        """What this hospital gives towards finishing a round's aggregate (default: nothing)."""
        return {}

    def noise_split(self, order: Any, state: Any) -> NoiseSplit | None:
        """How this round's record-level DP noise is split across hospitals, when the
        protocol only ever reveals their sum (default: not split; each adds all of it)."""
        return None


class ServerSide(ABC):
    """A protocol at the server: combines what the hospitals sent into the new global
    model. ``rejected`` lists (hospital, reason) of the last round's refused contributions.

    A protocol whose aggregate needs one more step from the hospitals (secure aggregation's
    unmasking) sets ``completes_on_evaluate``: :meth:`aggregate` then only keeps what it got,
    the round's evaluation exchange carries :meth:`evaluate_extra`, and :meth:`complete`
    turns the hospitals' answers into the model. It may change between rounds (never within
    one): the round loop reads it when a round starts, before :meth:`expect`.
    """

    #: the server cannot read the global model (it holds ciphertexts)
    encrypted: ClassVar[bool] = False
    completes_on_evaluate: bool = False
    #: the hospitals check the new aggregate when they evaluate it, and the round's result
    #: is kept only if :meth:`verdict` finds no majority of them unable to use it
    verified_on_evaluate: ClassVar[bool] = False

    def __init__(self) -> None:
        self.rejected: list[tuple[str, str]] = []
        self.stats: dict[str, Any] = {}
        self.failure = ""
        self.first = self.last = 0

    def setup(  # noqa: B027
        self,
        grid: Any,
        nodes: Sequence[int],
        send: Callable[..., Any],
        early: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None,
        early_query: Mapping[str, Any] | None = None,
    ) -> None:
        """A per-run setup phase before round 1 (default: none). ``early``: answers to
        ``early_query``, sent ahead with the deployment's schema query."""

    def expect(self, sampled: Sequence[int]) -> None:  # noqa: B027
        """The nodes asked to train this round (default: nothing to note)."""

    def round_extra(self, sampled: Sequence[int]) -> dict[str, Any]:
        """Protocol content for this round's training message (default: none)."""
        return {}

    def evaluate_extra(self) -> dict[str, Any]:
        """Protocol content for this round's evaluation message (default: none)."""
        return {}

    def complete(self, replies: Mapping[int, Mapping[str, Any]]) -> ArrayRecord | None:
        """The round's model from the evaluation replies (only when completes_on_evaluate)."""
        raise NotImplementedError

    def verdict(self, reports: Mapping[str, str], replies: int) -> str:
        """Why the round's aggregate must be discarded ("" to keep it), from the hospitals
        that reported it unusable (name -> reason) among ``replies`` evaluation replies.

        A majority decides: one lying hospital cannot veto a round, and an aggregate that
        honest hospitals cannot decrypt is never installed."""
        if not reports or 2 * len(reports) <= replies:
            return ""
        reasons = sorted(reports.values(), key=list(reports.values()).count, reverse=True)
        return (
            f"{len(reports)} of {replies} hospitals could not use the aggregate "
            f"({reasons[0]}); the round is discarded and the global model stays"
        )

    @abstractmethod
    def aggregate(
        self,
        contributions: Sequence[Contribution],
        *,
        reference: ArrayRecord | None = None,
        gradient: bool = False,
        server_round: int = 0,
    ) -> ArrayRecord | None:
        """The new global model from this round's contributions (``None``: none usable).

        ``reference`` is the global model the hospitals started from; ``gradient`` is
        FedSGD's mode.
        """

    def reject(self, hospital: str, reason: str) -> None:
        import logging

        logging.getLogger("fedpriv.protocols").warning(
            "rejected the update of %s for this round: %s", hospital, reason
        )
        self.rejected.append((hospital, reason))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A registered protocol: its name, how to build each side, and what it protects."""

    name: str
    server: Callable[..., ServerSide]
    hospital: Callable[..., HospitalSide]
    summary: str


_REGISTRY: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    if protocol.name in _REGISTRY:
        raise ValueError(f"protocol '{protocol.name}' is already registered")
    _REGISTRY[protocol.name] = protocol
    return protocol


def available_protocols() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def create_protocol(name: str) -> Protocol:
    _load_builtin()
    if name not in _REGISTRY:
        from fedpriv.errors import ConfigError

        raise ConfigError(
            f"unknown aggregation '{name}': use one of {', '.join(available_protocols())}"
        )
    return _REGISTRY[name]


def _load_builtin() -> None:
    # the built-in protocols register themselves when imported
    from fedpriv.protocols import ckks, client_dp, plain, secagg  # noqa: F401
