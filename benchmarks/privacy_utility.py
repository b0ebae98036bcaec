"""Central test accuracy at several epsilons and without DP (the privacy-utility table),
each run one ``fedpriv simulate`` process (the Flower simulation engine).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/privacy_utility.py --arms after before \
        --datasets breast-cancer digits tabular organs28 --epsilons 1 2 4 8 --seeds 0 1 2 \
        --results benchmarks/results/privacy_utility.jsonl
    python benchmarks/privacy_utility.py --table benchmarks/results/privacy_utility.jsonl

An *arm* is a set of training settings, always passed as explicit flags so the numbers do not
depend on what the defaults are when the script runs. ``before``: the defaults a new user got
before issue 13 (5 rounds, 1 local epoch, batch 32, lr 0.1, the CNN for images, the MLP for
tables) with and without DP. ``after``: under DP the DP recipe (10 rounds, 4 local epochs,
batch 128, lr 1.0, the MLP for images smaller than 16x16); its no-DP reference is the same
federation without DP for as many rounds (10) with the plain settings (1 local epoch, batch
32, lr 0.1, the dataset's usual model); its models use ReLU. ``elu``: the after arm with ELU
as the models' activation under DP (the MLP's default since then), measured against the after
arm's no-DP runs (``--no-baseline``). 5 hospitals, iid, delta 1e-5; epsilon is each
hospital's record-level target for the whole run (PRV accountant).

``tabular`` and ``organs28`` name the generated public sets of ``public_sets.py`` (written
to ``--public-dir`` when missing). Every finished run appends one JSON line to ``--results``
at once, so an interrupted sweep keeps what it measured; a rerun skips the runs already
there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedpriv.runfiles import read_metrics, read_run_json

#: the settings of each arm with and without DP (run-config keys)
PLAIN = {"rounds": 5, "local-epochs": 1, "batch-size": 32, "lr": 0.1}
RECIPE = {"rounds": 10, "local-epochs": 4, "batch-size": 128, "lr": 1.0}
ARMS: dict[str, dict[bool, dict[str, Any]]] = {
    "before": {True: PLAIN, False: PLAIN},
    "after": {
        True: {**RECIPE, "model-activation": "relu"},
        False: {**PLAIN, "rounds": 10},
    },
    # the recipe with the MLP's DP activation, ELU (the default since issue 13's fourth pass);
    # its no-DP reference is the after arm's (the same runs: without DP nothing changed)
    "elu": {
        True: {**RECIPE, "model-activation": "elu"},
        False: {**PLAIN, "rounds": 10},
    },
}
#: an arm whose no-DP runs are another arm's (the table reads them from there)
REFERENCE_ARM = {"elu": "after"}
RAY_RESTARTS = 3
GENERATED = {"tabular": "tabular.csv", "organs28": "organs28.npz"}


def dataset_path(name: str, public_dir: Path) -> str:
    if name not in GENERATED:
        return name
    path = public_dir / GENERATED[name]
    if not path.exists():
        from public_sets import image_set, tabular_set

        (tabular_set if name == "tabular" else image_set)(path)
    return str(path)


def model_for(arm: str, dp: bool, spec: str) -> str:
    """The model each arm uses: the CNN for images and the MLP for tables, except the DP
    recipe's MLP for images smaller than 16x16."""
    from fedpriv.data import load_dataset

    dataset = load_dataset(spec)
    if dataset.kind != "image":
        return "mlp"
    height, width = dataset.features.shape[2:]
    return "mlp" if arm in ("after", "elu") and dp and height * width < 256 else "cnn"


