"""What does Flower cost? The same federated run (a) through fedpriv's simulation and
(b) as a plain single-process loop that calls fedpriv.training directly and averages with numpy.

Both do the same work each round: every hospital trains ``local-epochs`` on its training
records from the global model, the models are averaged by example count, every hospital
evaluates the new model on its held-out records, and the central test split is scored.

    python benchmarks/overhead.py --hospitals 10 --rounds 10 --dataset digits --local-epochs 2
    python benchmarks/overhead.py --hospitals 100 --rounds 3 --only simulate

Prints a JSON summary (and writes it with --json FILE).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.config import RunConfig
from fedpriv.data import split_for
from fedpriv.models import build
from fedpriv.server.run import initial_weights, resolve_model
from fedpriv.training import evaluate, get_weights, make_loader, set_weights, train


def plain_loop(config: RunConfig) -> dict[str, Any]:
    """(b): no Flower, no processes; one Python loop over hospitals and rounds."""
    started = time.perf_counter()
    dataset, split = split_for(config)
    model_name, model_args = resolve_model(config, dataset)
    weights = initial_weights(model_name, model_args, config.seed)
    criterion = torch.nn.CrossEntropyLoss()
    device = torch.device("cpu")
    model = build(model_name, **model_args)
    ready = time.perf_counter()
    round_seconds: list[float] = []
    accuracy = float("nan")
    for server_round in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        updates: list[tuple[dict[str, np.ndarray], int]] = []
        for index, hospital in enumerate(split.hospitals):
            torch.manual_seed(config.seed * 1_000_003 + server_round * 1_009 + index)
            set_weights(model, weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
            loader = make_loader(
                dataset.features[hospital.train],
                dataset.labels[hospital.train],
                batch_size=config.batch_size,
                shuffle=True,
                seed=index,
            )
            train(
                model,
                loader,
                optimizer=optimizer,
                criterion=criterion,
                epochs=config.local_epochs,
                device=device,
            )
            updates.append((get_weights(model), hospital.train.size))
        total = sum(n for _, n in updates)
        weights = {
            k: (sum(u[k].astype(np.float64) * n for u, n in updates) / total).astype(np.float32)
            for k in weights
        }
        set_weights(model, weights)
        for hospital in split.hospitals:
            held = make_loader(
                dataset.features[hospital.held_out],
                dataset.labels[hospital.held_out],
                batch_size=1024,
                shuffle=False,
            )
            evaluate(model, held, criterion=criterion, device=device)
        test = make_loader(
            dataset.features[split.test], dataset.labels[split.test], batch_size=1024, shuffle=False
        )
        accuracy = evaluate(model, test, criterion=criterion, device=device).accuracy
        round_seconds.append(time.perf_counter() - t0)
    return {
        "startup_seconds": ready - started,
        "round_seconds": round_seconds,
        "test_accuracy": accuracy,
    }


def flower_simulation(config: RunConfig) -> dict[str, Any]:
    """(a): `fedpriv simulate` through its Python API (the CLI adds only the progress bar)."""
    from fedpriv.server.simulation import simulate

    ends: list[float] = []
    started = time.perf_counter()
    result = simulate(config, on_round=lambda row: ends.append(time.perf_counter()))
    finished = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    steady = statistics.median(gaps) if gaps else float("nan")
    return {
        # time before round 1 could begin: engine start, workers' imports, data loading
        "startup_seconds": (ends[0] - started) - steady if ends else float("nan"),
        "first_round_end_seconds": ends[0] - started if ends else float("nan"),
        "round_seconds": gaps,
        "shutdown_seconds": finished - ends[-1] if ends else float("nan"),
        "total_seconds": finished - started,
        "test_accuracy": result.final.get("test_accuracy"),
        "rounds_per_minute": 60.0 / steady if gaps else float("nan"),
    }


def import_seconds() -> float:
    """Cold start of the `fedpriv` command itself, in a fresh interpreter."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fedpriv.cli"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--only", choices=["simulate", "plain"], default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="fedpriv-bench-")
    values: dict[str, Any] = {
        "dataset": args.dataset,
        "hospitals": args.hospitals,
        "rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "model": args.model,
        "partition": "iid",
        "out": out,
    }
    # Issue 3 turns DP on by default; this benchmark measures the federation, not DP.
    if "dp" in RunConfig.__dataclass_fields__:
        values["dp"] = False
    config = RunConfig.from_mapping(values)
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "config": values,
        "import_seconds": import_seconds(),
    }
    if args.only in (None, "plain"):
        report["plain"] = plain_loop(config)
    if args.only in (None, "simulate"):
        report["simulate"] = flower_simulation(config)
    if "plain" in report and "simulate" in report:
        plain_steady = statistics.median(report["plain"]["round_seconds"][1:])
        sim_steady = statistics.median(report["simulate"]["round_seconds"])
        report["steady_round_ratio"] = sim_steady / plain_steady
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
