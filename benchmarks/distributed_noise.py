"""FedSGD under secure aggregation: local noise (every hospital adds all of its DP-SGD noise)
against distributed noise (each adds 1/sqrt(m - t) of it), at the same epsilon and rounds.

    python benchmarks/distributed_noise.py --datasets breast-cancer digits --seeds 0 1 2

Real Flower simulations through ``fedpriv.simulate`` (secure aggregation's setup, masking and
unmasking, the ledgers), one per dataset, seed and mode, each with its own ledger directory.
Prints, per dataset and mode, the central test accuracy (mean and range over seeds), the
noise multiplier each hospital added, the one the ledger records, and the epsilons (as
recorded, and the planned one if the collusion assumption fails). Public data only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fedpriv
from fedpriv.config import RunConfig


def one_run(settings: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    config = RunConfig.from_mapping(
        {**settings, "out": str(out), "run-name": name, "ledger-dir": str(out / f"ledger-{name}")}
    )
    started = time.perf_counter()
    result = fedpriv.simulate(config)
    seconds = time.perf_counter() - started
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    reports = list(privacy["hospitals"].values())
    split = [r.get("distributed_noise") for r in reports]
    return {
        "accuracy": float(result.final["test_accuracy"]),
        "seconds": seconds,
        "recorded_sigma": sorted({round(float(r["noise_multiplier"]), 4) for r in reports}),
        "added_sigma": sorted(
            {
                round(float(s["added_noise_multiplier"] if s else r["noise_multiplier"]), 4)
                for r, s in zip(reports, split, strict=True)
            }
        ),
        "epsilon": float(privacy["max_epsilon"]),
        "fallback_epsilon": max(
            (float(s["fallback_planned_epsilon"]) for s in split if s), default=None
        ),
        "declined": sum(len(row.get("declined", {})) for row in result.rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=0, help="0: the DP recipe's")
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--secagg-threshold", type=int, default=0)
    parser.add_argument("--noise-colluders", type=int, default=-1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            runs: dict[str, list[dict[str, Any]]] = {"local": [], "distributed": []}
            for seed in args.seeds:  # the two modes side by side, seed by seed
                for mode, found in runs.items():
                    settings = {
                        "dataset": dataset,
                        "hospitals": args.hospitals,
                        "rounds": args.rounds,
                        "epsilon": args.epsilon,
                        "seed": seed,
                        "strategy": "fedsgd",
                        "aggregation": "secagg",
                        "secagg-threshold": args.secagg_threshold,
                        "distributed-noise": mode == "distributed",
                        "noise-colluders": args.noise_colluders,
                    }
                    name = f"{dataset}-{mode}-{seed}"
                    try:
                        found.append(one_run(settings, Path(tmp), name))
                    except Exception as exc:  # e.g. Ray failing to start on a loaded machine
                        print(f"{name}: {exc}; once more", file=sys.stderr)
                        found.append(one_run(settings, Path(tmp), f"{name}-again"))
                    print(
                        json.dumps({"dataset": dataset, "mode": mode, "seed": seed, **found[-1]}),
                        flush=True,
                    )
            for mode, found in runs.items():
                accuracies = [r["accuracy"] for r in found]
                results.append(
                    {
                        "dataset": dataset,
                        "mode": mode,
                        "seeds": args.seeds,
                        "accuracy_mean": sum(accuracies) / len(accuracies),
                        "accuracy_min": min(accuracies),
                        "accuracy_max": max(accuracies),
                        "runs": found,
                    }
                )
    print()
    print(
        "| dataset | noise | test accuracy (mean, range) | sigma added | sigma recorded "
        "| epsilon | epsilon if the assumption fails |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        first = r["runs"][0]
        fallback = first["fallback_epsilon"]
        print(
            f"| {r['dataset']} | {r['mode']} | {r['accuracy_mean']:.3f} "
            f"({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}) | "
            f"{', '.join(f'{s:g}' for s in first['added_sigma'])} | "
            f"{', '.join(f'{s:g}' for s in first['recorded_sigma'])} | {first['epsilon']:.2f} | "
            f"{'-' if fallback is None else f'{fallback:.2f}'} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