def flags(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", str(value)]
    return out


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = ""
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            gpu = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
    return {
        "host": platform.node(),
        "cpu": model,
        "gpu": gpu,
        "cores": os.cpu_count(),
        "pinned_to": sorted(os.sched_getaffinity(0)),
        "environment": {
            k: v for k, v in os.environ.items() if k == "OMP_NUM_THREADS" or k.startswith("RAY_")
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def one_run(
    *, arm: str, dataset: str, spec: str, epsilon: float | None, seed: int, args: Any
) -> dict[str, Any]:
    dp = epsilon is not None
    values: dict[str, Any] = {
        "dataset": spec,
        "hospitals": args.hospitals,
        "partition": args.partition,
        "seed": seed,
        **ARMS[arm][dp],
        "model": model_for(arm, dp, spec),
        "dp": dp,
    }
    if dp:
        values["epsilon"] = epsilon
        values["delta"] = args.delta
        values["budget-epsilon"] = max(10.0, epsilon or 0.0)
    for item in args.set:
        key, value = item.split("=", 1)
        values[key] = {"true": True, "false": False}.get(value, value)
    eps = "nodp" if epsilon is None else f"eps{epsilon:g}"
    name = f"{arm}-{dataset}-{eps}-s{seed}-{os.getpid()}-{time.time_ns() % 10**9}"
    command = [sys.executable, "-m", "fedpriv.cli", "simulate", *flags(values)]
    command += ["--out", str(args.out), "--name", name]
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    host = machine()
    t0 = time.perf_counter()
    returncode, output, retries = _simulate(command, args.out / name, rounds=values["rounds"])
    seconds = round(time.perf_counter() - t0, 1)
    row: dict[str, Any] = {
        "arm": arm,
        "dataset": dataset,
        "epsilon": epsilon,
        "seed": seed,
        "settings": {k: v for k, v in values.items() if k != "dataset"},
        "set": args.set,
        "started": started,
        "wall_seconds": seconds,
        "machine": host,
        "returncode": returncode,
        "ray_restarts": retries,
        "run_dir": str(args.out / name),
    }
    if returncode != 0:
        row["error"] = output.strip().splitlines()[-5:]
        return row
    run_dir = args.out / name
    metrics = read_metrics(run_dir / "metrics.jsonl")
    final = metrics[-1]
    config = read_run_json(run_dir / "config.json")
    row.update(
        test_accuracy=final["test_accuracy"],
        rounds_done=final["round"],
        model=config["model"],
        train_records=sorted(h["train_examples"] for h in final["hospitals"].values()),
    )
    if dp:
        privacy = read_run_json(run_dir / "privacy.json")
        hospitals = privacy["hospitals"].values()
        row.update(
            accounted_epsilon=max(h["epsilon"] for h in hospitals),
            noise_multiplier=max(h["noise_multiplier"] for h in hospitals),
            sample_rate=max(h["sample_rate"] for h in hospitals),
        )
    return row


def _descendants(pid: int) -> dict[int, str]:
    """The command lines of ``pid``'s descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, of in parents.items():
            if of == parent and child not in found:
                try:
                    found[child] = (
                        Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
                    )
                except OSError:
                    continue
                frontier.append(child)
    return found


#: Ray's agents the raylet waits for at start-up (about 15 s, then it aborts)
RAY_AGENTS = (
    "dashboard/agent.py",
    "runtime_env/agent/main.py",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)


def _simulate(command: list[str], run_dir: Path, *, rounds: int) -> tuple[int, str, int]:
    """Run ``fedpriv simulate``; start it again when Ray's raylet dies under it.

    On a heavily loaded machine Ray's raylet aborts at start-up when its agents are slow to
    write their port files ("Timed out waiting for file .../metrics_agent_port_..."), and
    the Flower simulation then waits for its actors forever. Two defences: the agents run
    at nice -10 for their first 45 s (a few CPU seconds of imports; training is untouched),
    and a raylet seen and then gone for 30 s before the last round is recorded is that
    crash: the run is killed and started afresh (nothing of it was trained), at most
    ``RAY_RESTARTS`` times.
    """
    output = ""
    for attempt in range(RAY_RESTARTS + 1):
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            seen = gone_since = 0.0
            boosted: dict[int, float] = {}
            crashed = False
            while process.poll() is None:
                time.sleep(1)
                now = time.monotonic()
                children = _descendants(process.pid)
                for pid, line in children.items():
                    program = line.split("\0", 1)[0]  # the raylet names the agents too
                    agent = any(name in line for name in RAY_AGENTS) and "raylet" not in program
                    if agent and pid not in boosted:
                        boosted[pid] = now
                        _renice(pid, -10)
                for pid, since in boosted.items():
                    if since and now - since > 45:
                        boosted[pid] = 0.0
                        _renice(pid, 0)
                if any("raylet/raylet" in c for c in children.values()):
                    seen, gone_since = now, 0.0
                elif seen and not gone_since:
                    gone_since = now
                if gone_since and now - gone_since > 30 and _rounds_done(run_dir) < rounds:
                    crashed = True
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    break
            log.seek(0)
            output = log.read()
        if not crashed:
            return process.returncode, output, attempt
        shutil.rmtree(run_dir, ignore_errors=True)
    return -1, output + "\nRay's raylet died at start-up every time", RAY_RESTARTS + 1


def _renice(pid: int, niceness: int) -> None:
    # gone already, or not allowed: the restart still covers it
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, niceness)


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def done_keys(path: Path) -> set[tuple[Any, ...]]:
    if not path.exists():
        return set()
    return {
        (r["arm"], r["dataset"], r["epsilon"], r["seed"], tuple(r.get("set", [])))
        for r in map(json.loads, path.read_text().splitlines())
        if r.get("returncode") == 0
    }


def sweep(args: Any) -> None:
    settings: list[float | None] = [*args.epsilons] + ([] if args.no_baseline else [None])
    if args.baseline_first and not args.no_baseline:
        settings = [None, *args.epsilons]
    have = done_keys(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arm in args.arms:
            for dataset in args.datasets:
                spec = dataset_path(dataset, args.public_dir)
                for epsilon in settings:
                    if (arm, dataset, epsilon, seed, tuple(args.set)) in have:
                        continue
                    row = one_run(
                        arm=arm, dataset=dataset, spec=spec, epsilon=epsilon, seed=seed, args=args
                    )
                    with args.results.open("a") as out:
                        out.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row.get(k) for k in SUMMARY}), flush=True)


SUMMARY = ("arm", "dataset", "epsilon", "seed", "test_accuracy", "accounted_epsilon")


def _label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"epsilon {epsilon:g}"


def _cell(values: list[float], seeds: int) -> str:
    if not values:
        return "not run"
    text = f"{statistics.mean(values):.3f}"
    if len(values) > 1:
        text += f" [{min(values):.3f}-{max(values):.3f}]"
    return text + (f" ({len(values)} of {seeds} seeds)" if len(values) < seeds else "")


def table(path: Path, *, datasets: list[str], epsilons: list[float], seeds: int) -> str:
    """Markdown: mean [min-max] over seeds per dataset, arm and epsilon; the gap at each
    epsilon to the arm's no-DP reference; then the checks (accounted epsilon, model, time)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ok = [r for r in rows if r["returncode"] == 0 and not r.get("set")]
    runs: dict[tuple[str, str, float | None], list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        runs[r["dataset"], r["arm"], r["epsilon"]].append(r)

    def accuracies(key: tuple[str, str, float | None]) -> list[float]:
        return [r["test_accuracy"] for r in runs.get(key, [])]

    datasets = list(dict.fromkeys([*datasets, *(r["dataset"] for r in ok)]))
    columns: list[float | None] = [*sorted(epsilons), None]
    head = ["dataset", "arm", *map(_label, columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in datasets:
        for arm in ARMS:
            cells = [_cell(accuracies((dataset, arm, e)), seeds) for e in columns]
            lines.append(f"| {dataset} | {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Gap to the arm's own no-DP reference (points, means over the seeds run):", ""]
    head = ["dataset", "arm", *map(_label, columns[:-1])]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dataset in datasets:
        for arm in ARMS:
            reference = accuracies((dataset, arm, None)) or accuracies(
                (dataset, REFERENCE_ARM.get(arm, arm), None)
            )
            gaps = []
            for e in columns[:-1]:
                private = accuracies((dataset, arm, e))
                if not (private and reference):
                    gaps.append("-")
                    continue
                gap = 100 * (statistics.mean(reference) - statistics.mean(private))
                gaps.append(f"{gap:.1f}")
            lines.append(f"| {dataset} | {arm} | " + " | ".join(gaps) + " |")
    lines += [
        "",
        "| dataset | arm | epsilon | runs | accounted epsilon (max) | model | "
        "records per hospital | wall s (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, arm, epsilon), group in sorted(
        runs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 1e9)
    ):
        accounted = (
            f"{max(r['accounted_epsilon'] for r in group):.3f}" if epsilon is not None else "-"
        )
        models = "/".join(sorted({r["model"] for r in group}))
        records = f"{min(min(r['train_records']) for r in group)}-" + str(
            max(max(r["train_records"]) for r in group)
        )
        wall = statistics.mean(r["wall_seconds"] for r in group)
        lines.append(
            f"| {dataset} | {arm} | {_label(epsilon)} | {len(group)} | {accounted} | {models} "
            f"| {records} | {wall:.0f} |"
        )
    redone = {(r["dataset"], r["arm"], r["epsilon"], r["seed"]) for r in ok}
    failed = [
        r
        for r in rows
        if r["returncode"] != 0 and (r["dataset"], r["arm"], r["epsilon"], r["seed"]) not in redone
    ]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed:"]
        lines += [
            f"- {r['arm']} {r['dataset']} {_label(r['epsilon'])} seed {r['seed']}: "
            f"{(r.get('error') or [''])[-1]}"
            for r in failed
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["after", "before"])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-DP runs")
    parser.add_argument("--baseline-first", action="store_true", help="the no-DP run first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--set", nargs="*", default=[], help="extra simulate flag key=value")
    parser.add_argument("--public-dir", type=Path, default=Path("/tmp/fedpriv-public"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedpriv-pu"))
    parser.add_argument("--results", type=Path, default=Path("privacy_utility.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="print the table of a file")
    parser.add_argument("--expect-seeds", type=int, default=3, help="seeds a full cell has")
    args = parser.parse_args()
    if args.table is not None:
        print(
            table(
                args.table,
                datasets=args.datasets,
                epsilons=args.epsilons,
                seeds=args.expect_seeds,
            )
        )
        return
    sweep(args)


if __name__ == "__main__":
    main()
