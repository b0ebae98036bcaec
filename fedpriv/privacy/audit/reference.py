"""Reference models for LiRA and RMIA, trained in this process with the run's own recipe.

Models come in complementary pairs: one trains on a random half of the audited population,
the other on the rest, so every record is IN for half of the models and OUT for the other
half (what LiRA's online variant needs with few models). The recipe is the federation's:
the half is dealt out to as many pseudo-hospitals as the run had, which train
``local-epochs`` per round with the same architecture, optimizer, learning rate and batch
size (and, for a DP run, DP-SGD with the hospitals' noise multiplier and clipping norm) and
are averaged by example count for ``rounds`` rounds, all in this process with
:mod:`fedpriv.training`. Matching the target's training matters: reference models trained
centrally for the same number of epochs end with differently scaled confidences, and LiRA
then mistakes the shift for (non-)membership (measured: AUC 0.52 vs 0.59).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.models import build
from fedpriv.privacy.dp import DpPlan, make_private
from fedpriv.training import make_loader, train

__all__ = [
    "Outputs",
    "ReferenceRecipe",
    "few_threads",
    "model_outputs",
    "train_reference_models",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Outputs:
    """A model on some records: loss, probability and logit-scaled confidence of the label."""

    loss: np.ndarray
    prob: np.ndarray
    logit: np.ndarray


@torch.no_grad()
def model_outputs(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, *, batch_size: int = 1024
) -> Outputs:
    model.eval()
    losses, probs, logits = [], [], []
    for start in range(0, labels.shape[0], batch_size):
        x = torch.from_numpy(features[start : start + batch_size])
        y = torch.from_numpy(labels[start : start + batch_size])
        out = model(x).double()
        log_p = torch.log_softmax(out, dim=1)
        true = log_p.gather(1, y[:, None]).squeeze(1)
        others = log_p.clone()
        others.scatter_(1, y[:, None], -math.inf)
        losses.append((-true).numpy())
        probs.append(true.exp().numpy())
        # log p - log(1 - p), stable: log p(y) - logsumexp(log p(others))
        logits.append((true - torch.logsumexp(others, dim=1)).numpy())
    if not losses:
        empty = np.empty(0)
        return Outputs(empty, empty, empty)
    return Outputs(np.concatenate(losses), np.concatenate(probs), np.concatenate(logits))


@dataclasses.dataclass(frozen=True)
class ReferenceRecipe:
    model_name: str
    model_args: dict[str, Any]
    rounds: int
    local_epochs: int
    hospitals: int
    batch_size: int
    lr: float
    momentum: float
    noise_multiplier: float = 0.0  # > 0: DP-SGD as at the hospitals
    max_grad_norm: float = 1.0


def _local_update(
    recipe: ReferenceRecipe,
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    seed: int,
) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    criterion = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    if recipe.noise_multiplier > 0:
        loader = make_loader(features, labels, batch_size=recipe.batch_size, shuffle=False)
        batches = math.ceil(labels.size / recipe.batch_size)
        plan = DpPlan(
            noise_multiplier=recipe.noise_multiplier,
            sample_rate=1.0 / batches,
            steps_per_round=batches * recipe.local_epochs,
            rounds=1,
            max_grad_norm=recipe.max_grad_norm,
            delta=1e-5,
            accountant="rdp",
            target_epsilon=float("inf"),
        )
        private = make_private(
            model=model,
            optimizer=optimizer,
            loader=loader,
            criterion=criterion,
            plan=plan,
            grad_sample_mode="hooks",
        )
        try:
            train(
                private.model,
                private.loader,
                optimizer=private.optimizer,
                criterion=private.criterion,
                epochs=recipe.local_epochs,
                device=device,
            )
        finally:
            private.close()
        return
    loader = make_loader(features, labels, batch_size=recipe.batch_size, shuffle=True, seed=seed)
    train(
        model,
        loader,
        optimizer=optimizer,
        criterion=criterion,
        epochs=recipe.local_epochs,
        device=device,
    )


def _train_one(
    recipe: ReferenceRecipe, features: np.ndarray, labels: np.ndarray, seed: int
) -> nn.Module:
    """FedAvg over ``recipe.hospitals`` pseudo-hospitals holding a random split of the data."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build(recipe.model_name, **recipe.model_args)
    parts = [p for p in np.array_split(rng.permutation(labels.size), recipe.hospitals) if p.size]
    for round_ in range(recipe.rounds):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in start.items()}
        for k, part in enumerate(parts):
            model.load_state_dict(start)
            torch.manual_seed(seed * 1_000_003 + round_ * 1_009 + k)
            _local_update(recipe, model, features[part], labels[part], seed + round_ * 97 + k)
            for key, value in model.state_dict().items():
                total[key] += value.double() * part.size
        model.load_state_dict({k: (v / labels.size).to(start[k].dtype) for k, v in total.items()})
    return model


def train_reference_models(
    recipe: ReferenceRecipe,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    count: int,
    seed: int,
    evaluate_on: list[tuple[np.ndarray, np.ndarray]],
    on_model: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[list[Outputs]]]:
    """Train ``count`` models on halves of (features, labels).

    Returns the (count, n) IN mask and, per model, its outputs on each ``evaluate_on`` set.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    member = np.zeros((count, n), dtype=bool)
    for pair in range(0, count, 2):
        half = rng.permutation(n)[: n // 2]
        member[pair, half] = True
        if pair + 1 < count:
            member[pair + 1] = ~member[pair]
    outputs: list[list[Outputs]] = []
    with few_threads():
        for k in range(count):
            model = _train_one(recipe, features[member[k]], labels[member[k]], seed * 7919 + k)
            outputs.append([model_outputs(model, x, y) for x, y in evaluate_on])
            if on_model is not None:
                on_model(k + 1, count)
    return member, outputs


@contextlib.contextmanager
def few_threads(threads: int = 1) -> Iterator[None]:
    """The audit's models are small and their batches tiny: PyTorch's intra-op threads cost
    more than they give, and on a busy machine far more (measured on a loaded 2-core host:
    23 s with the default threads against 0.7 s with one, for one small MLP)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
