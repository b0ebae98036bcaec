"""What a hospital does with the server's orders: train or evaluate on its own records only."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.data import split_for
from fedpriv.errors import ConfigError
from fedpriv.models import build
from fedpriv.training import (
    EvalStats,
    TrainStats,
    evaluate,
    get_weights,
    make_loader,
    resolve_device,
    set_weights,
    train,
)

__all__ = ["HospitalData", "evaluate_round", "local_data", "train_round"]

logger = logging.getLogger(__name__)

# node_config keys Flower's simulation engine sets for each virtual SuperNode
PARTITION_ID = "partition-id"


@dataclasses.dataclass(frozen=True, eq=False)
class HospitalData:
    name: str
    index: int
    train_features: np.ndarray
    train_labels: np.ndarray
    held_out_features: np.ndarray
    held_out_labels: np.ndarray


@functools.lru_cache(maxsize=4)
def _simulated_split(config: RunConfig) -> Any:
    return split_for(config)


def local_data(config: RunConfig, node_config: Mapping[str, Any]) -> HospitalData:
    """This hospital's records: in simulation, its partition of the shared dataset."""
    if PARTITION_ID not in node_config:
        raise ConfigError(
            "this SuperNode's node config has no 'partition-id': start it with "
            "--node-config 'partition-id=0 num-partitions=N'"
        )
    index = int(node_config[PARTITION_ID])
    dataset, split = _simulated_split(config)
    if not 0 <= index < len(split.hospitals):
        raise ConfigError(
            f"partition-id {index} is outside the run's {len(split.hospitals)} hospitals"
        )
    part = split.hospitals[index]
    return HospitalData(
        name=part.name,
        index=index,
        train_features=dataset.features[part.train],
        train_labels=dataset.labels[part.train],
        held_out_features=dataset.features[part.held_out],
        held_out_labels=dataset.labels[part.held_out],
    )


def _model(order: msg.TrainingOrder, arrays: ArrayRecord) -> torch.nn.Module:
    model = build(order.model_name, **order.model_args)
    set_weights(model, {k: v.numpy() for k, v in arrays.items()})
    return model


def _seed(order: msg.TrainingOrder, data: HospitalData) -> int:
    return (order.config.seed * 1_000_003 + order.server_round * 1_009 + data.index) % 2**31


def train_round(
    order: msg.TrainingOrder, data: HospitalData, arrays: ArrayRecord
) -> tuple[ArrayRecord, TrainStats]:
    """One round of local training; returns new weights, or the gradient under FedSGD."""
    config = order.config
    device = resolve_device(config.device)
    seed = _seed(order, data)
    torch.manual_seed(seed)
    model = _model(order, arrays)
    criterion = torch.nn.CrossEntropyLoss()
    if order.mode == msg.MODE_GRADIENT:
        # One full-batch step at learning rate 1: w_before - w_after is the gradient.
        before = get_weights(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loader = make_loader(
            data.train_features,
            data.train_labels,
            batch_size=max(1, data.train_labels.shape[0]),
            shuffle=False,
        )
        stats = train(
            model, loader, optimizer=optimizer, criterion=criterion, epochs=1, device=device
        )
        after = get_weights(model)
        result = {k: before[k] - after[k] for k in before}
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        loader = make_loader(
            data.train_features,
            data.train_labels,
            batch_size=config.batch_size,
            shuffle=True,
            seed=seed,
        )
        stats = train(
            model,
            loader,
            optimizer=optimizer,
            criterion=criterion,
            epochs=config.local_epochs,
            device=device,
            proximal_mu=config.proximal_mu if config.strategy == "fedprox" else 0.0,
        )
        result = get_weights(model)
    return ArrayRecord({k: Array(v) for k, v in result.items()}), stats


def evaluate_round(order: msg.TrainingOrder, data: HospitalData, arrays: ArrayRecord) -> EvalStats:
    """The global model on this hospital's held-out records."""
    device = resolve_device(order.config.device)
    model = _model(order, arrays)
    loader = make_loader(
        data.held_out_features, data.held_out_labels, batch_size=1024, shuffle=False
    )
    return evaluate(model, loader, criterion=torch.nn.CrossEntropyLoss(), device=device)
