"""Feature statistics from the hospitals under DP (``normalisation = "federated"``): both
sides of the mechanism.

Each hospital releases, once per run, the sums over its training patients of a bounded
vector: a count, and per numeric feature of the schema the value and its square, each
clipped to the schema's public range. Gaussian noise is added *at the hospital*, calibrated
to the vector's L2 sensitivity, so the server never sees an exact statistic; the release is
recorded in the hospital's privacy ledger like a DP-SGD round (one Gaussian mechanism on
every patient: ``DpEvent(noise_multiplier, 1.0, 1)``). The server adds the hospitals' noisy
sums and turns them into a centre and scale per feature, which every hospital then applies
identically (the records never leave, and no statistic is computed over all hospitals'
records anywhere, in simulation either).

Per patient ``p`` (all of its records ``r``; ``u = (clip(x) - min) / (max - min) - 1/2``,
so ``u`` lies in ``[-1/2, 1/2]`` and ``u^2 - 1/8`` in ``[-1/8, 1/8]``), the contribution is::

    [ C,  mean_r u_1 .. mean_r u_d,  W (mean_r u_1^2 - 1/8) .. W (mean_r u_d^2 - 1/8) ]

Averaging over a patient's records makes a patient's contribution the same size whatever
its number of records (as DP-SGD clips one gradient per patient). Adding or removing a
patient changes the sum by at most ``sqrt(C^2 + d/4 + d W^2 / 64)`` in L2 (the sensitivity).
``W = 4`` gives the squares the same share of the sensitivity as the values (their range
is four times smaller); ``C = 2`` keeps the count's relative noise small at a modest cost.

``d`` counts the schema's *numeric* features only. Categorical features, ordinal or one-hot,
release nothing: their encoding is fixed by the schema's category list (a one-hot column is
0 or 1 and needs no centre or scale), so a one-hot feature's k model inputs add nothing to
the vector or to its sensitivity, and the argument above holds unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np

from fedpriv.data.schema import NUMERIC, Schema
from fedpriv.errors import ConfigError

__all__ = [
    "COUNT_WEIGHT",
    "SCALE_FLOOR",
    "SQUARE_WEIGHT",
    "STATISTICS_ROUND",
    "STATS_EPSILON",
    "STATS_NOISE",
    "STATS_SENSITIVITY",
    "STATS_SUMS",
    "Combined",
    "StatisticsMechanism",
]

#: the ledger's round number of a run's statistics release (training rounds start at 1)
STATISTICS_ROUND = 0
# keys of the fedpriv.messages.STATISTICS record of a hospital's reply
STATS_SUMS = "sums"
STATS_NOISE = "noise-multiplier"
STATS_SENSITIVITY = "sensitivity"
#: the hospital's largest per-patient epsilon after the release (its ledger's figure)
STATS_EPSILON = "epsilon"

COUNT_WEIGHT = 2.0
SQUARE_WEIGHT = 4.0
#: the smallest scale the server accepts, as a fraction of a feature's public range (or
#: more: the noise's own level, see StatisticsMechanism.combine): a variance estimate
#: drowned in noise (or negative) becomes this, never 0 or a tiny divisor
SCALE_FLOOR = 0.05
#: the largest: a variable within [min, max] has a standard deviation of at most half of it
SCALE_CEILING = 0.5


@dataclasses.dataclass(frozen=True)
class Combined:
    """What the server made of the hospitals' releases."""

    #: feature name -> (centre, scale), numeric features of the schema in its order
    reference: dict[str, tuple[float, float]]
    #: the noisy count of patients over all hospitals that released (a figure, not exact)
    patients: float
    #: features whose variance estimate fell below the floor (noise, or a constant feature)
    floored: tuple[str, ...] = ()

    def dumps(self) -> str:
        """The run configuration's ``feature-statistics`` value."""
        return json.dumps({k: [c, s] for k, (c, s) in self.reference.items()})


