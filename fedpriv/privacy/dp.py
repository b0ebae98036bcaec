"""Opacus integration: DP-SGD set-up, at the level of records or of patients.

The unit of privacy is a patient. Each hospital calibrates its noise from its own number of
patients so that the *whole planned run* (rounds x local steps at its Poisson sample rate)
lands at or just under the target epsilon (:mod:`fedpriv.privacy.accounting`). When a patient
has several records, patients are sampled and each sampled patient contributes one clipped
gradient (the mean of its records' per-sample gradients), so the accountant's epsilon is per
patient; when every patient has one record this is ordinary DP-SGD.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.config import GRAD_SAMPLE_MODES
from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    DpEvent,
    DpPlan,
    calibrate_noise,
    compose_epsilon,
    plan_dp,
    plan_for_run,
)

__all__ = [
    "ACCOUNTANTS",
    "DpEvent",
    "DpPlan",
    "PatientLevelOptimizer",
    "PoissonUnits",
    "PrivateTraining",
    "batchnorm_layers",
    "calibrate_noise",
    "compose_epsilon",
    "make_private",
    "plan_dp",
    "plan_for_run",
    "reseed_from_os",
    "resolve_grad_sample_mode",
]


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


class PoissonUnits:
    """Poisson sampling of training units at the plan's rate, ``steps`` times an epoch.

    A unit is a patient: each is in a step's batch with probability ``sample_rate``,
    independently, and brings all its records. Unlike a DataLoader sized from the data, the
    rate is the *plan's* (what the ledger records) even when patients were excluded for
    budget. In patient mode the optimizer is told, batch by batch, which record belongs to
    which sampled patient. Randomness: torch's global generator, which every hospital
    reseeds from the OS before DP-SGD (never from ``--seed``).
    """

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        units: np.ndarray,
        *,
        sample_rate: float,
        steps: int,
    ) -> None:
        self.features = torch.from_numpy(np.ascontiguousarray(features))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))
        order = np.argsort(units, kind="stable")
        counts = np.bincount(units)
        self.num_units = int(counts.size)
        self.order = torch.from_numpy(order)
        self.starts = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self.counts = torch.from_numpy(counts)
        self.grouped = bool(counts.max(initial=1) > 1)
        self.sample_rate = sample_rate
        self.steps = steps
        self.dataset = range(self.num_units)  # what Opacus sizes the expected batch from
        self.optimizer: PatientLevelOptimizer | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            chosen = torch.nonzero(
                torch.rand(self.num_units) < self.sample_rate, as_tuple=False
            ).reshape(-1)
            if not self.grouped:
                rows = self.order[chosen]
                segments = None
            else:
                counts = self.counts[chosen]
                segments = torch.repeat_interleave(torch.arange(chosen.numel()), counts)
                offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(
                    torch.cumsum(counts, 0) - counts, counts
                )
                rows = self.order[self.starts[chosen][segments] + offsets]
            if self.optimizer is not None:
                self.optimizer.segments = segments
                self.optimizer.units_in_batch = int(chosen.numel())
            yield self.features[rows], self.labels[rows]


class PatientLevelOptimizer:
    """Opacus's DPOptimizer, with each sampled patient's per-record gradients averaged into
    one per-patient gradient before it clips and adds noise: one clipped contribution per
    patient, so the Gaussian mechanism's sensitivity is one patient's."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.segments: torch.Tensor | None = None
        self.units_in_batch = 0

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure: Any = None) -> Any:
        if self.segments is not None:
            self._regroup(self.segments)
        return self.optimizer.step(closure)

    def _regroup(self, segments: torch.Tensor) -> None:
        units = self.units_in_batch
        for p in self.optimizer.params:
            grad_sample = getattr(p, "grad_sample", None)
            if grad_sample is None:
                continue
            if isinstance(grad_sample, list):
                grad_sample = torch.cat(grad_sample, dim=0)
            seg = segments.to(grad_sample.device)
            summed = torch.zeros(
                (units, *grad_sample.shape[1:]), dtype=grad_sample.dtype, device=grad_sample.device
            )
            summed.index_add_(0, seg, grad_sample)
            counts = torch.bincount(seg, minlength=units).clamp(min=1).to(grad_sample.dtype)
            p.grad_sample = summed / counts.view(-1, *([1] * (grad_sample.dim() - 1)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


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
    loader: DataLoader | PoissonUnits,
    criterion: nn.Module,
    plan: DpPlan,
    grad_sample_mode: str,
    accountant_state: dict[str, Any] | None = None,
    noise_multiplier: float | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer, loader (Poisson) and criterion with Opacus for one round.

    A :class:`PoissonUnits` loader samples patients at the plan's rate itself (and, when a
    patient has several records, makes the optimizer clip per patient); a plain DataLoader
    is Poisson-sampled by Opacus at ``1 / len(loader)``. ``accountant_state`` carries the
    run's accountant from the previous round (Flower's ``context.state``), so the engine
    continues the history instead of forgetting it. ``noise_multiplier``: the noise this
    hospital adds itself when it is less than the plan's (distributed noise,
    :mod:`fedpriv.privacy.distributed_noise`: the rest comes from the other hospitals'
    shares in the secure sum); Opacus's own accountant then records what was added here,
    the ledger what protects the patients.
    """
    from opacus import PrivacyEngine

    units = loader if isinstance(loader, PoissonUnits) else None
    if units is not None and units.grouped and grad_sample_mode != "hooks":
        grad_sample_mode = "hooks"  # per-patient regrouping needs the per-record gradients

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
        noise_multiplier=plan.noise_multiplier if noise_multiplier is None else noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=units is None,
        grad_sample_mode=grad_sample_mode,
        wrap_model=False,
    )
    if grad_sample_mode == "ghost":
        hooks, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        hooks, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    if units is not None:
        # the mean over the *expected* batch of patients, exactly (Opacus rounds it down,
        # and a hospital left with fewer patients than steps would divide by zero)
        dp_optimizer.expected_batch_size = max(1.0, units.num_units * plan.sample_rate)
        if units.grouped:
            dp_optimizer = PatientLevelOptimizer(dp_optimizer)
            units.optimizer = dp_optimizer
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
