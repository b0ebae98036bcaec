"""Search for the DP-SGD recipe on public data, fast: FedAvg in one process, no Flower.

    python benchmarks/dp_recipe.py --datasets breast-cancer digits --epsilons 4 \
        --grid batch-size=32,128 lr=0.1,0.5 --seeds 0 1 2

The hospitals' side is fedpriv's own (the split, the model, ``plan_dp``'s noise calibration,
Poisson sampling by :class:`PoissonUnits`, Opacus via ``make_private``, ``training.train``);
only Flower, the ledger and the messages are left out, so one run takes seconds instead of
half a minute. It is a tuning tool: the privacy-utility table (``privacy_utility.py``)
measures what ``fedpriv simulate`` gives. Runs only on public data (the embedded sets and the
generated ones of ``public_sets.py``): tuning on a hospital's private data would spend
privacy that no ledger records.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.config import RunConfig
from fedpriv.data import split_for
from fedpriv.models import build, initial_state
from fedpriv.privacy.dp import PoissonUnits, make_private, plan_dp, resolve_grad_sample_mode
from fedpriv.server.prepare import resolve_model
from fedpriv.training import evaluate, get_weights, make_loader, set_weights, train

CPU = torch.device("cpu")


def fast_run(config: RunConfig, norms: list[dict[str, Any]] | None = None) -> float:
    """Central test accuracy of FedAvg (or FedAvgM / FedAdam as Flower does them) after
    ``config.rounds`` rounds, every hospital training every round; ``norms`` (if given)
    receives each hospital's update norm, round by round."""
    dataset, split = split_for(config)
    name, args = resolve_model(config, dataset)
    weights = {k: torch.from_numpy(v) for k, v in initial_state(name, config.seed, **args).items()}
    criterion = torch.nn.CrossEntropyLoss()
    momentum: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    torch.manual_seed(config.seed * 7919 + 1)
    for round_ in range(1, config.rounds + 1):
        updates: list[tuple[dict[str, np.ndarray], int]] = []
        for k, hospital in enumerate(split.hospitals):
            x = dataset.features[hospital.train]
            y = dataset.labels[hospital.train]
            model = build(name, **args)
            set_weights(model, {key: v.numpy() for key, v in weights.items()})
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
            if config.dp:
                plan = plan_dp(
                    num_records=int(y.size),
                    batch_size=config.batch_size,
                    local_epochs=config.local_epochs,
                    rounds=config.rounds,
                    one_step_per_round=False,
                    target_epsilon=config.epsilon,
                    delta=config.delta,
                    accountant=config.accountant,
                    max_grad_norm=config.max_grad_norm,
                )
                units = PoissonUnits(
                    x,
                    y,
                    np.arange(y.size),
                    sample_rate=plan.sample_rate,
                    steps=round(1.0 / plan.sample_rate),
                )
                private = make_private(
                    model=model,
                    optimizer=optimizer,
                    loader=units,
                    criterion=criterion,
                    plan=plan,
                    grad_sample_mode=resolve_grad_sample_mode(model, "auto", proximal=False),
                )
                train(
                    private.model,
                    private.loader,
                    optimizer=private.optimizer,
                    criterion=private.criterion,
                    epochs=config.local_epochs,
                    device=CPU,
                    max_steps=plan.steps_per_round,
                )
                private.close()
            else:
                loader = make_loader(
                    x, y, batch_size=config.batch_size, shuffle=True, seed=round_ * 31 + k
                )
                train(
                    model,
                    loader,
                    optimizer=optimizer,
                    criterion=criterion,
                    epochs=config.local_epochs,
                    device=CPU,
                )
            trained = get_weights(model)
            if norms is not None:
                change = np.concatenate(
                    [(trained[key] - weights[key].numpy()).ravel() for key in weights]
                )
                norms.append(
                    {
                        "round": round_,
                        "hospital": k,
                        "units": int(y.size),
                        "norm": float(np.linalg.norm(change.astype(np.float64))),
                        "parameters": int(change.size),
                    }
                )
            updates.append((trained, int(y.size)))
        total = sum(n for _, n in updates)
        mean = {
            key: torch.from_numpy(sum(w[key].astype(np.float64) * n for w, n in updates) / total)
            for key in weights
        }
        weights = _server_step(config, weights, mean, momentum, second, round_)
    model = build(name, **args)
    set_weights(model, {key: v.float().numpy() for key, v in weights.items()})
    test = make_loader(
        dataset.features[split.test], dataset.labels[split.test], batch_size=1024, shuffle=False
    )
    return evaluate(model, test, criterion=criterion, device=CPU).accuracy


def _server_step(
    config: RunConfig,
    weights: dict[str, torch.Tensor],
    mean: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor],
    second: dict[str, torch.Tensor],
    round_: int,
) -> dict[str, torch.Tensor]:
    """FedAvg takes the mean; FedAvgM (momentum 0.9) and FedAdam follow Flower's updates."""
    if config.strategy == "fedavg":
        return {k: v.float() for k, v in mean.items()}
    out = {}
    for key, w in weights.items():
        delta = mean[key].float() - w.float()
        if config.strategy == "fedavgm":
            momentum[key] = 0.9 * momentum.get(key, torch.zeros_like(delta)) + delta
            out[key] = w + config.server_lr * momentum[key]
        elif config.strategy == "fedadam":  # eta = server-lr, beta 0.9/0.99, tau 1e-3
            m = 0.9 * momentum.get(key, torch.zeros_like(delta)) + 0.1 * delta
            v = 0.99 * second.get(key, torch.zeros_like(delta)) + 0.01 * delta**2
            momentum[key], second[key] = m, v
            out[key] = w + config.server_lr * m / (v.sqrt() + 1e-3)
        else:
            raise ValueError(f"fast_run has no strategy '{config.strategy}'")
    return out


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[4.0])
    parser.add_argument("--no-dp", action="store_true", help="also run without DP")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", nargs="*", default=[], help="fixed run-config key=value")
    parser.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 (all combinations)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fixed = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    axes = [
        (k, [_value(v) for v in vs.split(",")]) for k, vs in (g.split("=", 1) for g in args.grid)
    ]
    settings: list[float | None] = [*args.epsilons] + ([None] if args.no_dp else [])
    results = []
    for dataset in args.datasets:
        for combo in itertools.product(*[values for _, values in axes]):
            point = dict(zip([k for k, _ in axes], combo, strict=True))
            for epsilon in settings:
                accuracies = []
                t0 = time.perf_counter()
                for seed in args.seeds:
                    values = {"dataset": dataset, "seed": seed, **fixed, **point}
                    values.update({"dp": False} if epsilon is None else {"epsilon": epsilon})
                    accuracies.append(fast_run(RunConfig.from_mapping(values)))
                row = {
                    "dataset": Path(dataset).stem,
                    "epsilon": epsilon,
                    **fixed,
                    **point,
                    "mean": round(float(np.mean(accuracies)), 4),
                    "min": round(min(accuracies), 4),
                    "max": round(max(accuracies), 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
