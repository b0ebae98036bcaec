"""The reconstruction: dummy records optimised until their update matches the observed one,
then matched to the true records."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedpriv.config import RunConfig
from fedpriv.privacy.audit.inversion.replay import Observation, Participant
from fedpriv.privacy.audit.inversion.settings import InversionSettings


class Simulator:
    """The attacker's model of the observed message: the update that records ``x`` (with
    ``labels``, one block per participant, in order) would produce from the global model
    ``initial``; differentiable in ``x`` (local SGD steps unrolled, create_graph)."""

    def __init__(
        self,
        model_name: str,
        model_args: Mapping[str, Any],
        initial: Mapping[str, np.ndarray],
        observation: Observation,
        labels: np.ndarray,
        config: RunConfig,
    ) -> None:
        from fedpriv.models import build

        model = build(model_name, **dict(model_args))
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in initial.items()})
        model.train()
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.theta0 = {
            n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()
        }
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.target = torch.cat(
            [
                torch.as_tensor(observation.target[n], dtype=torch.float32).reshape(-1)
                for n in self.names
            ]
        )
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.lr = 1.0 if observation.gradient else config.lr
        self.momentum = 0.0 if observation.gradient else config.momentum
        self.mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
        self.spans: list[tuple[int, int, Participant]] = []
        offset = 0
        for p in observation.participants:
            self.spans.append((offset, offset + p.records.size, p))
            offset += p.records.size
        self.count = offset
        self.criterion = torch.nn.CrossEntropyLoss()

    def _loss(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
        from torch.func import functional_call

        return self.criterion(functional_call(self.model, {**params, **self.buffers}, (x,)), y)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened parameter change (weighted over participants) ``x`` would send."""
        names, theta0 = self.names, self.theta0
        total = torch.zeros_like(self.target)
        for start, stop, p in self.spans:
            xs, ys = x[start:stop], self.labels[start:stop]
            params = dict(theta0)
            velocity: list[torch.Tensor] | None = None
            for step in p.schedule:
                if step.size == 0:
                    continue
                index = torch.as_tensor(step, dtype=torch.long)
                loss = self._loss(params, xs[index], ys[index])
                if self.mu > 0:
                    loss = loss + 0.5 * self.mu * sum(
                        (params[n] - theta0[n]).pow(2).sum() for n in names
                    )
                grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
                if self.momentum > 0:
                    velocity = (
                        list(grads)
                        if velocity is None
                        else [self.momentum * v + g for v, g in zip(velocity, grads, strict=True)]
                    )
                    grads = tuple(velocity)
                params = {n: params[n] - self.lr * g for n, g in zip(names, grads, strict=True)}
            delta = torch.cat([(params[n] - theta0[n]).reshape(-1) for n in names])
            total = total + p.weight * delta
        return total

    def mismatch(self, x: torch.Tensor, loss: str = "cosine") -> torch.Tensor:
        """1 - cosine similarity (``cosine``) or the squared error relative to the observed
        update's squared norm (``l2``) between ``x``'s update and the observed one."""
        guess = self.update(x)
        norm = self.target.norm() + 1e-12
        if loss == "cosine":
            return 1 - (guess @ self.target) / ((guess.norm() + 1e-12) * norm)
        return (guess - self.target).pow(2).sum() / norm**2


def reconstruct(
    model_name: str,
    model_args: Mapping[str, Any],
    initial: Mapping[str, np.ndarray],
    observation: Observation,
    labels: np.ndarray,
    feature_shape: tuple[int, ...],
    *,
    config: RunConfig,
    settings: InversionSettings,
    bounds: tuple[float, float] | None,
    image: bool,
    seed: int,
    tick: Callable[[], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Dummy records (one per record of the observation's participants, in their order,
    with ``labels``) optimised until the update they would produce matches
    ``observation.target``; returns them and their final matching loss."""
    simulator = Simulator(model_name, model_args, initial, observation, labels, config)

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        match = simulator.mismatch(x, settings.loss)
        total = match
        if image and settings.tv > 0:
            total = total + settings.tv * _total_variation(x)
        return total, match

    # small problems run fastest on one thread (and do not fight other work for the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, settings.threads))
    try:
        return _optimise(objective, simulator.count, feature_shape, settings, bounds, seed, tick)
    finally:
        torch.set_num_threads(threads)


def _optimise(
    objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    count: int,
    feature_shape: tuple[int, ...],
    settings: InversionSettings,
    bounds: tuple[float, float] | None,
    seed: int,
    tick: Callable[[], None] | None,
) -> tuple[np.ndarray, float]:
    """Restarts from random points: with several, each is probed for a quarter of the
    steps at the full learning rate and the one that matches best (the attacker sees only
    the match) runs the whole schedule (steps, learning rate / 10 at 3/8, 5/8 and 7/8)."""
    generator = torch.Generator().manual_seed(int(seed) % 2**63)

    def start() -> torch.Tensor:
        x = torch.randn((count, *feature_shape), generator=generator)
        if bounds is not None:
            low, high = bounds
            x = ((low + high) / 2 + x * (high - low) / 4).clamp(low, high)
        return x

    def descend(x: torch.Tensor, steps: int, decay: bool) -> tuple[torch.Tensor, float]:
        x = x.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.lr)
        milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay else []
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        for _ in range(steps):
            total, _match = objective(x)
            (grad,) = torch.autograd.grad(total, [x])
            x.grad = grad.sign() if settings.signed else grad
            optimizer.step()
            schedule.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(bounds[0], bounds[1])
        _, final = objective(x)
        value = float(final.detach())
        return x.detach(), value if math.isfinite(value) else math.inf

    if settings.restarts == 1:
        x, value = descend(start(), settings.steps, decay=True)
        if tick is not None:
            tick()
        return x.numpy().copy(), value
    probe = max(1, settings.steps // 4)
    candidates = []
    for _ in range(settings.restarts):
        candidates.append(descend(start(), probe, decay=False))
        if tick is not None:
            tick()
    x, _ = min(candidates, key=lambda c: c[1])
    x, value = descend(x, settings.steps, decay=True)
    if tick is not None:
        tick()
    return x.numpy().copy(), value


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def match_records(
    truth: np.ndarray, truth_labels: np.ndarray, guesses: np.ndarray, guess_labels: np.ndarray
) -> np.ndarray:
    """For each true record, the reconstruction assigned to it (Hungarian method on the
    squared error; a reconstruction is only assigned to a record of its own label)."""
    a = truth.reshape(truth.shape[0], -1).astype(np.float64)
    b = guesses.reshape(guesses.shape[0], -1).astype(np.float64)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).mean(axis=2)
    cost = cost + 1e12 * (np.asarray(truth_labels)[:, None] != np.asarray(guess_labels)[None, :])
    rows, cols = linear_sum_assignment(cost)
    assigned = np.empty(a.shape[0], dtype=np.int64)
    assigned[rows] = cols
    return assigned
