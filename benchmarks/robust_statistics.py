"""How far the federated-statistics centre and scale stray: honest federations (the noise)
and federations with one lying hospital, for several ways of combining the releases.

    python benchmarks/robust_statistics.py --json benchmarks/results/robust_statistics.json

No training: each hospital's release is drawn with fedpriv's own mechanism
(:class:`fedpriv.privacy.statistics.StatisticsMechanism`) from its real training records
(the embedded datasets, fedpriv's split), at the noise of the default release (stats-epsilon
a quarter of epsilon 4, delta 1e-5), many noise draws per federation. Honest: the error against the
exact pooled mean and deviation of every hospital's training records (clipped to the public
range as the mechanism clips them), mean over features and draws. One liar: how far it moves a
centre from what the same combination makes of the honest hospitals' releases alone (same
noise draws; largest over features and draws), the centre's error against the honest
hospitals' exact pooled mean, and the ratio of every scale to the honest-alone scale. All in
units of each feature's public range.

Ways of combining (``--arms``): ``pooled`` (before: the sums added up, every well-formed
release accepted), ``cap-F`` (after: implausible releases rejected, no hospital weighs more
than F times the median count), ``equal`` (every hospital's mean weighs the same),
``median`` (per feature, the median of the hospitals' means and second moments).

Lies (hospital 0 replaced): ``count`` (claims 1e9 patients, its honest sums), ``edge``
(1e9 patients, every mean at the range's top, no variance), ``outside`` (1e9 patients,
means 5 ranges above the top), ``shrink`` (1e9 patients, every value at the range's middle:
to shrink every scale).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.config import RunConfig
from fedpriv.data.schema import builtin_schema
from fedpriv.data.splits import split_for
from fedpriv.privacy.accounting import statistics_noise
from fedpriv.privacy.statistics import (
    COUNT_WEIGHT,
    SCALE_CEILING,
    SCALE_FLOOR,
    SQUARE_WEIGHT,
    StatisticsMechanism,
    influence_bound,
)

LIE_COUNT = 1e9
Estimate = tuple[np.ndarray, np.ndarray]  # centre, scale of u (range units; centre in [-1/2, 1/2])


def _moments(mechanism: StatisticsMechanism, total: np.ndarray, hospitals: float) -> Estimate:
    """The library's arithmetic from summed (already weighted) releases, in range units."""
    d = len(mechanism.names)
    n = max(float(total[0] / COUNT_WEIGHT), 1.0)
    mean = np.clip(total[1 : 1 + d] / n, -0.5, 0.5)
    second = np.clip(total[1 + d :] / (SQUARE_WEIGHT * n) + 0.125, 0.0, 0.25)
    noise_floor = mechanism.sigma * math.sqrt(hospitals) / (SQUARE_WEIGHT * n)
    floor = min(max(SCALE_FLOOR**2, noise_floor), SCALE_CEILING**2)
    return mean, np.sqrt(np.clip(second - mean**2, floor, SCALE_CEILING**2))


def _truth(mechanism: StatisticsMechanism, exact: list[np.ndarray]) -> Estimate:
    """The exact pooled mean and deviation of u (no noise, no floor)."""
    total = np.sum(exact, axis=0)
    d = len(mechanism.names)
    n = total[0] / COUNT_WEIGHT
    mean = total[1 : 1 + d] / n
    second = total[1 + d :] / (SQUARE_WEIGHT * n) + 0.125
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))


def _library(mechanism: StatisticsMechanism, releases: list[np.ndarray], cap: float) -> Estimate:
    combined = mechanism.combine(releases, cap=cap)
    centre = np.empty(len(mechanism.names))
    scale = np.empty(len(mechanism.names))
    for j, (name, (low, high)) in enumerate(zip(mechanism.names, mechanism.bounds, strict=True)):
        c, s = combined.reference[name]
        centre[j] = (c - low) / (high - low) - 0.5
        scale[j] = s / (high - low)
    return centre, scale


