"""A deployment round against Flower's own floor, on the same real federation.

    python benchmarks/deployment_floor.py --rounds 6 [--only floor fedpriv fedpriv-dp ...]

One SuperLink (TLS, SuperNode authentication) and three SuperNodes on 127.0.0.1, as the
deployment tests start them (tests/deployment/federation.py). On it, in turn:

- ``floor``: benchmarks/floor/, a ClientApp that returns its input and a ServerApp that sends
  the model's number of float32 values to every hospital and waits with Flower's
  ``Grid.send_and_receive`` (a pull every 3 s), one exchange per round;
- ``floor-poll``: the same with the server pulling every 0.1 s (what fedpriv's server does);
- ``fedpriv``: fedpriv's deployment run, plaintext aggregation, no DP;
- ``fedpriv-dp``: the same with DP (epsilon 4);
- ``fedpriv-ckks``: CKKS homomorphic aggregation, no DP (one exchange a round: the hospitals
  check each decrypted aggregate when the next order brings it);
- ``fedpriv-secagg``: secure aggregation (masking, threshold 2 of 3), no DP (its set-up
  queries, then one exchange a round while every hospital answers);
- ``fedpriv-secagg-two``: the same with ``secagg-one-exchange = false``: two exchanges a
  round, unmasking on the evaluation exchange (drop-outs recovered within the round).

Seconds per round are the median of rounds 2..N (round 1 carries one-off costs); start-up is
submit to the end of round 1 minus one steady round; bytes are what the SuperLink counted
for the whole run, divided by the rounds. The SuperNodes' 3 s poll is Flower's and stays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from deployment_vs_simulation import HOSPITALS, make_data  # noqa: E402 - a sibling script

from fedpriv.certs import init_certs  # noqa: E402
from tests.deployment.federation import CONNECTION, Federation, key_values  # noqa: E402

FLOOR_APP = ROOT / "benchmarks" / "floor"
VARIANTS = (
    "floor",
    "floor-poll",
    "fedpriv",
    "fedpriv-dp",
    "fedpriv-ckks",
    "fedpriv-secagg",
    "fedpriv-secagg-two",
)
#: run-config of each fedpriv variant beyond the plain one (CKKS and secure aggregation are
#: measured with DP off, so the protocol's own cost shows)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "fedpriv": {},
    "fedpriv-dp": {"dp": True},
    "fedpriv-ckks": {"he": True},
    "fedpriv-secagg": {"aggregation": "secagg", "secagg-threshold": 2},
    "fedpriv-secagg-two": {
        "aggregation": "secagg",
        "secagg-threshold": 2,
        "secagg-one-exchange": False,
    },
}


def _submit(federation: Federation, app: Path, run_config: dict[str, Any]) -> int:
    result = federation.flwr(
        "run", str(app), CONNECTION, "--format", "json", "--run-config", key_values(run_config)
    )
    reply = json.loads(result.stdout)
    if not reply.get("success"):
        raise RuntimeError(f"flwr run failed: {reply} {result.stderr}")
    return int(reply["run-id"])


def _summary(seconds: list[float], total: float, traffic: dict[str, Any] | None) -> dict[str, Any]:
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    out: dict[str, Any] = {
        "round_seconds": [round(s, 3) for s in seconds],
        "seconds_per_round": round(steady, 3),
        "run_seconds": round(total, 2),
        "startup_seconds": round(total - sum(seconds) + seconds[0] - steady, 2),
    }
    if traffic:
        out["bytes_per_round"] = round(traffic["total-bytes"] / len(seconds))
        out["network_traffic"] = traffic
    return out


def _parameters() -> int:
    """How many values fedpriv's model for these sites holds (the floor sends as many)."""
    from fedpriv.server.prepare import initial_weights

    weights = initial_weights("mlp", {"in_features": 30, "num_classes": 2}, 0)
    return int(sum(v.size for v in weights.values()))


def run_variant(
    name: str, federation: Federation, base: Path, rounds: int, parameters: int
) -> dict[str, Any]:
    started = time.perf_counter()
    if name.startswith("floor"):
        out = base / f"{name}.json"
        poll = 0.1 if name == "floor-poll" else 0.0
        run_id = _submit(
            federation,
            FLOOR_APP,
            {"rounds": rounds, "hospitals": 3, "parameters": parameters, "poll": poll, "out": out},
        )
        status = federation.wait_run(run_id, 1800)
        total = time.perf_counter() - started
        if status.get("status") != "finished:completed":
            raise RuntimeError(f"{name}: {status}\n{federation.log('superlink')[-2000:]}")
        seconds = json.loads(out.read_text())["round_seconds"]
    else:
        run_id = _submit(
            federation,
            ROOT,
            {
                "deployment": True,
                "hospitals": 3,
                "rounds": rounds,
                "dp": False,
                "out": str(base / "runs"),
                "run-name": name,
                **({"keys": str(base / "he")} if name == "fedpriv-ckks" else {}),
                **PROTOCOLS[name],
            },
        )
        status = federation.wait_run(run_id, 1800)
        total = time.perf_counter() - started
        if status.get("status") != "finished:completed":
            raise RuntimeError(f"{name}: {status}\n{federation.log('superlink')[-2000:]}")
        metrics = (base / "runs" / name / "metrics.jsonl").read_text().splitlines()
        seconds = [json.loads(line)["seconds"] for line in metrics]
    return _summary(seconds, total, status.get("network-traffic"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--prewarm",
        action="store_true",
        help="start each site's warm worker with its SuperNode (`fedpriv site warm`, as the "
        "kit's entrypoint does), so the first exchange does not wait for its imports",
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fedpriv-floor-bench-"))
    init_certs(base / "certs", hosts=["localhost", "127.0.0.1"], hospitals=list(HOSPITALS))
    sites, _ = make_data(base)
    from fedpriv.privacy.he import write_keys

    write_keys(base / "he")  # the coordinator's public context, the hospitals' secret one
    report: dict[str, Any] = {"rounds": args.rounds, "hospitals": len(HOSPITALS)}
    parameters = _parameters()
    report["parameters"] = parameters
    federation = Federation(base / "fed", base / "certs")
    try:
        federation.start_superlink()
        for hospital in HOSPITALS:
            federation.register(hospital)
            node_config = {
                "hospital-name": hospital,
                "data-path": str(sites[hospital]),
                "ledger-path": str(base / "ledgers" / f"{hospital}.sqlite"),
                "budget-epsilon": 1000.0,
                "device": "cpu",
                "require-dp": False,  # the no-DP variant measures the round without DP
                "he-secret-context": str(base / "he" / "secret.ctx"),
            }
            supernode = federation.start_supernode(hospital, node_config)
            if args.prewarm:
                federation._start(
                    f"warm-{hospital}",
                    [
                        str(Path(sys.executable).parent / "fedpriv"),
                        "site",
                        "warm",
                        "--node-config",
                        key_values(node_config),
                        "--watch-pid",
                        str(supernode.pid),
                    ],
                    base / "fed" / f"warm-{hospital}",
                )
        federation.wait_online(len(HOSPITALS), 120)
        for name in args.only:
            report[name] = run_variant(name, federation, base, args.rounds, parameters)
            print(name, json.dumps(report[name]), flush=True)
    finally:
        federation.close()
    floor = report.get("floor", {}).get("seconds_per_round")
    for name in PROTOCOLS:
        if floor and name in report:
            report[name]["ratio_to_floor"] = round(report[name]["seconds_per_round"] / floor, 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
