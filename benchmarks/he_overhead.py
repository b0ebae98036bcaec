"""What does CKKS aggregation cost? Encryption, server sum, decryption, bytes, round time.

    python benchmarks/he_overhead.py                       # 10k, 100k, 1M parameters, 10 hospitals
    python benchmarks/he_overhead.py --skip-simulation

(a) Micro-benchmark on real model weights (the MLP at widths 85, 300 and 984): each of 10
hospitals encrypts (n_k/1000) * w_k and serializes it; the server (public context only)
deserializes, adds and serializes the sum; a hospital decrypts and divides.
(b) Whole rounds: the same 10-hospital simulation (breast-cancer, DP off) with and without
--he at 100k parameters; steady-state round time is the median of rounds 2..N.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedpriv.models import initial_state
from fedpriv.privacy.he import (
    PUBLIC_FILE,
    SECRET_FILE,
    Layout,
    decrypt_sum,
    encrypt_contribution,
    load_context,
    write_keys,
)
from fedpriv.protocols.checks import Limits
from fedpriv.protocols.ckks import (
    CIPHERTEXT,
    FINGERPRINT,
    TOTAL,
    CkksServer,
    ciphertext_array,
    ciphertext_bytes,
    encode_text,
)
from fedpriv.strategies import Contribution

WIDTHS = {"10k": 85, "100k": 300, "1M": 984}


def micro(width: int, hospitals: int, keys: Path, repeats: int) -> dict[str, Any]:
    secret = load_context(keys / SECRET_FILE, role="hospital")
    server = load_context(keys / PUBLIC_FILE, role="server")
    weights = initial_state("mlp", 0, in_features=30, num_classes=2, hidden=width)
    layout = Layout.of(weights)
    rng = np.random.default_rng(0)
    vectors = [layout.flatten(weights) + rng.normal(0, 0.01, layout.size) for _ in range(hospitals)]
    counts = [int(c) for c in rng.integers(30, 300, hospitals)]
    encrypt_times, sizes, contributions = [], [], []
    for vector, count in zip(vectors, counts, strict=True):
        t0 = time.perf_counter()
        blob = encrypt_contribution(secret, vector, count)
        encrypt_times.append(time.perf_counter() - t0)
        sizes.append(len(blob))
        contributions.append(
            Contribution(
                "h",
                ArrayRecord(
                    {
                        CIPHERTEXT: ciphertext_array(blob),
                        FINGERPRINT: encode_text(secret.fingerprint),
                    }
                ),
                count,
            )
        )
    aggregate_times = []
    for _ in range(repeats):
        aggregator = CkksServer(context=server, length=layout.size, limits=Limits())
        t0 = time.perf_counter()
        result = aggregator.aggregate(contributions)
        aggregate_times.append(time.perf_counter() - t0)
    assert result is not None
    decrypt_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mean = decrypt_sum(
            secret,
            ciphertext_bytes(result[CIPHERTEXT]),
            length=layout.size,
            total_examples=int(result[TOTAL].numpy()[0]),
        )
        decrypt_times.append(time.perf_counter() - t0)
    expected = np.average(np.stack(vectors), axis=0, weights=counts)
    aggregate = statistics.median(aggregate_times)
    millions = layout.size / 1e6
    return {
        "parameters": layout.size,
        "hospitals": hospitals,
        "encrypt_seconds": statistics.median(encrypt_times),
        "encrypt_params_per_second": layout.size / statistics.median(encrypt_times),
        "bytes_up_per_param": statistics.mean(sizes) / layout.size,
        "ratio_to_float32": statistics.mean(sizes) / layout.size / 4,
        "server_aggregate_seconds": aggregate,
        "server_seconds_per_hospital_per_1M": aggregate / hospitals / millions,
        "decrypt_seconds": statistics.median(decrypt_times),
        "max_abs_error": float(np.max(np.abs(mean - expected))),
    }


def rounds(he: bool, width: int, hospitals: int, count: int) -> dict[str, Any]:
    from fedpriv.config import RunConfig
    from fedpriv.server.simulation import simulate

    ends: list[float] = []
    config = RunConfig(
        dataset="breast-cancer",
        hospitals=hospitals,
        rounds=count,
        model_width=width,
        dp=False,
        he=he,
        out=tempfile.mkdtemp(prefix="fedpriv-he-"),
    )
    simulate(config, on_round=lambda row: ends.append(time.perf_counter()))
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    return {"he": he, "round_seconds": gaps, "steady_round_seconds": statistics.median(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    keys = Path(tempfile.mkdtemp(prefix="fedpriv-keys-"))
    write_keys(keys, overwrite=True)
    report: dict[str, Any] = {"machine": platform.platform(), "micro": {}}
    for label, width in WIDTHS.items():
        report["micro"][label] = micro(width, args.hospitals, keys, args.repeats)
        print(label, json.dumps(report["micro"][label]), flush=True)
    if not args.skip_simulation:
        plain = rounds(False, WIDTHS["100k"], args.hospitals, args.rounds)
        encrypted = rounds(True, WIDTHS["100k"], args.hospitals, args.rounds)
        report["rounds_100k"] = {
            "plaintext": plain,
            "encrypted": encrypted,
            "ratio": encrypted["steady_round_seconds"] / plain["steady_round_seconds"],
        }
        print("rounds", json.dumps(report["rounds_100k"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
