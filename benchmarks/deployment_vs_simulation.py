"""The same federation on Flower's deployment engine (real SuperLink + SuperNode processes
on this machine, TLS and SuperNode authentication) and in fedpriv's simulation.

    python benchmarks/deployment_vs_simulation.py --rounds 3 [--aggregation secagg]

Three hospitals hold breast-cancer's records 0,3,6.. / 1,4,7.. / 2,5,8..; both runs use DP
(epsilon 4), the same aggregation (CKKS by default) and the same recipe. The simulation gets
the same three sites through a CSV with a site column and --partition natural. Reports wall
time (submit to finish), round times, and the bytes the SuperLink counted over the wire.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.certs import init_certs  # noqa: E402
from fedpriv.config import RunConfig  # noqa: E402
from fedpriv.privacy.he import write_keys  # noqa: E402
from fedpriv.server.simulation import simulate  # noqa: E402
from tests.deployment.federation import Federation  # noqa: E402 - the tests' real-process harness

HOSPITALS = ("st-mary", "county", "university")


def make_data(base: Path) -> tuple[dict[str, Path], Path]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    header = [f"f{i}" for i in range(data.data.shape[1])]
    sites = {}
    with (base / "all-sites.csv").open("w", newline="") as combined:
        all_writer = csv.writer(combined)
        all_writer.writerow([*header, "site", "label"])
        for k, hospital in enumerate(HOSPITALS):
            path = base / f"{hospital}.csv"
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow([*header, "label"])
                for row, label in zip(data.data[k::3], data.target[k::3], strict=True):
                    writer.writerow([*row.tolist(), int(label)])
                    all_writer.writerow([*row.tolist(), hospital, int(label)])
            sites[hospital] = path
    return sites, base / "all-sites.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--aggregation", choices=("plain", "ckks", "secagg"), default="ckks")
    parser.add_argument("--no-simulation", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fedpriv-deploy-bench-"))
    init_certs(base / "certs", hosts=["localhost", "127.0.0.1"], hospitals=list(HOSPITALS))
    write_keys(base / "he")
    sites, combined = make_data(base)
    report: dict[str, Any] = {"rounds": args.rounds, "aggregation": args.aggregation}
    aggregation: dict[str, Any] = {"aggregation": args.aggregation}
    if args.aggregation == "ckks":
        aggregation["keys"] = str(base / "he")

    federation = Federation(base / "fed", base / "certs")
    try:
        t0 = time.perf_counter()
        federation.start_superlink()
        for hospital in HOSPITALS:
            federation.register(hospital)
            federation.start_supernode(
                hospital,
                {
                    "hospital-name": hospital,
                    "data-path": str(sites[hospital]),
                    "ledger-path": str(base / "ledgers" / f"{hospital}.sqlite"),
                    "device": "cpu",
                    "he-secret-context": str(base / "he" / "secret.ctx"),
                },
            )
        federation.wait_online(len(HOSPITALS), 120)
        report["deployment_startup_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_id = federation.submit(
            {
                "deployment": True,
                "hospitals": 3,
                "rounds": args.rounds,
                **aggregation,
                "out": str(base / "runs"),
                "run-name": "deployed",
            }
        )
        status = federation.wait_run(run_id, 1200)
        report["deployment_run_seconds"] = time.perf_counter() - t1
        report["deployment_status"] = status.get("status")
        report["network_traffic"] = status.get("network-traffic")
        rows = [
            json.loads(line)
            for line in (base / "runs" / "deployed" / "metrics.jsonl").read_text().splitlines()
        ]
        report["deployment_round_seconds"] = [r["seconds"] for r in rows]
        report["deployment_eval_accuracy"] = rows[-1]["eval_accuracy"]
    finally:
        federation.close()

    if not args.no_simulation:
        t2 = time.perf_counter()
        result = simulate(
            RunConfig(
                dataset=str(combined),
                partition="natural",
                hospitals=3,
                rounds=args.rounds,
                aggregation=args.aggregation,
                out=str(base / "runs"),
                run_name="simulated",
            )
        )
        report["simulation_seconds"] = time.perf_counter() - t2
        report["simulation_round_seconds"] = [r["seconds"] for r in result.rows]
        report["simulation_eval_accuracy"] = result.final["eval_accuracy"]
    traffic = report.get("network_traffic") or {}
    if traffic:
        report["bytes_per_round"] = traffic["total-bytes"] / args.rounds
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
