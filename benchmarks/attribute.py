"""Attribute inference across protections: how much better than imputation does the model guess
a hidden column, for patients it trained on and patients it never saw?

    python benchmarks/attribute.py --protections none sample client --rounds 10

Each row is a real simulated federation (``fedpriv.server.simulation.simulate``) audited from its
run directory alone, as an outside auditor would: breast-cancer (the hidden column is the
audit's default, the one most correlated with the diagnosis, split at the population median)
and a generated ward CSV whose ``diagnosis`` column holds integer category codes (the CSV
loader takes numbers only) that depend on age, BMI and the label. CKKS and secure aggregation
are not rows: they protect the updates in transit and leave the final model, which is all this
attack uses, unchanged.
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
from fedpriv.data import load_dataset
from fedpriv.models import build
from fedpriv.privacy.audit.base import AuditInputs, HospitalRecords, create_audit
from fedpriv.server.rundir import RunDirectory
from fedpriv.server.simulation import simulate

PROTECTIONS: dict[str, dict[str, Any]] = {
    "none": {"dp": False},
    "sample": {"dp": True, "dp-level": "sample"},
    "client": {"dp": True, "dp-level": "client"},
}


def write_ward_csv(path: Path, records: int, seed: int) -> Path:
    """A ward's records: the diagnosis code (0-3) follows age and BMI, the label follows both."""
    rng = np.random.default_rng(seed)
    age = rng.normal(60, 12, records)
    bmi = rng.normal(27, 4, records)
    bp = rng.normal(125, 15, records)
    score = (age - 60) / 12 + (bmi - 27) / 4 + rng.normal(0, 1, records)
    diagnosis = np.digitize(score, [-1.0, 0.0, 1.0])
    label = (0.8 * diagnosis + 0.02 * (bp - 125) + rng.normal(0, 1, records) > 1.5).astype(int)
    lines = ["age,bmi,bp,diagnosis,label"]
    lines += [
        f"{a:.1f},{b:.1f},{p:.0f},{d},{y}"
        for a, b, p, d, y in zip(age, bmi, bp, diagnosis, label, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def audit_inputs(run_dir: Path, options: dict[str, Any], seed: int) -> AuditInputs:
    """What an outside auditor rebuilds from the run directory."""
    run = RunDirectory.open(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    split = run.read_partitions()
    dataset = load_dataset(str(config["dataset"]))
    model = build(str(config["model"]), **dict(config["model-args"]))
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    hospitals = tuple(
        HospitalRecords(h.name, np.asarray(h.train), np.asarray(h.held_out))
        for h in split.hospitals
    )
    return AuditInputs(
        run_dir=run_dir,
        config=config,
        model=model.eval(),
        dataset=dataset,
        hospitals=hospitals,
        population=np.asarray(split.test),
        options=options,
        seed=seed,
    )


def _cell(entry: dict[str, Any]) -> str:
    low, high = entry["ci"]
    return f"{100 * entry['value']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "ward-csv"])
    parser.add_argument("--protections", nargs="+", default=list(PROTECTIONS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--model-width", type=int, default=0, help="MLP hidden size (0: default)")
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--client-noise-multiplier", type=float, default=0.5)
    parser.add_argument(
        "--cancer-feature",
        default=None,
        help="breast-cancer's hidden column (default: the audit's)",
    )
    parser.add_argument("--csv-records", type=int, default=1500)
    parser.add_argument("--attribute-records", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fedpriv-attribute-"))
    ward = write_ward_csv(workdir / "ward.csv", args.csv_records, args.seed)
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        spec, feature = (
            (str(ward), "diagnosis") if name == "ward-csv" else (name, args.cancer_feature)
        )
        for protection in args.protections:
            values: dict[str, Any] = {
                "dataset": spec,
                "hospitals": args.hospitals,
                "rounds": args.rounds,
                "local-epochs": args.local_epochs,
                "model-width": args.model_width,
                "held-out-fraction": 0.5,
                "epsilon": args.epsilon,
                "client-noise-multiplier": args.client_noise_multiplier,
                "seed": args.seed,
                "out": str(workdir),
                "run-name": f"{name}-{protection}-{feature or 'default'}".replace(" ", "_"),
                **PROTECTIONS[protection],
            }
            t0 = time.perf_counter()
            run = simulate(RunConfig.from_mapping(values))
            training = time.perf_counter() - t0
            t1 = time.perf_counter()
            options = {
                "sensitive_feature": feature,
                "attribute_records": args.attribute_records,
            }
            result = create_audit("attribute").run(audit_inputs(run.run_dir, options, args.seed))
            row = {
                "dataset": name,
                "protection": protection,
                "feature": result.details["sensitive_feature"]["name"],
                "encoding": result.details["sensitive_feature"]["encoding"],
                "test_accuracy": run.final.get("test_accuracy"),
                "attack_members": result.metrics["members"]["accuracy"],
                "attack_non_members": result.metrics["non_members"]["accuracy"],
                "imputation_members": result.baseline["members"]["accuracy"],
                "imputation_non_members": result.baseline["non_members"]["accuracy"],
                "advantage": result.details["advantage"],
                "records": result.details["records"],
                "verdict": result.verdict,
                "finding": result.details["finding"],
                "training_seconds": round(training, 1),
                "audit_seconds": round(time.perf_counter() - t1, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| dataset | hidden column | protection | test acc | attack acc (members / non) "
        "| imputation acc (members / non) | advantage members, pts [95% CI] "
        "| advantage non-members | verdict | train s | audit s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        accuracy = r["test_accuracy"]
        print(
            f"| {r['dataset']} | {r['feature']} ({r['encoding']}) | {r['protection']} "
            f"| {accuracy:.3f} | {r['attack_members']:.3f} / {r['attack_non_members']:.3f} "
            f"| {r['imputation_members']:.3f} / {r['imputation_non_members']:.3f} "
            f"| {_cell(r['advantage']['members'])} | {_cell(r['advantage']['non_members'])} "
            f"| {r['verdict']} ({r['finding']}) | {r['training_seconds']} "
            f"| {r['audit_seconds']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
