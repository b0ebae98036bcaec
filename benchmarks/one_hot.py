"""One-hot against ordinal encoding of a nominal column, with and without DP.

    python benchmarks/one_hot.py --seeds 0 1 2 --jsonl benchmarks/results/one_hot.jsonl

A generated table (public, drawn here): ``age`` and ``bp`` (numeric) and ``ward`` (6 codes)
whose effect on the label alternates in sign with the code, so no monotone function of the
code captures it, and ``bp`` carries nothing. Two schemas differ only in ``ward``'s
``encoding``; every other setting is the default a user gets (the DP recipe when DP is on,
epsilon 4, delta 1e-5 per hospital for the run; the MLP). Each arm of a seed uses the same
table, split and ``insecure-dp-seed``. Also printed: the Bayes accuracy of the generating
model and the best accuracy from ``age`` alone (what a model that learns nothing from ``ward``
can reach), expected over all the table's records, from the known generating probabilities.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.config import RunConfig
from fedpriv.server.simulation import simulate

#: each ward's shift of the label's log-odds: alternating in sign along the codes 1..6
WARD_EFFECT = np.array([1.5, -1.5, 1.0, -1.0, 1.5, -1.5])

SCHEMA = """name = "wards"
[[feature]]
name = "age"
kind = "numeric"
min = 0
max = 120
[[feature]]
name = "bp"
kind = "numeric"
min = 60
max = 220
[[feature]]
name = "ward"
kind = "categorical"
categories = [1, 2, 3, 4, 5, 6]
encoding = "{encoding}"
[[label]]
code = "0"
[[label]]
code = "1"
"""


def write_table(path: Path, records: int, seed: int) -> dict[str, float]:
    """The CSV, and the accuracies the generating model allows (over all its records)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, records).round()
    bp = rng.normal(130, 15, records).clip(60, 220).round()
    ward = rng.integers(1, 7, records)
    logit = (age - 55) / 15 + WARD_EFFECT[ward - 1]
    p = 1 / (1 + np.exp(-logit))
    label = (rng.uniform(size=records) < p).astype(int)
    rows = [
        f"p{i},{a:g},{b:g},{w},{y}"
        for i, (a, b, w, y) in enumerate(zip(age, bp, ward, label, strict=True))
    ]
    # a patient column: without one, identical records would be one patient to the ledger
    path.write_text("patient,age,bp,ward,label\n" + "\n".join(rows) + "\n")
    # age alone: P(y=1 | age) averages the wards' probabilities (uniform wards)
    p_age = np.mean(1 / (1 + np.exp(-((age[:, None] - 55) / 15 + WARD_EFFECT[None, :]))), axis=1)
    return {
        "bayes_accuracy": float(np.mean(np.maximum(p, 1 - p))),
        "age_only_accuracy": float(np.mean(np.maximum(p_age, 1 - p_age))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--encodings", nargs="+", default=["ordinal", "one-hot"])
    parser.add_argument("--dp", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--jsonl", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpriv-one-hot-"))
    for seed in args.seeds:
        table = work / f"wards-{seed}.csv"
        ceiling = write_table(table, args.records, seed)
        for dp in args.dp:
            for encoding in args.encodings:
                schema = work / f"schema-{encoding}.toml"
                schema.write_text(SCHEMA.format(encoding=encoding))
                config = RunConfig(
                    dataset=str(table),
                    patient_column="patient",
                    schema=str(schema),
                    hospitals=args.hospitals,
                    seed=seed,
                    dp=dp == "on",
                    insecure_dp_seed=seed if dp == "on" else -1,
                    out=tempfile.mkdtemp(prefix="run-", dir=work),
                )
                t0 = time.perf_counter()
                run = simulate(config)
                row: dict[str, Any] = {
                    "seed": seed,
                    "dp": dp,
                    "encoding": encoding,
                    "test_accuracy": run.final["test_accuracy"],
                    "eval_accuracy": run.final["eval_accuracy"],
                    "epsilon": max(run.rows[-1]["epsilon"].values()) if dp == "on" else None,
                    "seconds": round(time.perf_counter() - t0, 1),
                    **ceiling,
                }
                print(json.dumps(row), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as out:
                        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
