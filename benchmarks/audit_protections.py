"""Every attack against every protection, and what each attack costs beside training.

    python benchmarks/audit_protections.py --datasets breast-cancer digits --rounds 10

For each dataset and protection (no DP, sample-level DP at epsilon 4, client-level DP;
plaintext, CKKS, secure aggregation) one real simulation is trained and audited from its run
directory with every attack the run allows. Printed: per attack its headline figure beside
its no-information baseline and verdict, and its seconds as a share of the training run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fedpriv.config import RunConfig
from fedpriv.privacy.audit import audit_run
from fedpriv.server.simulation import simulate

PROTECTIONS: dict[str, dict[str, Any]] = {
    "no DP, plaintext": {"dp": False},
    "sample DP eps 4, plaintext": {"epsilon": 4.0},
    "client DP, plaintext": {"dp-level": "client", "client-noise-multiplier": 1.0},
    "sample DP eps 4, CKKS": {"epsilon": 4.0, "aggregation": "ckks"},
    "sample DP eps 4, secagg": {"epsilon": 4.0, "aggregation": "secagg"},
}


def headline(name: str, entry: dict[str, Any]) -> tuple[str, str]:
    """The attack's figure and its baseline's, as text."""
    if "auc" in entry:
        return (
            f"AUC {entry['auc']:.3f} [{entry['auc_ci'][0]:.3f}, {entry['auc_ci'][1]:.3f}]",
            "0.500",
        )
    if name == "attribute":
        adv = entry["advantage"]["members"]
        return (
            f"acc {entry['members']['accuracy']:.3f}, adv {100 * adv['value']:+.1f} pts "
            f"[{100 * adv['ci'][0]:+.1f}, {100 * adv['ci'][1]:+.1f}]",
            f"imputation {entry['baseline']['members']['accuracy']:.3f}",
        )
    for key in ("psnr", "mse"):
        if key in entry and isinstance(entry[key], int | float):
            return f"{key.upper()} {entry[key]:.2f}", f"{entry['baseline'][key]:.2f}"
    return "-", "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--protections", nargs="+", default=list(PROTECTIONS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reference-models", type=int, default=4)
    parser.add_argument("--inversion-records", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    print(
        "| dataset | protection | test acc. | attack | result | baseline | verdict "
        "| attack s (% of training) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets:
        for protection in args.protections:
            values: dict[str, Any] = {
                "dataset": dataset,
                "hospitals": 3,
                "rounds": args.rounds,
                "held-out-fraction": 0.5,
                "out": tempfile.mkdtemp(prefix="fedpriv-protections-"),
                **PROTECTIONS[protection],
            }
            t0 = time.perf_counter()
            run = simulate(RunConfig.from_mapping(values))
            training = time.perf_counter() - t0
            audit = audit_run(
                run.run_dir,
                reference_models=args.reference_models,
                options={"inversion_records": args.inversion_records},
            )
            accuracy = run.final.get("test_accuracy")
            seconds = audit["seconds"]
            for name, entry in audit["attacks"].items():
                result, baseline = headline(name, entry)
                cost = seconds.get(name, 0.0) + (
                    seconds.get("reference_models", 0.0)
                    if "auc" in entry and name != "loss"
                    else 0.0
                )
                row = {
                    "dataset": dataset,
                    "protection": protection,
                    "test_accuracy": accuracy,
                    "attack": name,
                    "result": result,
                    "baseline": baseline,
                    "verdict": entry.get("verdict"),
                    "attack_seconds": cost,
                    "training_seconds": training,
                }
                rows.append(row)
                print(
                    f"| {dataset} | {protection} | {accuracy:.3f} | {name} | {result} | {baseline} "
                    f"| {entry.get('verdict')} | {cost:.1f} ({100 * cost / training:.0f} %) |",
                    flush=True,
                )
            for name, reason in audit["skipped"].items():
                print(f"| {dataset} | {protection} | | {name} | not run: {reason} | | | |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
