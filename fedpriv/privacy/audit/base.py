"""What every audit shares: what an attacker may hold, what an audit reports, the registry.

An audit declares what it needs (``NEEDS``); :func:`fedpriv.privacy.audit.run.audit_run`
gives it an :class:`AuditInputs` holding what the run directory allows and skips, with the
reason, any audit whose needs the run cannot meet (a deployment run has no central records).
Every audit returns an :class:`AuditResult`: its own metrics, the same metrics for a
no-information baseline, a verdict and a sentence an ethics board can read.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "NEEDS",
    "Audit",
    "AuditInputs",
    "AuditResult",
    "HospitalRecords",
    "Progress",
    "available_audits",
    "create_audit",
    "register_audit",
]

#: what an attacker may hold, by the name an audit declares it with
NEEDS: Mapping[str, str] = {
    "final-model": "the final global model (model.pt)",
    "records": "the hospitals' records and which of them each trained on (partitions.json "
    "and the dataset): only a simulation has them centrally",
    "round-messages": "what a hospital sends the server in a round, re-created by running the "
    "hospital's real round in simulation",
    "auxiliary": "auxiliary knowledge of a record (every feature but the sensitive one)",
    "tabular": "a tabular dataset",
}

#: called as progress(task, done, total)
Progress = Callable[[str, int, int], None]

#: verdicts an audit may return
VERDICTS = ("leak", "no-leak", "inconclusive")


@dataclasses.dataclass(frozen=True, eq=False)
class HospitalRecords:
    """One hospital's record indices in the dataset: what it trained on and held out."""

    name: str
    train: np.ndarray
    held_out: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class AuditInputs:
    """What the auditor holds for one run. ``dataset``/``hospitals`` are None/empty when the
    run has no central records (deployment); ``model`` is None without ``model.pt``."""

    run_dir: Path
    config: Mapping[str, Any]
    model: Any = None  # torch.nn.Module, loaded with the final global state
    dataset: Any = None  # fedpriv.data.Dataset
    hospitals: tuple[HospitalRecords, ...] = ()
    population: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    privacy: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    progress: Progress | None = None

    def tick(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """One audit's findings. ``metrics`` and ``baseline`` hold the same keys: the attack's
    figures and a no-information attacker's. ``attacker`` says what the attacker had;
    ``reading`` is the plain-words conclusion. ``details`` is audit-specific (per-record
    figures, per-hospital rows, images for the report)."""

    attacker: str
    metrics: Mapping[str, Any]
    baseline: Mapping[str, Any]
    verdict: str
    reading: str
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "attacker": self.attacker,
            **dict(self.metrics),
            "baseline": dict(self.baseline),
            "verdict": self.verdict,
            "reading": self.reading,
            **dict(self.details),
        }


class Audit(ABC):
    """One attack on a finished run. ``needs`` names entries of :data:`NEEDS`."""

    needs: frozenset[str] = frozenset()

    def unmet(self, inputs: AuditInputs) -> str | None:
        """Why this audit cannot run on ``inputs``, or None when it can."""
        return None

    @abstractmethod
    def run(self, inputs: AuditInputs) -> AuditResult: ...


_REGISTRY: dict[str, Callable[[], Audit]] = {}


def register_audit(name: str) -> Callable[[Callable[[], Audit]], Callable[[], Audit]]:
    def decorator(factory: Callable[[], Audit]) -> Callable[[], Audit]:
        if name in _REGISTRY:
            raise ValueError(f"audit '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_audits() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def create_audit(name: str) -> Audit:
    if name not in _REGISTRY:
        from fedpriv.errors import ConfigError

        raise ConfigError(f"unknown audit '{name}': use {', '.join(available_audits())}")
    return _REGISTRY[name]()
