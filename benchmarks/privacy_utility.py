"""Central test accuracy at several epsilons and without DP (the privacy-utility table).

    python benchmarks/privacy_utility.py --datasets breast-cancer digits --epsilons 1 4 8

5 hospitals (iid unless --partition), the defaults a new user gets (the DP recipe with DP on,
the plain one without; ``--rounds 0``, the default, leaves rounds to the recipe too); the
epsilon is each hospital's record-level target for the whole run (PRV accountant, delta
1e-5). ``--seeds 0 1 2`` repeats each cell (one row per seed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fedpriv.config import RunConfig
from fedpriv.server.simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--set", nargs="*", default=[], help="extra run-config key=value")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    extra: dict[str, Any] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        extra[key] = (
            json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
        )
    results = []
    for dataset in args.datasets:
        settings: list[float | None] = [*args.epsilons] + ([] if args.no_baseline else [None])
        for epsilon, seed in itertools.product(settings, args.seeds):
            values: dict[str, Any] = {
                "dataset": dataset,
                "hospitals": args.hospitals,
                "rounds": args.rounds,
                "partition": args.partition,
                "seed": seed,
                "out": tempfile.mkdtemp(prefix="fedpriv-pu-"),
                "budget-epsilon": max(10.0, epsilon or 0.0),
                **extra,
            }
            if epsilon is None:
                values["dp"] = False
            else:
                values["epsilon"] = epsilon
            t0 = time.perf_counter()
            run = simulate(RunConfig.from_mapping(values))
            row = {
                "dataset": dataset,
                "epsilon": epsilon,
                "seed": seed,
                "accounted_epsilon": max(run.final["epsilon"].values()) if epsilon else None,
                "test_accuracy": run.final["test_accuracy"],
                "seconds": round(time.perf_counter() - t0, 1),
                **extra,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