@dataclasses.dataclass(frozen=True)
class StatisticsMechanism:
    """The release for one schema at one noise multiplier (both sides use the same)."""

    names: tuple[str, ...]
    #: (min, max) of each numeric feature, in ``names`` order
    bounds: tuple[tuple[float, float], ...]
    #: columns of the schema's raw values (schema order) that are numeric
    columns: tuple[int, ...]
    noise_multiplier: float

    @classmethod
    def for_schema(cls, schema: Schema, noise_multiplier: float) -> StatisticsMechanism:
        numeric = [(j, f) for j, f in enumerate(schema.features) if f.kind == NUMERIC]
        if not numeric:
            raise ConfigError(
                "normalisation federated needs at least one numeric feature in the schema "
                "(categorical features keep the schema's mapping): use normalisation schema"
            )
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"the statistics release needs noise (got {noise_multiplier})")
        return cls(
            names=tuple(f.name for _, f in numeric),
            bounds=tuple((f.minimum, f.maximum) for _, f in numeric),
            columns=tuple(j for j, _ in numeric),
            noise_multiplier=float(noise_multiplier),
        )

    @property
    def width(self) -> int:
        """The released vector's length: a count, then values, then squares."""
        return 1 + 2 * len(self.names)

    @property
    def sensitivity(self) -> float:
        """L2 change of the sums when one patient is added or removed."""
        d = len(self.names)
        return math.sqrt(COUNT_WEIGHT**2 + d / 4.0 + d * SQUARE_WEIGHT**2 / 64.0)

    @property
    def sigma(self) -> float:
        """The standard deviation of the Gaussian noise on each coordinate."""
        return self.noise_multiplier * self.sensitivity

    def contributions(self, raw: np.ndarray, units: np.ndarray) -> np.ndarray:
        """One row per patient (``units[i]`` is record ``i``'s patient, 0..P-1): the bounded
        vector of the module's text. ``raw``: the schema's raw values, schema order."""
        values = np.asarray(raw, dtype=np.float64)[:, list(self.columns)]
        low = np.array([b[0] for b in self.bounds])
        high = np.array([b[1] for b in self.bounds])
        u = (np.clip(values, low, high) - low) / (high - low) - 0.5
        u = np.nan_to_num(u, nan=0.0)  # the schema check refuses NaN; never let one through
        units = np.asarray(units, dtype=np.int64).reshape(-1)
        if units.size != u.shape[0]:
            raise ValueError(f"{units.size} patient units for {u.shape[0]} records")
        patients = int(units.max()) + 1 if units.size else 0
        counts = np.bincount(units, minlength=patients).astype(np.float64)
        counts[counts == 0] = 1.0
        sums = np.zeros((patients, u.shape[1]))
        squares = np.zeros((patients, u.shape[1]))
        np.add.at(sums, units, u)
        np.add.at(squares, units, u * u)
        rows = np.empty((patients, self.width))
        rows[:, 0] = COUNT_WEIGHT
        rows[:, 1 : 1 + u.shape[1]] = sums / counts[:, None]
        rows[:, 1 + u.shape[1] :] = SQUARE_WEIGHT * (squares / counts[:, None] - 0.125)
        return rows

    def exact_sums(self, raw: np.ndarray, units: np.ndarray) -> np.ndarray:
        return self.contributions(raw, units).sum(axis=0)

    def release(self, raw: np.ndarray, units: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What a hospital sends: its sums plus Gaussian noise of standard deviation
        ``sigma`` on every coordinate (drawn from ``rng``, which the hospital seeds from the
        OS)."""
        return self.exact_sums(raw, units) + rng.normal(0.0, self.sigma, size=self.width)

    def check(self, sums: Sequence[float], *, who: str) -> np.ndarray:
        """A release as the server receives it: the right length, finite (else refused)."""
        vector = np.asarray([float(v) for v in sums], dtype=np.float64)
        if vector.shape != (self.width,) or not np.all(np.isfinite(vector)):
            raise ConfigError(
                f"{who} sent {vector.size} statistics (or non-finite ones), expected "
                f"{self.width} numbers"
            )
        return vector

    def combine(self, releases: Sequence[np.ndarray]) -> Combined:
        """Centre and scale per numeric feature from the hospitals' noisy sums.

        The mean and second moment of ``u`` come from the summed sums over the summed
        count; estimates are clipped to what a variable within the range can have. A
        variance is trusted only above the noise on it: below one standard deviation of
        that noise (``sigma * sqrt(hospitals) / (W * count)``, known to everyone) or below
        :data:`SCALE_FLOOR`, it becomes that floor. Noise can make an estimate tiny or
        negative, and a tiny scale would blow its feature up to dominate every input
        (breast-cancer, 5 hospitals: a tenth of the scales came out at a third of the true
        deviation or less without this floor, none with it). Everything here is
        post-processing of DP releases: it costs no privacy.
        """
        if not releases:
            raise ConfigError("no hospital released feature statistics")
        total = np.sum(np.stack(releases), axis=0)
        d = len(self.names)
        patients = float(total[0] / COUNT_WEIGHT)
        n = max(patients, 1.0)
        mean = np.clip(total[1 : 1 + d] / n, -0.5, 0.5)
        second = np.clip(total[1 + d :] / (SQUARE_WEIGHT * n) + 0.125, 0.0, 0.25)
        variance = second - mean**2
        noise_floor = self.sigma * math.sqrt(len(releases)) / (SQUARE_WEIGHT * n)
        floor = min(max(SCALE_FLOOR**2, noise_floor), SCALE_CEILING**2)
        floored = variance < floor
        std = np.sqrt(np.clip(variance, floor, SCALE_CEILING**2))
        reference = {}
        for j, (name, (low, high)) in enumerate(zip(self.names, self.bounds, strict=True)):
            span = high - low
            reference[name] = (float(low + (mean[j] + 0.5) * span), float(std[j] * span))
        return Combined(
            reference=reference,
            patients=patients,
            floored=tuple(n for n, f in zip(self.names, floored, strict=True) if f),
        )
