"""Honest DP-SGD update norms under the DP recipe, against secure aggregation's derived range.

    python benchmarks/secagg_norms.py --datasets breast-cancer digits --seeds 0 1 2

Runs the recipe (what a new user gets under DP: ``RunConfig()`` defaults) with
``dp_recipe.fast_run`` (fedpriv's own split, calibration, Poisson sampling and Opacus, no
Flower) and records every hospital's update norm in every round. Prints, per dataset, the
measured norms (max, median) beside the bound ``fedpriv.protocols.secagg.max_norm`` derives
for the run (the largest over the hospitals), the old fixed range (10), and each hospital's
own bound. Public data only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from dp_recipe import fast_run

from fedpriv.config import RunConfig
from fedpriv.privacy.update_norm import run_update_bound
from fedpriv.protocols.secagg import max_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for dataset in args.datasets:
        norms: list[dict] = []
        accuracies = []
        started = time.perf_counter()
        for seed in args.seeds:
            config = RunConfig(
                dataset=dataset,
                hospitals=args.hospitals,
                epsilon=args.epsilon,
                seed=seed,
                aggregation="secagg",
            )
            accuracies.append(fast_run(config, norms))
        sizes = {f"h{r['hospital']}-s{i}": r["units"] for i, r in enumerate(norms)}
        parameters = norms[0]["parameters"]
        derived, source = max_norm(config, declared=sizes, parameters=parameters)
        own = [
            r["norm"] / run_update_bound(config, units=r["units"], parameters=parameters).total  # type: ignore[union-attr]
            for r in norms
        ]
        values = np.array([r["norm"] for r in norms])
        row = {
            "dataset": dataset,
            "recipe": {
                k: getattr(config, k) for k in ("rounds", "local_epochs", "batch_size", "lr")
            },
            "epsilon": args.epsilon,
            "seeds": args.seeds,
            "parameters": parameters,
            "hospital_units": sorted({r["units"] for r in norms}),
            "updates": int(values.size),
            "norm_max": round(float(values.max()), 3),
            "norm_median": round(float(np.median(values)), 3),
            "norm_min": round(float(values.min()), 3),
            "over_old_range_10": int((values > 10.0).sum()),
            "derived_range": round(derived, 3),
            "derived_from": source,
            "largest_norm_over_own_bound": round(max(own), 3),
            "accuracy_mean": round(float(np.mean(accuracies)), 4),
            "seconds": round(time.perf_counter() - started, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
