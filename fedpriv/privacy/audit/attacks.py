"""Membership-inference attacks behind one interface, by name.

An attack gets what an auditor holds (the target model's per-record outputs, and, for the
attacks that need them, reference models' outputs on the same records) and returns one
score per record: higher means "more likely a member".

- ``loss`` (Yeom et al. 2018): minus the target's loss on the record.
- ``lira`` / ``lira-offline`` (Carlini et al. 2022): a likelihood ratio of the target's
  logit-scaled confidence under Gaussians fitted to reference models trained with (online)
  and without (offline: without only) the record; with few reference models one global
  variance per side ("fixed variance").
- ``rmia`` (Zarifzadeh et al. 2024, offline): how often the record's likelihood ratio
  ``Pr(x|target) / Pr(x)`` beats that of population records ``z`` by a factor gamma, with
  ``Pr(x)`` from OUT reference models, linearly corrected for the missing IN models.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = [
    "Attack",
    "AttackInputs",
    "available_attacks",
    "create_attack",
    "register_attack",
]


@dataclasses.dataclass(frozen=True, eq=False)
class AttackInputs:
    """Per-record quantities; rows of the reference arrays are reference models.

    ``target_loss``, ``target_logit``, ``target_prob``: the target model on each audited
    record (logit = log p - log(1 - p) of the true label, computed stably).
    ``reference_logit``, ``reference_prob``: (K, n) the same for K reference models;
    ``reference_in``: (K, n) whether each reference model trained on the record.
    ``population_prob``: the target on population records z (never trained on by anyone);
    ``population_reference_prob``: (K, |z|) the reference models on them.
    """

    target_loss: np.ndarray
    target_logit: np.ndarray
    target_prob: np.ndarray
    reference_logit: np.ndarray | None = None
    reference_prob: np.ndarray | None = None
    reference_in: np.ndarray | None = None
    population_prob: np.ndarray | None = None
    population_reference_prob: np.ndarray | None = None


class Attack(ABC):
    needs_reference_models: bool = False
    needs_population: bool = False

    @abstractmethod
    def scores(self, inputs: AttackInputs) -> np.ndarray:
        """One score per audited record; higher = more likely a member."""


_REGISTRY: dict[str, Callable[[], Attack]] = {}


def register_attack(name: str) -> Callable[[Callable[[], Attack]], Callable[[], Attack]]:
    def decorator(factory: Callable[[], Attack]) -> Callable[[], Attack]:
        if name in _REGISTRY:
            raise ValueError(f"attack '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_attacks() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def create_attack(name: str) -> Attack:
    if name not in _REGISTRY:
        from fedpriv.errors import ConfigError

        raise ConfigError(f"unknown attack '{name}': use {', '.join(available_attacks())}")
    return _REGISTRY[name]()


@register_attack("loss")
class LossAttack(Attack):
    def scores(self, inputs: AttackInputs) -> np.ndarray:
        return -np.asarray(inputs.target_loss, dtype=np.float64)


def _side_stats(logits: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-record mean over the reference models in ``mask`` and one pooled std."""
    counts = mask.sum(axis=0)
    sums = np.where(mask, logits, 0.0).sum(axis=0)
    overall = float(logits[mask].mean()) if mask.any() else 0.0
    means = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
    residuals = (logits - means[None, :])[mask]
    std = float(residuals.std()) if residuals.size > 1 else 0.0
    return means, max(std, 1e-3)


class _Lira(Attack):
    needs_reference_models = True
    online = True

    def scores(self, inputs: AttackInputs) -> np.ndarray:
        if inputs.reference_logit is None or inputs.reference_in is None:
            raise ValueError("LiRA needs reference models")
        logits = np.asarray(inputs.reference_logit, dtype=np.float64)
        member = np.asarray(inputs.reference_in, dtype=bool)
        target = np.asarray(inputs.target_logit, dtype=np.float64)
        mu_out, sd_out = _side_stats(logits, ~member)
        if not self.online:
            # one-sided: how far above what models without the record produce
            return np.asarray(stats.norm.logcdf(target, mu_out, sd_out))
        mu_in, sd_in = _side_stats(logits, member)
        return np.asarray(
            stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)
        )


@register_attack("lira")
class LiraOnline(_Lira):
    online = True


@register_attack("lira-offline")
class LiraOffline(_Lira):
    online = False


@register_attack("rmia")
class Rmia(Attack):
    needs_reference_models = True
    needs_population = True

    def __init__(self, *, a: float = 0.3, gamma: float = 1.0) -> None:
        self.a = a
        self.gamma = gamma

    def _marginal(self, out_probs: np.ndarray) -> np.ndarray:
        # offline: Pr(x) ~ ((1 + a) Pr_OUT(x) + (1 - a)) / 2 stands in for the IN models
        return 0.5 * ((1 + self.a) * out_probs + (1 - self.a))

    def scores(self, inputs: AttackInputs) -> np.ndarray:
        if (
            inputs.reference_prob is None
            or inputs.reference_in is None
            or inputs.population_prob is None
            or inputs.population_reference_prob is None
        ):
            raise ValueError("RMIA needs reference models and population records")
        probs = np.asarray(inputs.reference_prob, dtype=np.float64)
        out = ~np.asarray(inputs.reference_in, dtype=bool)
        counts = out.sum(axis=0)
        mean_out = np.where(
            counts > 0,
            np.where(out, probs, 0.0).sum(axis=0) / np.maximum(counts, 1),
            probs.mean(axis=0),
        )
        ratio_x = np.asarray(inputs.target_prob) / np.maximum(self._marginal(mean_out), 1e-30)
        z_marginal = self._marginal(np.asarray(inputs.population_reference_prob).mean(axis=0))
        ratio_z = np.asarray(inputs.population_prob) / np.maximum(z_marginal, 1e-30)
        # fraction of z dominated by x by a factor gamma: sort once, count by binary search
        sorted_z = np.sort(ratio_z)
        dominated = np.searchsorted(sorted_z, ratio_x / self.gamma, side="right")
        return dominated / max(1, sorted_z.size)
