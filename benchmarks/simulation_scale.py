"""Seconds per round and per hospital task in simulation, at 100 to 3,000 hospitals.

    python benchmarks/simulation_scale.py --hospitals 100 1000 --rounds 3

A synthetic CSV (200,000 rows, 20 numeric features, 2 classes, a learnable linear rule plus
noise) split IID over the hospitals; fedpriv's defaults otherwise (MLP, 1 local epoch, batch
32), DP off. For each size: start-up (call to the end of round 1, minus one steady round),
seconds per round (median of rounds 2..N), and per hospital task (a round's seconds over its
hospitals). "Work" is the same training and held-out evaluation in one plain loop (no Flower),
timed on a sample of hospitals and scaled: the framework's cost per task is
(round seconds - work) / hospitals; the simulation runs two workers on 2 shared cores, the
plain loop one process, so this over-counts nothing that parallel workers would hide.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.config import RunConfig  # noqa: E402
from fedpriv.server.simulation import simulate  # noqa: E402

ROWS = 200_000
FEATURES = 20


def make_csv(path: Path, rows: int = ROWS) -> Path:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    rule = rng.normal(size=FEATURES)
    labels = (features @ rule + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"f{i}" for i in range(FEATURES)), "label"])
        for row, label in zip(features.round(4).tolist(), labels.tolist(), strict=True):
            writer.writerow([*row, label])
    return path


def plain_work(config: RunConfig, sample: int) -> float:
    """Seconds one hospital's train + held-out evaluation take in a plain loop (mean of a
    sample of hospitals)."""
    import torch

    from fedpriv.data import split_for
    from fedpriv.models import build
    from fedpriv.server.run import initial_weights, resolve_model
    from fedpriv.training import evaluate, make_loader, set_weights, train

    torch.set_num_threads(1)
    dataset, split = split_for(config)
    name, args = resolve_model(config, dataset)
    weights = initial_weights(name, args, config.seed)
    started = time.perf_counter()
    hospitals = split.hospitals[:sample]
    for hospital in hospitals:
        model = build(name, **args)
        set_weights(model, weights)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        loader = make_loader(
            dataset.features[hospital.train],
            dataset.labels[hospital.train],
            batch_size=config.batch_size,
            shuffle=True,
        )
        train(
            model,
            loader,
            optimizer=optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            device=torch.device("cpu"),
            epochs=config.local_epochs,
        )
        held = make_loader(
            dataset.features[hospital.held_out],
            dataset.labels[hospital.held_out],
            batch_size=1024,
            shuffle=False,
        )
        evaluate(model, held, criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu"))
    return (time.perf_counter() - started) / len(hospitals)


def run_size(csv_path: Path, hospitals: int, rounds: int, out: Path) -> dict[str, Any]:
    config = RunConfig(
        dataset=str(csv_path),
        hospitals=hospitals,
        rounds=rounds,
        dp=False,
        out=str(out),
        run_name=f"h{hospitals}",
        min_hospitals=1,
    )
    marks: list[float] = []
    wall_started = time.time()
    started = time.perf_counter()
    result = simulate(config, on_round=lambda row: marks.append(time.perf_counter()))
    total = time.perf_counter() - started
    phases = startup_phases(result.run_dir / "flower.log", wall_started)
    seconds = [float(r["seconds"]) for r in result.rows]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    work = plain_work(config, sample=min(hospitals, 50))
    return {
        "hospitals": hospitals,
        "round_seconds": [round(s, 2) for s in seconds],
        "seconds_per_round": round(steady, 2),
        "ms_per_hospital_task": round(1000 * steady / hospitals, 1),
        "work_ms_per_hospital": round(1000 * work, 1),
        "framework_ms_per_hospital_task": round(1000 * (steady / hospitals - work), 1),
        "startup_seconds": round(marks[0] - started - steady, 1),
        "startup_phases": phases,
        "run_seconds": round(total, 1),
    }


#: flower.log lines that mark start-up's phases, and the phase each one ends (Ray's, or the
#: forked workers' of fedpriv/server/workers.py, the default without a GPU)
PHASE_MARKS = {
    "prepare (data, split, checks)": "fedpriv.server.simulation: run directory:",
    "until Ray starts initialising": "flwr: Initialising: RayBackend",
    "Ray start and actors": "flwr: Constructed ActorPool",
    "forked workers ready": "fedpriv.server.workers: hospital workers ready",
}


def startup_phases(log: Path, wall_started: float) -> dict[str, float]:
    """Seconds from the call to each mark in flower.log, then between marks; the first
    round's replies come after the last (the workers import and load their data then)."""
    import datetime

    seen: dict[str, float] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        for phase, mark in PHASE_MARKS.items():
            if phase not in seen and mark in line:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                seen[phase] = stamp.timestamp()
    out: dict[str, float] = {}
    last = wall_started
    for phase in PHASE_MARKS:
        if phase in seen:
            out[phase] = round(seen[phase] - last, 2)
            last = seen[phase]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fedpriv-scale-"))
    csv_path = make_csv(base / "synthetic.csv")
    report = [run_size(csv_path, n, args.rounds, base / "runs") for n in args.hospitals]
    for entry in report:
        print(json.dumps(entry), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
