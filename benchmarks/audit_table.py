"""Attack metrics at several epsilons and without DP, and what an audit costs.

    python benchmarks/audit_table.py --epsilons 1 4 8 --reference-models 4 8

5 hospitals, 20 rounds, held-out fraction 0.5 (so there are enough non-members to resolve a
1 % FPR); each run is audited with every attack at each K. Audit time is reported beside the
training run it audits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fedpriv.config import RunConfig
from fedpriv.privacy.audit import DEFAULT_ATTACKS, audit_run
from fedpriv.server.simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--reference-models", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for epsilon in [*args.epsilons, None]:
            values: dict[str, Any] = {
                "dataset": dataset,
                "hospitals": 5,
                "rounds": args.rounds,
                "held-out-fraction": 0.5,
                "out": tempfile.mkdtemp(prefix="fedpriv-audit-"),
            }
            if epsilon is None:
                values["dp"] = False
            else:
                values["epsilon"] = epsilon
            t0 = time.perf_counter()
            run = simulate(RunConfig.from_mapping(values))
            training = time.perf_counter() - t0
            for k in args.reference_models:
                audit = audit_run(run.run_dir, attacks=DEFAULT_ATTACKS, reference_models=k)
                for name, entry in audit["attacks"].items():
                    row = {
                        "dataset": dataset,
                        "epsilon": epsilon,
                        "accounted": audit["accounted_epsilon_max"],
                        "K": k,
                        "attack": name,
                        "auc": entry["auc"],
                        "auc_ci": entry["auc_ci"],
                        "tpr@1%": entry["tpr_at_fpr"]["0.01"],
                        "tpr@0.1%": entry["tpr_at_fpr"]["0.001"],
                        "eps_lb_cp": entry["epsilon_lower_bound"],
                        "eps_lb_gdp": entry["epsilon_lower_bound_gdp"],
                        "test_accuracy": run.final["test_accuracy"],
                        "training_seconds": round(training, 1),
                        "reference_seconds": round(
                            audit["seconds"].get("reference_models", 0.0), 1
                        ),
                        "attack_seconds": round(audit["seconds"][name], 2),
                        "non_members": audit["non_members"],
                        "verdict": audit["verdict"],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
