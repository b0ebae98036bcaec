"""Federated accuracy beside a centrally trained model, on the same records and test split.

    python benchmarks/quality.py --rounds 20 --hospitals 5 --partition dirichlet --alpha 0.5

The central model trains on the union of the hospitals' training records for
``rounds x local-epochs`` epochs with the same model, optimizer, learning rate and batch size
(fedpriv.training, one process) and is scored on the same central test split.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.config import RunConfig
from fedpriv.data import split_for
from fedpriv.models import build
from fedpriv.server.run import resolve_model
from fedpriv.server.simulation import simulate
from fedpriv.training import evaluate, make_loader, train


def central(config: RunConfig) -> float:
    dataset, split = split_for(config)
    name, args = resolve_model(config, dataset)
    torch.manual_seed(config.seed)
    model = build(name, **args)
    members = np.concatenate([h.train for h in split.hospitals])
    loader = make_loader(
        dataset.features[members],
        dataset.labels[members],
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    criterion = torch.nn.CrossEntropyLoss()
    train(
        model,
        loader,
        optimizer=optimizer,
        criterion=criterion,
        epochs=config.rounds * config.local_epochs,
        device=torch.device("cpu"),
    )
    test = make_loader(
        dataset.features[split.test], dataset.labels[split.test], batch_size=1024, shuffle=False
    )
    return evaluate(model, test, criterion=criterion, device=torch.device("cpu")).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast-cancer"])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            values: dict[str, Any] = {
                "dataset": dataset,
                "hospitals": args.hospitals,
                "rounds": args.rounds,
                "partition": args.partition,
                "alpha": args.alpha,
                "seed": seed,
                "out": tempfile.mkdtemp(prefix="fedpriv-quality-"),
            }
            if "dp" in RunConfig.__dataclass_fields__:
                values["dp"] = False
            config = RunConfig.from_mapping(values)
            t0 = time.perf_counter()
            run = simulate(config)
            seconds = time.perf_counter() - t0
            results.append(
                {
                    "dataset": dataset,
                    "seed": seed,
                    "federated_test_accuracy": run.final["test_accuracy"],
                    "central_test_accuracy": central(config),
                    "federated_seconds": round(seconds, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
