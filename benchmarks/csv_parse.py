"""Whether numpy parses a CSV's numeric columns faster than Python's float(), cell by cell.

    taskset -c 1 python benchmarks/csv_parse.py [--csv /tmp/prof/synthetic.csv] [--loads 3]

Three kinds of column of 200,000 cells: a feature column of ``simulation_scale.py``'s
synthetic file (float32 values written by ``repr``: 16-17 significant digits), four-decimal
numbers, and two-digit integers. Each way of turning the list of cells into float64 is
timed in CPU seconds (the machine is shared), the ways interleaved, and its result checked
bit for bit against ``float()``'s. Then the awkward cells a CSV may hold, each read by every
way, and where a way disagrees with ``float()``. Last, the server's own load and check of
the file (``fedpriv.data.splits.dataset_for``, what ``prepare_run`` calls), each in a fresh
process, for each checkout given with ``--tree`` in turn (e.g. the main checkout, then this
one), with a digest of the features and labels it made. Results in
``benchmarks/results/csv_parse.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.data.datasets import _cells, _numbers, _plain_lines, _split_plain  # noqa: E402

WAYS: dict[str, Callable[[list[str]], np.ndarray]] = {
    # what fedpriv does
    "float() per cell": lambda c: np.fromiter(map(float, c), dtype=np.float64, count=len(c)),
    "str array .astype": lambda c: np.array(c, dtype=str).astype(np.float64),
    "bytes array .astype": lambda c: np.array(c, dtype="S").astype(np.float64),
    "joined, np.fromstring": lambda c: np.fromstring(",".join(c), sep=","),
    "np.loadtxt on the cells": lambda c: np.loadtxt(c, dtype=np.float64, comments=None, ndmin=1),
}

AWKWARD = [
    *("1.5", " 1.5 ", "\t2", "-0", "+.5", "5.", "1e3", "-2E-1", "1E+3", "00012"),
    *("nan", "NaN", "-nan", "inf", "-Inf", "infinity", "1e400", "-1e400", "1e-400"),
    *("1_000", "1__0", "_1", "", " ", ".", "-", "1e", "1.2.3", "+-1", "0x10", "1d3"),
    *("x7", "\u0661\u0662", "\uff11", "1\x00", "1\x1f", "\xa01", "9" * 400, "0." + "1" * 400),
]


def _cpu(way: Callable[[list[str]], np.ndarray], column: list[str]) -> tuple[float, np.ndarray]:
    started = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fromstring and loadtxt warn on odd input
        result = way(column)
    return time.process_time() - started, result


def time_ways(columns: dict[str, list[str]], repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, column in columns.items():
        reference = WAYS["float() per cell"](column)
        seconds: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(repeats):
            for name, way in WAYS.items():
                spent, result = _cpu(way, column)
                if result.tobytes() != reference.tobytes():
                    raise SystemExit(f"{name} reads the {kind} column differently from float()")
                seconds[name].append(spent)
        out[kind] = {
            "cells": len(column),
            "example": column[:2],
            "cpu_ms_min": {n: round(1000 * min(s), 1) for n, s in seconds.items()},
            "cpu_ms_median": {
                n: round(1000 * sorted(s)[len(s) // 2], 1) for n, s in seconds.items()
            },
        }
        print(kind, json.dumps(out[kind]["cpu_ms_median"]), flush=True)
    return out


def time_table(lines: list[str], width: int, repeats: int) -> dict[str, Any]:
    """The whole file's cells to float64: split into a Python string per cell and float()
    per cell (before), against fedpriv's one pass over the joined records (after)."""

    def by_cell() -> np.ndarray:
        columns = _split_plain(lines, width)
        return np.stack([WAYS["float() per cell"](c) for c in columns], axis=1)

    def one_pass() -> np.ndarray:
        values = _numbers(lines, width)
        assert values is not None
        return values

    seconds: dict[str, list[float]] = {"split, float() per cell": [], "one pass": []}
    reference = by_cell().tobytes()
    for _ in range(repeats):
        for name, way in (("split, float() per cell", by_cell), ("one pass", one_pass)):
            started = time.process_time()
            made = way()
            seconds[name].append(round(time.process_time() - started, 2))
            if made.tobytes() != reference:
                raise SystemExit(f"{name} reads the file differently")
    print("whole table", seconds, flush=True)
    return {"cells": len(lines) * width, "cpu_s": seconds}


def _read(way: Callable[[list[str]], np.ndarray], cell: str) -> str:
    try:
        _, result = _cpu(way, [cell])
    except ValueError:
        return "error"
    return repr(float(result[0])) if result.size == 1 else f"{result.size} values"


def disagreements() -> dict[str, dict[str, str]]:
    """Per way, the awkward cells it reads otherwise than float() (value or error)."""
    out: dict[str, dict[str, str]] = {}
    for name, way in WAYS.items():
        differ = {}
        for cell in AWKWARD:
            want, got = _read(WAYS["float() per cell"], cell), _read(way, cell)
            if want != got:
                differ[ascii(cell[:20])] = f"float(): {want}, this way: {got}"
        out[name] = differ
    return out


LOAD = """
import sys, time
sys.path.insert(0, {root!r})
from fedpriv.config import RunConfig
from fedpriv.data.splits import dataset_for
config = RunConfig(dataset={csv!r}, hospitals=100, rounds=2, dp=False, min_hospitals=1)
wall, cpu = time.perf_counter(), time.process_time()
dataset = dataset_for(config)
import hashlib
made = dataset.raw_features.tobytes() + dataset.features.tobytes() + dataset.labels.tobytes()
print(time.perf_counter() - wall, time.process_time() - cpu, hashlib.sha256(made).hexdigest())
"""


def server_loads(csv_path: Path, trees: list[Path], runs: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {str(tree): [] for tree in trees}
    for _ in range(runs):
        for tree in trees:
            code = LOAD.format(root=str(tree), csv=str(csv_path))
            wall, cpu, digest = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout.split()
            run = {"wall_s": round(float(wall), 2), "cpu_s": round(float(cpu), 2)}
            out[str(tree)].append({**run, "digest": digest[:16]})
            print("dataset_for", tree, out[str(tree)][-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=Path("/tmp/prof/synthetic.csv"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--tree", type=Path, action="append", help="a checkout (default: this)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/csv_parse.json")
    args = parser.parse_args()
    if not args.csv.exists():
        from benchmarks.simulation_scale import make_csv

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        make_csv(args.csv)
    text = args.csv.read_text()
    _, file_columns, rows = _cells(text)
    plain = _plain_lines(text)
    assert plain is not None, "the synthetic file is a plain one"
    rng = np.random.default_rng(0)
    columns = {
        "the synthetic file's first feature": file_columns[0],
        "four decimals": [f"{x:.4f}" for x in rng.normal(size=rows)],
        "two-digit integers": [str(x) for x in rng.integers(18, 95, size=rows)],
    }
    result = {
        "machine": f"{platform.processor() or platform.machine()}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        "columns": time_ways(columns, args.repeats),
        "whole_table": time_table(plain[1], len(plain[0]), args.repeats),
        "awkward_cells_read_otherwise_than_float": disagreements(),
        "server_load_dataset_for": server_loads(args.csv, args.tree or [ROOT], args.loads),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["awkward_cells_read_otherwise_than_float"], indent=1))


if __name__ == "__main__":
    main()