def _equal(mechanism: StatisticsMechanism, releases: list[np.ndarray]) -> Estimate:
    stack = np.stack(releases)
    counts = np.maximum(stack[:, 0] / COUNT_WEIGHT, 1.0)
    median = float(np.median(counts))
    factor = median / counts
    return _moments(mechanism, (stack * factor[:, None]).sum(axis=0), float(np.sum(factor**2)))


def _median(mechanism: StatisticsMechanism, releases: list[np.ndarray]) -> Estimate:
    stack = np.stack(releases)
    d = len(mechanism.names)
    counts = np.maximum(stack[:, 0] / COUNT_WEIGHT, 1.0)
    means = np.clip(stack[:, 1 : 1 + d] / counts[:, None], -0.5, 0.5)
    seconds = np.clip(stack[:, 1 + d :] / (SQUARE_WEIGHT * counts[:, None]) + 0.125, 0.0, 0.25)
    mean = np.median(means, axis=0)
    second = np.median(seconds, axis=0)
    n = float(np.median(counts)) * len(releases)
    noise_floor = mechanism.sigma * math.sqrt(len(releases)) / (SQUARE_WEIGHT * n)
    floor = min(max(SCALE_FLOOR**2, noise_floor), SCALE_CEILING**2)
    return mean, np.sqrt(np.clip(second - mean**2, floor, SCALE_CEILING**2))


def _lie(kind: str, honest: np.ndarray, d: int) -> np.ndarray:
    n = LIE_COUNT
    lie = np.empty(1 + 2 * d)
    lie[0] = COUNT_WEIGHT * n
    if kind == "count":
        lie[1:] = honest[1:]
    elif kind in ("edge", "outside"):
        u = 0.5 if kind == "edge" else 5.5
        lie[1 : 1 + d] = n * u
        lie[1 + d :] = SQUARE_WEIGHT * n * (u * u - 0.125)
    elif kind == "shrink":
        lie[1 : 1 + d] = 0.0
        lie[1 + d :] = SQUARE_WEIGHT * n * (0.0 - 0.125)
    else:
        raise ValueError(kind)
    return lie


def _screened(mechanism: StatisticsMechanism, releases: list[np.ndarray]) -> list[np.ndarray]:
    """The releases the server accepts (as fedpriv.server.statistics does)."""
    kept = [r for r in releases if not mechanism.implausible(r)]
    return kept or releases[:1]


def _arm(name: str, mechanism: StatisticsMechanism) -> Callable[[list[np.ndarray]], Estimate]:
    """The combination ``name``; every arm but ``pooled`` drops implausible releases first."""

    if name == "pooled":
        return lambda rs: _library(mechanism, rs, math.inf)
    if name.startswith("cap-"):
        cap = float(name[4:])
        return lambda rs: _library(mechanism, _screened(mechanism, rs), cap)
    if name == "equal":
        return lambda rs: _equal(mechanism, _screened(mechanism, rs))
    if name == "median":
        return lambda rs: _median(mechanism, _screened(mechanism, rs))
    raise ValueError(name)


