"""Opacus integration: DP events, noise calibration over the planned run, and DP-SGD set-up.

The unit of privacy is one record of one hospital. Each hospital calibrates its noise from its
own dataset size so that the *whole planned run* (rounds x local steps at its Poisson sample
rate) lands at or just under the target epsilon. What gets recorded is the mechanism
(:class:`DpEvent`), never only an epsilon, so any accountant can recompose the history.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.config import ACCOUNTANTS, GRAD_SAMPLE_MODES
from fedpriv.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "DpEvent",
    "DpPlan",
    "PrivateTraining",
    "batchnorm_layers",
    "compose_epsilon",
    "make_private",
    "plan_dp",
    "reseed_from_os",
    "resolve_grad_sample_mode",
]


@dataclasses.dataclass(frozen=True)
class DpEvent:
    """``steps`` Poisson-sampled Gaussian mechanisms at sample rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def compose_epsilon(events: Iterable[DpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all ``events`` composed by Opacus's ``accountant``.

    Events of the same mechanism are merged first (``k1`` then ``k2`` steps of one
    mechanism is ``k1 + k2`` steps of it): the same epsilon, and the PRV accountant's cost
    then grows with the number of distinct mechanisms, not with the number of rounds.
    """
    merged: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps > 0:
            key = (e.noise_multiplier, e.sample_rate)
            merged[key] = merged.get(key, 0) + e.steps
    if not merged:
        return 0.0
    history = tuple((sigma, q, steps) for (sigma, q), steps in merged.items())
    return _compose(history, delta, accountant)


@functools.lru_cache(maxsize=256)
def _compose(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@dataclasses.dataclass(frozen=True)
class DpPlan:
    """One hospital's DP-SGD settings for one run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float

    def round_event(self) -> DpEvent:
        return DpEvent(self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def planned_epsilon(self) -> float:
        run = DpEvent(self.noise_multiplier, self.sample_rate, self.steps_per_round * self.rounds)
        return compose_epsilon([run], delta=self.delta, accountant=self.accountant)


def plan_dp(
    *,
    num_records: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    one_step_per_round: bool,
    target_epsilon: float,
    delta: float,
    accountant: str,
    max_grad_norm: float,
    noise_multiplier: float = 0.0,
) -> DpPlan:
    """Calibrate the noise for a hospital with ``num_records`` training records.

    The sample rate is Opacus's: ``1 / ceil(n / batch_size)``; an epoch is ``ceil(n / B)``
    Poisson-sampled steps. FedSGD takes one step per round. ``noise_multiplier > 0`` skips
    calibration (the planned epsilon is then whatever it gives).
    """
    if num_records < 1:
        raise ConfigError("a hospital with no training records cannot train")
    if delta >= 1.0 / num_records:
        raise ConfigError(
            f"delta {delta:g} must be below 1/n = {1.0 / num_records:.3g} for a hospital with "
            f"{num_records} training records: lower --delta"
        )
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant '{accountant}': use prv or rdp")
    batches = math.ceil(num_records / batch_size)
    sample_rate = 1.0 / batches
    steps_per_round = 1 if one_step_per_round else local_epochs * batches
    if noise_multiplier <= 0:
        noise_multiplier = calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps_per_round * rounds,
            accountant=accountant,
        )
    return DpPlan(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        max_grad_norm=max_grad_norm,
        delta=delta,
        accountant=accountant,
        target_epsilon=target_epsilon,
    )


@functools.lru_cache(maxsize=64)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest noise multiplier (to 0.5 %) whose epsilon is at most the target.

    Bisection on the noise multiplier. The RDP accountant (cheap, never tighter than PRV)
    brackets the answer first, so the PRV accountant is asked only a handful of times.
    """

    def epsilon(sigma: float, mechanism: str) -> float:
        return compose_epsilon(
            [DpEvent(sigma, sample_rate, steps)], delta=delta, accountant=mechanism
        )

    def bisect(low: float, high: float, mechanism: str) -> float:
        while (high - low) > 0.005 * high:
            mid = 0.5 * (low + high)
            if epsilon(mid, mechanism) > target_epsilon:
                low = mid
            else:
                high = mid
        return high

    high = 1.0
    while epsilon(high, "rdp") > target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon:g}")
    sigma = bisect(0.0 if high == 1.0 else high / 2.0, high, "rdp")
    if accountant == "rdp":
        return sigma
    while epsilon(sigma, accountant) > target_epsilon:  # not expected: PRV is tighter
        sigma *= 1.1
    return bisect(0.5 * sigma, sigma, accountant)


# ---- models --------------------------------------------------------------------------------


def batchnorm_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of every layer DP-SGD cannot use (BatchNorm mixes records in a batch)."""
    return [
        (name, type(module).__name__)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


def resolve_grad_sample_mode(model: nn.Module, requested: str, *, proximal: bool) -> str:
    """``auto``: ghost clipping when every trainable layer is Linear or Embedding.

    Those are the layers Opacus computes true ghost norms for; for others (convolutions,
    GroupNorm) ghost mode falls back to per-sample gradients *and* runs two backward passes,
    so it is slower than hooks (benchmarks/dp_overhead.py: CNN 1.4-1.9x vs 1.3x per step).
    Ghost also needs a plain loss, so FedProx's proximal term forces hooks.
    """
    if requested not in GRAD_SAMPLE_MODES:
        raise ConfigError(f"unknown grad-sample-mode '{requested}': use auto, hooks or ghost")
    if requested == "hooks":
        return "hooks"
    if requested == "ghost":
        if proximal or not _all_layers_supported(model):
            raise ConfigError(
                "grad-sample-mode ghost needs a plain loss (no FedProx term) and layers Opacus "
                "supports: use --grad-sample-mode hooks"
            )
        return "ghost"
    return "ghost" if not proximal and _only_ghost_norm_layers(model) else "hooks"


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def _only_ghost_norm_layers(model: nn.Module) -> bool:
    layers = _trainable_layers(model)
    return bool(layers) and all(isinstance(m, nn.Linear | nn.Embedding) for m in layers)


def _all_layers_supported(model: nn.Module) -> bool:
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    return all(type(m) in GradSampleModule.GRAD_SAMPLERS for m in _trainable_layers(model))


def reseed_from_os() -> None:
    """Seed torch's global generator from the OS entropy pool.

    Poisson sampling and the Gaussian noise draw from it. They must never follow ``--seed``:
    anyone who knows the seed (the server does) could otherwise replay the noise and
    subtract it.
    """
    torch.manual_seed(secrets.randbits(63))


@dataclasses.dataclass
class PrivateTraining:
    """What :func:`make_private` hands back: use these instead of the originals."""

    model: nn.Module
    optimizer: Any
    criterion: nn.Module
    loader: DataLoader
    engine: Any
    mode: str
    hooks: Any = None

    def steps_taken(self) -> int:
        return sum(int(h[2]) for h in self.engine.accountant.history)

    def accountant_state(self) -> dict[str, Any]:
        state = self.engine.accountant.state_dict()
        return {"mechanism": state.get("mechanism"), "history": [list(h) for h in state["history"]]}

    def close(self) -> None:
        """Remove Opacus's hooks from the model, so it can be trained (or wrapped) again."""
        cleanup = getattr(self.hooks, "cleanup", None)
        if callable(cleanup):
            cleanup()


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    criterion: nn.Module,
    plan: DpPlan,
    grad_sample_mode: str,
    accountant_state: dict[str, Any] | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer, loader (Poisson) and criterion with Opacus for one round.

    ``accountant_state`` carries the run's accountant from the previous round (Flower's
    ``context.state``), so the engine continues the history instead of forgetting it.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=plan.accountant)
    if accountant_state:
        engine.accountant.load_state_dict(
            {
                "mechanism": accountant_state.get("mechanism", plan.accountant),
                "history": [tuple(h) for h in accountant_state.get("history", [])],
            }
        )
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
        wrap_model=False,
    )
    if grad_sample_mode == "ghost":
        hooks, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        hooks, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    # wrap_model=False: train the original module (no `_module.` prefix in its state_dict)
    return PrivateTraining(
        model=model if not isinstance(hooks, nn.Module) else hooks,
        optimizer=dp_optimizer,
        criterion=dp_criterion,
        loader=dp_loader,
        engine=engine,
        mode=grad_sample_mode,
        hooks=hooks,
    )
