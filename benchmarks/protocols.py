"""What each aggregation protocol costs: upload, hospital and server CPU, round time.

    python benchmarks/protocols.py cost --sizes 10000 100000 1000000 --hospitals 10
    python benchmarks/protocols.py rounds --hospitals 10 --width 300 --rounds 4

``cost`` runs each protocol's two sides in one process (fedpriv.protocols.local, the
exchanges without Flower): 10 hospitals, a model of SIZE float32 parameters split into two
arrays, random updates of norm ~1; per round the bytes a hospital uploads per parameter (what the
server receives), a hospital's encode time (mean), the server's aggregate (+ unmasking) time,
and the one-time setup (secure aggregation's key agreement and share exchange, run in one
process: the sum of all hospitals' and the server's work). Median of ``--repeats`` rounds.

``rounds`` runs real Flower simulations (10 hospitals, breast-cancer, the MLP widened to
``--width`` so it has ~100k parameters, no DP, so the protocol is what differs) and reports the
median seconds of the rounds between the first (start-up) and the last (which, under secure
aggregation, also carries the final model's evaluation exchange, once per run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOLS = ("plain", "ckks", "secagg")


def _config(name: str, keys: Path) -> Any:
    from fedpriv.config import RunConfig

    extra: dict[str, Any] = {}
    if name == "ckks":
        extra = {"he": True, "keys": str(keys)}
    if name == "secagg":
        extra = {"aggregation": "secagg"}
    return RunConfig(dp=False, rounds=100, out=str(keys.parent), run_name="bench", **extra)


def cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    from fedpriv.privacy.he import write_keys
    from fedpriv.protocols.local import LocalFederation

    keys = Path(tempfile.mkdtemp(prefix="fedpriv-protocols-")) / "keys"
    write_keys(keys)
    nodes = list(range(101, 101 + args.hospitals))
    rng = np.random.default_rng(0)
    results = []
    for size in args.sizes:
        half = size // 2
        model = {
            "a": np.zeros(half, dtype=np.float32),
            "b": np.zeros(size - half, dtype=np.float32),
        }
        updates = {
            n: {
                k: rng.normal(0, 1 / np.sqrt(size), v.shape).astype(np.float32)
                for k, v in model.items()
            }
            for n in nodes
        }
        for name in PROTOCOLS:
            started = time.perf_counter()
            federation = LocalFederation(
                _config(name, keys), nodes, model, counts={n: 100 + n for n in nodes}
            )
            setup = time.perf_counter() - started
            encode, server, upload = [], [], []
            for r in range(1, args.repeats + 1):
                t0 = time.perf_counter()
                records = [federation.encode(n, r, updates[n]) for n in nodes]
                encode.append((time.perf_counter() - t0) / len(nodes))
                upload.append(
                    sum(len(a.data) for rec in records for a in rec.values()) / len(nodes) / size
                )
                federation.received.clear()
                t0 = time.perf_counter()
                result = _aggregate_only(federation, r, records)
                server.append(time.perf_counter() - t0)
                assert result is not None, federation.server.failure
            row = {
                "protocol": name,
                "parameters": size,
                "hospitals": len(nodes),
                "upload_bytes_per_param": round(statistics.median(upload), 3),
                "upload_vs_float32": round(statistics.median(upload) / 4, 3),
                "hospital_encode_seconds": round(statistics.median(encode), 4),
                "server_round_seconds": round(statistics.median(server), 4),
                "setup_seconds": round(setup, 3),
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return results


def _aggregate_only(federation: Any, server_round: int, records: list[Any]) -> Any:
    """The server's part of a round (and the hospitals' unmasking answers, for secagg)."""
    import json as _json

    from flwr.app import Array, ArrayRecord

    from fedpriv.protocols.base import Contribution

    reference = ArrayRecord({k: Array(v) for k, v in federation.model.items()})
    federation.server.expect(federation.nodes)
    contributions = [
        Contribution(federation.name(n), record, federation.counts[n], n)
        for n, record in zip(federation.nodes, records, strict=True)
    ]
    result = federation.server.aggregate(
        contributions, reference=reference, gradient=False, server_round=server_round
    )
    if not federation.server.completes_on_evaluate:
        return result
    from fedpriv.protocols.secagg import UNMASK

    request = _json.loads(str(federation.server.evaluate_extra()[UNMASK]))
    replies = {
        n: federation.sides[n].unmask(request, n, federation.states[n]) for n in federation.nodes
    }
    return federation.server.complete(replies)


def rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    import fedpriv
    from fedpriv.config import RunConfig

    out = Path(tempfile.mkdtemp(prefix="fedpriv-protocol-rounds-"))
    results = []
    for name in PROTOCOLS:
        extra: dict[str, Any] = {}
        if name == "ckks":
            extra = {"he": True}
        if name == "secagg":
            extra = {"aggregation": "secagg"}
        config = RunConfig(
            dataset="breast-cancer",
            hospitals=args.hospitals,
            rounds=args.rounds,
            dp=False,
            model_width=args.width,
            out=str(out),
            run_name=name,
            **extra,
        )
        result = fedpriv.simulate(config)
        # not the first round (start-up) nor the last (secure aggregation adds the final
        # model's evaluation exchange there, once per run)
        seconds = [row["seconds"] for row in result.rows[1:-1]]
        row = {
            "protocol": name,
            "hospitals": args.hospitals,
            "parameters": result.rows[0]["aggregation"]["parameters"],
            "round_seconds_median": round(statistics.median(seconds), 3),
            "round_seconds": seconds,
            "test_accuracy": result.final.get("test_accuracy"),
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    plain = results[0]["round_seconds_median"]
    for row in results:
        row["vs_plain"] = round(row["round_seconds_median"] / plain, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("cost")
    one.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    one.add_argument("--hospitals", type=int, default=10)
    one.add_argument("--repeats", type=int, default=3)
    two = sub.add_parser("rounds")
    two.add_argument("--hospitals", type=int, default=10)
    two.add_argument("--width", type=int, default=300)
    two.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    result = cost(args) if args.what == "cost" else rounds(args)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "result": result,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
