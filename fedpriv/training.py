"""THE local training and evaluation loop.

Used by hospitals, by the audit's reference models and by the benchmarks. It knows nothing
about privacy: the caller composes Opacus around the model, optimizer and loader it passes in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.errors import DeviceError

__all__ = [
    "EvalStats",
    "TrainStats",
    "evaluate",
    "get_weights",
    "make_loader",
    "per_example_losses",
    "resolve_device",
    "set_weights",
    "train",
]


@dataclasses.dataclass(frozen=True)
class TrainStats:
    loss: float
    num_examples: int
    steps: int


@dataclasses.dataclass(frozen=True)
class EvalStats:
    loss: float
    accuracy: float
    num_examples: int


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without CUDA is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was asked for but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False): use --device cpu or auto"
        )
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device '{name}': use auto, cpu or cuda")
    return torch.device(name)


def make_loader(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False
    )


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The state_dict as numpy arrays (copies), in the model's own key order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)


def train(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    epochs: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
) -> TrainStats:
    """Run ``epochs`` passes over ``loader``; returns the mean training loss per example.

    ``max_steps`` stops after that many optimizer steps (FedSGD under DP takes one).
    With ``proximal_mu > 0`` the FedProx term ``mu/2 * ||w - w_start||^2`` is added.
    Empty batches (which Poisson sampling can draw) are skipped without a step of our own;
    a DP optimizer still gets to take its noise-only step through the wrapped loader.
    """
    model.to(device)
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    total_loss = 0.0
    total_examples = 0
    steps = 0
    for _ in range(epochs):
        for inputs, targets in loader:
            if max_steps is not None and steps >= max_steps:
                break
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            if anchor is not None:
                prox = sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            steps += 1
            batch = int(targets.shape[0])
            if batch:
                total_loss += float(loss.detach()) * batch
                total_examples += batch
    mean = total_loss / total_examples if total_examples else math.nan
    return TrainStats(loss=mean, num_examples=total_examples, steps=steps)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    criterion: nn.Module,
    device: torch.device,
) -> EvalStats:
    """Mean loss and accuracy over every example in ``loader``."""
    model.to(device)
    model.eval()
    total_loss = 0.0
    correct = 0
    count = 0
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        outputs = model(inputs)
        batch = int(targets.shape[0])
        total_loss += float(criterion(outputs, targets)) * batch
        correct += int((outputs.argmax(dim=1) == targets).sum())
        count += batch
    if count == 0:
        return EvalStats(loss=math.nan, accuracy=math.nan, num_examples=0)
    return EvalStats(loss=total_loss / count, accuracy=correct / count, num_examples=count)


@torch.no_grad()
def per_example_losses(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy loss and softmax probability of the true label, one per record."""
    model.to(device)
    model.eval()
    losses: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for start in range(0, labels.shape[0], batch_size):
        x = torch.from_numpy(features[start : start + batch_size]).to(device)
        y = torch.from_numpy(labels[start : start + batch_size]).to(device)
        logits = model(x)
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none").cpu().numpy())
        probs.append(torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1).cpu().numpy())
    if not losses:
        return np.empty(0), np.empty(0)
    return np.concatenate(losses), np.concatenate(probs)
