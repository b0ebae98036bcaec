"""Gradient inversion across protections, and what the attack costs beside a training round.

    python benchmarks/inversion.py --steps 500 --restarts 4 --records 3

For digits (8x8 CNN) and breast-cancer (MLP), 3 IID hospitals (the simulation's own split),
round 1 from the seed's initial model: the gradient-inversion audit
(:mod:`fedpriv.privacy.audit.inversion`) against FedSGD and FedAvg (3 local epochs: 3 local
steps at lr 0.1), batches of 1 to 32 records, no DP / sample-level DP-SGD (the noise each
hospital calibrates for epsilon 4 over 5 rounds; max-grad-norm 1) / client-level DP (clip 1,
noise multiplier 1), and plaintext / CKKS / secure aggregation. "server" attacks what the
server can read (one hospital's update in plaintext, also under client-level DP by a trusted
server; the 3 hospitals' aggregate under secure aggregation and CKKS), "model" the round's
new global model (after client-level noise). The attack's seconds per message are set beside
one hospital's real training round on its whole training split with the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.config import RunConfig
from fedpriv.data import split_for
from fedpriv.privacy.audit.base import AuditInputs, HospitalRecords, create_audit
from fedpriv.privacy.audit.inversion import replay_round
from fedpriv.server.prepare import resolve_model

FEDAVG = {"strategy": "fedavg", "local_epochs": 3}
FEDSGD = {"strategy": "fedsgd"}
NO_DP = {"dp": False}
SAMPLE = {"dp": True, "dp_level": "sample", "epsilon": 4.0, "rounds": 5}
CLIENT = {"dp": True, "dp_level": "client", "client_noise_multiplier": 1.0}


def matrix(batches: list[int]) -> list[tuple[str, dict[str, Any], int, str]]:
    """(label, settings, batch, view) of every row, per dataset."""
    rows: list[tuple[str, dict[str, Any], int, str]] = []
    for b in batches:
        rows.append(("no DP, plaintext, FedSGD", {**NO_DP, **FEDSGD}, b, "server"))
    for b in batches[:2]:
        rows.append(("no DP, plaintext, FedAvg", {**NO_DP, **FEDAVG}, b, "server"))
    for strategy, name in ((FEDSGD, "FedSGD"), (FEDAVG, "FedAvg")):
        rows.append((f"sample DP, plaintext, {name}", {**SAMPLE, **strategy}, 1, "server"))
    rows.append(("client DP, plaintext, FedAvg", {**CLIENT, **FEDAVG}, 1, "server"))
    rows.append(("client DP, plaintext, FedAvg", {**CLIENT, **FEDAVG}, 1, "model"))
    for aggregation in ("secagg", "ckks"):
        for strategy, name in ((FEDSGD, "FedSGD"), (FEDAVG, "FedAvg")):
            rows.append(
                (
                    f"no DP, {aggregation}, {name}",
                    {**NO_DP, **strategy, "aggregation": aggregation},
                    1,
                    "server",
                )
            )
        rows.append(
            (
                f"sample DP, {aggregation}, FedAvg",
                {**SAMPLE, **FEDAVG, "aggregation": aggregation, "secagg_max_norm": 1e4},
                1,
                "server",
            )
        )
    rows.append(
        ("client DP, secagg, FedAvg", {**CLIENT, **FEDAVG, "aggregation": "secagg"}, 1, "server")
    )
    return rows


def run_row(
    dataset_name: str, settings: dict[str, Any], batch: int, view: str, args: argparse.Namespace
) -> dict[str, Any]:
    config = RunConfig(dataset=dataset_name, hospitals=3, seed=0, **settings)
    dataset, split = split_for(config)
    model_name, model_args = resolve_model(config, dataset)
    alone = view == "server" and config.protocol in ("plain", "client-dp")
    mapping = config.to_mapping()
    mapping["model"], mapping["model-args"] = model_name, model_args
    inputs = AuditInputs(
        run_dir=Path("."),
        config=mapping,
        dataset=dataset,
        hospitals=tuple(HospitalRecords(h.name, h.train, h.held_out) for h in split.hospitals),
        population=split.test,
        options={
            "inversion_batch": batch,
            # one update: --records records (at least one message); an aggregate: one message
            "inversion_records": max(args.records, batch) if alone else 3 * batch,
            "inversion_steps": args.steps,
            "inversion_restarts": args.restarts,
            "inversion_view": view,
        },
        seed=0,
    )
    result = create_audit("inversion").run(inputs)
    entry = result.to_json()
    # one hospital's real round on its whole training split, same settings (plaintext: the
    # protocol's own cost is not the hospital's training)
    # (the fastest of three: the first call pays for imports and caches, and the machine is
    # shared)
    first = split.hospitals[0]
    times = []
    for repeat in range(3):
        whole = replay_round(
            config.replace(aggregation="plain", he=False),
            model_name,
            model_args,
            dataset,
            [(first.name, 0, first.train)],
            seed=repeat,
        )
        times.append(whole.round_seconds if not isinstance(whole, str) else math.nan)
    round_seconds = min(times)
    messages = entry["messages"] - len(entry["failures"])
    return {
        "entry": entry,
        "round_seconds": round_seconds,
        "attack_seconds_per_message": entry["seconds"]["attack"] / max(1, messages),
        "first_hospital_records": int(first.train.size),
    }


def fmt_row(
    dataset: str, label: str, batch: int, view: str, out: dict[str, Any], args: argparse.Namespace
) -> str:
    e = out["entry"]
    if e["kind"] == "image":
        attack = f"{e['psnr']:.1f} dB / {e['ssim']:.3f}"
        b = e["baseline"]
        base = f"{b['psnr']:.1f} dB / {b['ssim']:.3f} ({b['kind']})"
    else:
        attack = f"MSE {e['mse']:.3g}"
        base = f"MSE {e['baseline']['mse']:.3g} ({e['baseline']['kind']})"
    seen = (
        "one update"
        if e["view"] == "server" and e["protocol"] in ("plain", "client-dp")
        else (f"aggregate of {e['hospitals_per_message']}")
    )
    ratio = out["attack_seconds_per_message"] / out["round_seconds"]
    return (
        f"| {dataset} | {label} | {batch} | {e['view']}: {seen} | {e['records']} | {attack} | "
        f"{base} | {e['leaked_records']}/{e['records']} | {e['verdict']} | "
        f"{out['attack_seconds_per_message']:.1f} | {out['round_seconds']:.2g} | {ratio:.0f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "breast-cancer"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument(
        "--records", type=int, default=3, help="records attacked per row of one-update rows"
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"attack: {args.steps} steps x {args.restarts} restarts per message; "
        f"{args.records} records per one-update row (at least one message), one message per "
        "aggregate row\n"
    )
    print(
        "| dataset | protection | batch | attacked | records | attack PSNR / SSIM (MSE) | "
        "baseline | leaked | verdict | attack s / message | training round s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for dataset in args.datasets:
        for label, settings, batch, view in matrix(args.batches):
            out = run_row(dataset, settings, batch, view, args)
            print(fmt_row(dataset, label, batch, view, out, args), flush=True)
            entry = out["entry"]
            entry.pop("images", None)
            results.append({"dataset": dataset, "label": label, "batch": batch, **out})
    print(f"\ntotal: {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=_plain), encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    main()