def measure(
    dataset: str, hospitals: int, partition: str, arms: list[str], lies: list[str], trials: int
) -> list[dict[str, Any]]:
    config = RunConfig(
        dataset=dataset, hospitals=hospitals, partition=partition, normalisation="federated"
    )
    data, split = split_for(config)
    schema = builtin_schema(dataset)
    assert schema is not None and data.raw_features is not None
    noise = statistics_noise(config.stats_epsilon, config.delta, config.accountant)
    mechanism = StatisticsMechanism.for_schema(schema, noise)
    d = len(mechanism.names)
    raws = [data.raw_features[h.train] for h in split.hospitals]
    exact = [mechanism.exact_sums(r, np.arange(len(r))) for r in raws]
    truths = {"all": _truth(mechanism, exact), "honest": _truth(mechanism, exact[1:])}
    rng = np.random.default_rng(0)
    draws = [
        [e + rng.normal(0.0, mechanism.sigma, size=e.shape) for e in exact] for _ in range(trials)
    ]
    rows = []
    for arm in arms:
        combine = _arm(arm, mechanism)
        row: dict[str, Any] = {
            "dataset": dataset,
            "hospitals": hospitals,
            "partition": partition,
            "sizes": [len(r) for r in raws],
            "noise_multiplier": noise,
            "sigma": mechanism.sigma,
            "arm": arm,
            "trials": trials,
        }
        centre_err, scale_err, rejected = [], [], 0
        for releases in draws:
            if arm != "pooled":
                rejected += sum(bool(mechanism.implausible(r)) for r in releases)
            centre, scale = combine(releases)
            centre_err.append(np.abs(centre - truths["all"][0]))
            scale_err.append(np.abs(scale - truths["all"][1]))
        row["honest_centre_error"] = float(np.mean(centre_err))
        row["honest_centre_error_p95"] = float(np.percentile(np.ravel(centre_err), 95))
        row["honest_scale_error"] = float(np.mean(scale_err))
        row["honest_rejected"] = rejected
        alone = [combine(releases[1:]) for releases in draws]
        for lie in lies:
            moved, error, ratio = [], [], []
            for releases, (centre_0, scale_0) in zip(draws, alone, strict=True):
                centre, scale = combine([_lie(lie, releases[0], d), *releases[1:]])
                moved.append(np.max(np.abs(centre - centre_0)))
                error.append(np.mean(np.abs(centre - truths["honest"][0])))
                ratio.append(scale / scale_0)
            row[f"{lie}_moved_max"] = float(np.max(moved))
            row[f"{lie}_moved_mean"] = float(np.mean(moved))
            row[f"{lie}_centre_error"] = float(np.mean(error))
            row[f"{lie}_scale_ratio_min"] = float(np.min(ratio))
            row[f"{lie}_scale_ratio_max"] = float(np.max(ratio))
            if arm.startswith("cap-"):  # the liar's share of the weight: what the bound bounds
                cap = float(arm[4:])
                row[f"{lie}_share_max"] = max(
                    mechanism.combine(
                        _screened(mechanism, [_lie(lie, r[0], d), *r[1:]]), cap=cap
                    ).shares[0]
                    if not mechanism.implausible(_lie(lie, r[0], d))
                    else 0.0
                    for r in draws
                )
                row["influence_bound"] = influence_bound(hospitals, cap)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["breast-cancer", "digits"])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument(
        "--arms", nargs="+", default=["pooled", "cap-1", "cap-2", "cap-3", "equal", "median"]
    )
    parser.add_argument("--lies", nargs="+", default=["count", "edge", "outside", "shrink"])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for dataset in args.datasets:
        for partition in args.partitions:
            for k in args.hospitals:
                rows += measure(dataset, k, partition, args.arms, args.lies, args.trials)
                for r in rows[-len(args.arms) :]:
                    print(
                        f"{dataset:13s} {partition:9s} k={k:2d} {r['arm']:7s} "
                        f"honest centre {r['honest_centre_error']:.4f} "
                        f"(p95 {r['honest_centre_error_p95']:.4f}) "
                        f"scale {r['honest_scale_error']:.4f} rej {r['honest_rejected']} | "
                        + " ".join(
                            f"{lie} {r[f'{lie}_moved_max']:.3f}/{r[f'{lie}_centre_error']:.3f}/"
                            f"{r[f'{lie}_scale_ratio_min']:.2f}-{r[f'{lie}_scale_ratio_max']:.2f}"
                            + (f"/a{r[f'{lie}_share_max']:.2f}" if f"{lie}_share_max" in r else "")
                            for lie in args.lies
                        ),
                        flush=True,
                    )
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
