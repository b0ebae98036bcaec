"""Strategies by name: fedpriv's FedAvg and FedSGD, plus Flower's stock strategies.

``create_strategy(name, config=..., aggregator=...)`` is the one way the server builds a
strategy; ``aggregator`` is the run's protocol server side (:mod:`fedpriv.protocols`).
Stock strategies average plaintext weights themselves, so they take no aggregator and run
only with plaintext aggregation.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAdam, FedAvgM, FedProx, FedYogi, Strategy

from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.protocols.base import Contribution, ServerSide
from fedpriv.strategies.fedavg import FedAvg
from fedpriv.strategies.fedsgd import FedSGD

__all__ = [
    "Contribution",
    "FedAvg",
    "FedSGD",
    "available_strategies",
    "create_strategy",
    "is_stock",
    "register_strategy",
]

Aggregator = ServerSide
StrategyFactory = Callable[[RunConfig, Aggregator], Strategy]
_REGISTRY: dict[str, StrategyFactory] = {}
_STOCK: set[str] = set()


def register_strategy(
    name: str, *, stock: bool = False
) -> Callable[[StrategyFactory], StrategyFactory]:
    def decorator(factory: StrategyFactory) -> StrategyFactory:
        if name in _REGISTRY:
            raise ValueError(f"strategy '{name}' is already registered")
        _REGISTRY[name] = factory
        if stock:
            _STOCK.add(name)
        return factory

    return decorator


def available_strategies() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def is_stock(name: str) -> bool:
    """True for Flower's own strategies, which aggregate plaintext weights themselves."""
    return name in _STOCK


def create_strategy(name: str, *, config: RunConfig, aggregator: Aggregator) -> Strategy:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown strategy '{name}': use one of {', '.join(available_strategies())}"
        )
    return _REGISTRY[name](config, aggregator)


def _common(config: RunConfig) -> dict[str, float | int]:
    return {"fraction_train": config.fraction_train, "min_train_nodes": 1}


@register_strategy("fedavg")
def _fedavg(config: RunConfig, aggregator: Aggregator) -> Strategy:
    return FedAvg(aggregator=aggregator, seed=config.seed, **_common(config))  # type: ignore[arg-type]


@register_strategy("fedsgd")
def _fedsgd(config: RunConfig, aggregator: Aggregator) -> Strategy:
    return FedSGD(
        aggregator=aggregator, server_lr=config.server_lr, seed=config.seed, **_common(config)
    )


def _stock_kwargs(config: RunConfig) -> dict[str, float | int]:
    # Never wait for every node: a dropped hospital must not hang the round.
    return {
        "fraction_train": config.fraction_train,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }


@register_strategy("fedprox", stock=True)
def _fedprox(config: RunConfig, aggregator: Aggregator) -> Strategy:
    return FedProx(proximal_mu=config.proximal_mu, **_stock_kwargs(config))  # type: ignore[arg-type]


@register_strategy("fedadam", stock=True)
def _fedadam(config: RunConfig, aggregator: Aggregator) -> Strategy:
    return FedAdam(**_stock_kwargs(config))  # type: ignore[arg-type]


@register_strategy("fedyogi", stock=True)
def _fedyogi(config: RunConfig, aggregator: Aggregator) -> Strategy:
    return FedYogi(**_stock_kwargs(config))  # type: ignore[arg-type]


@register_strategy("fedavgm", stock=True)
def _fedavgm(config: RunConfig, aggregator: Aggregator) -> Strategy:
    return FedAvgM(
        server_learning_rate=config.server_lr,
        server_momentum=0.9,
        **_stock_kwargs(config),  # type: ignore[arg-type]
    )
