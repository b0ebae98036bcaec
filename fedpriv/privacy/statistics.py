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

A minority of hospitals may lie (threat model). The server rejects a release that no
records within the public ranges could have produced, by more than its own noise explains
(:meth:`StatisticsMechanism.implausible`), and caps every accepted release's weight at
:data:`WEIGHT_CAP` times the median count (:meth:`StatisticsMechanism.combine`). The
guarantee: among ``k`` accepted releases, one liar's share ``a`` of the weight is at most
``cap / (cap + ceil(k/2) - 1)`` (:func:`influence_bound`: 2/3 at k = 3, 1/2 at k = 5, 1/3
at k = 10 with the cap of 2), because at least ``ceil(k/2) - 1`` honest hospitals count at
least the median and none of them is capped below it. Every centre is then ``(1 - a) c_H + a
m_L`` with ``c_H`` the honest hospitals' weighted mean and ``m_L`` the liar's, so the liar
moves a centre by at most ``a`` times the public range (plus, for a release that oversteps
the range within its noise allowance, six of that noise's deviations over the total count),
and a scale stays within ``sqrt(1 - a)`` times and ``sqrt(s_H^2 + a)`` of the honest one (in
range units: the mixture's variance). Neither the checks nor the cap touch what a hospital
releases: they are post-processing of DP releases and cost no privacy. A majority of liars
is out of scope (the median is theirs); the combination still ends in a centre within the
range and a scale within the floor and ceiling.
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
    "PLAUSIBLE_Z",
    "SCALE_FLOOR",
    "SQUARE_WEIGHT",
    "STATISTICS_ROUND",
    "STATS_EPSILON",
    "STATS_NOISE",
    "STATS_SENSITIVITY",
    "STATS_SUMS",
    "WEIGHT_CAP",
    "Combined",
    "StatisticsMechanism",
    "influence_bound",
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
#: how many standard deviations of a release's own noise its sums may stray beyond what the
#: public ranges allow before the server rejects it as implausible (an honest release
#: strays that far with probability ~1e-9 per check, even for a feature constant at an edge)
PLAUSIBLE_Z = 6.0
#: no hospital weighs more in the combination than this many times the median hospital's
#: noisy count (chosen by measurement: benchmarks/robust_statistics.py, BENCHMARKS.md)
WEIGHT_CAP = 2.0


def influence_bound(hospitals: int, cap: float = WEIGHT_CAP) -> float:
    """The largest share of the combination's weight one hospital can take among
    ``hospitals`` accepted releases, whatever it claims (see :meth:`StatisticsMechanism.combine`):
    ``cap / (cap + ceil(k / 2) - 1)`` for ``cap >= 1`` and a median count of at least one
    patient; 1.0 (no bound) for fewer than three hospitals."""
    others = math.ceil(hospitals / 2) - 1
    if others < 1 or not math.isfinite(cap):
        return 1.0
    return cap / (cap + others)


@dataclasses.dataclass(frozen=True)
class Combined:
    """What the server made of the hospitals' releases."""

    #: feature name -> (centre, scale), numeric features of the schema in its order
    reference: dict[str, tuple[float, float]]
    #: the noisy count of patients over all hospitals that released (a figure, not exact)
    patients: float
    #: features whose variance estimate fell below the floor (noise, or a constant feature)
    floored: tuple[str, ...] = ()
    #: each release's share of the combination's weight, in the order given
    shares: tuple[float, ...] = ()
    #: positions (in the order given) of the releases whose weight the cap lowered
    capped: tuple[int, ...] = ()

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
        """A release as the server receives it: numbers, the right length, finite (else
        refused). Whether they are plausible is :meth:`implausible`'s question."""
        try:
            vector = np.asarray([float(v) for v in sums], dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{who} sent statistics that are not a list of numbers") from None
        if vector.shape != (self.width,):
            raise ConfigError(f"{who} sent {vector.size} statistics, expected {self.width} numbers")
        if not np.all(np.isfinite(vector)):
            raise ConfigError(f"{who} sent non-finite statistics (NaN or infinity)")
        return vector

    def implausible(self, vector: np.ndarray) -> str:
        """Why a well-formed release (:meth:`check`) cannot come from records within the
        public ranges, or "" when it can. Each test is linear in the release, so its noise
        has a known standard deviation ``s`` (from ``sigma``); a release fails when it
        oversteps the range's limit by more than :data:`PLAUSIBLE_Z` times ``s``:

        - the count: ``C n`` below ``-Z sigma`` (fewer than no patients);
        - a feature's sum: ``|sum u|`` above ``n / 2`` (its mean outside ``[min, max]``);
        - a feature's squares: ``sum u^2`` outside ``[0, n / 4]`` (a variance no variable
          within the range can have, or a negative one).
        """
        d = len(self.names)
        count = float(vector[0])
        if count < -PLAUSIBLE_Z * self.sigma:
            return f"its count ({count / COUNT_WEIGHT:.4g} patients) is negative beyond its noise"
        half = count / (2.0 * COUNT_WEIGHT)
        slack = PLAUSIBLE_Z * self.sigma * math.sqrt(1.0 + 1.0 / (4.0 * COUNT_WEIGHT**2))
        over = np.abs(vector[1 : 1 + d]) - half - slack
        if np.any(over > 0):
            j = int(np.argmax(over))
            n = max(count / COUNT_WEIGHT, 1.0)
            low, high = self.bounds[j]
            mean = low + (float(vector[1 + j]) / n + 0.5) * (high - low)
            return (
                f"its mean of '{self.names[j]}' ({mean:.4g} over {count / COUNT_WEIGHT:.4g} "
                f"patients) lies outside the public range [{low:g}, {high:g}] by more than "
                "its noise explains"
            )
        eighth = count / (8.0 * COUNT_WEIGHT)
        slack = (
            PLAUSIBLE_Z
            * self.sigma
            * math.sqrt(1.0 / SQUARE_WEIGHT**2 + 1.0 / (64.0 * COUNT_WEIGHT**2))
        )
        over = np.abs(vector[1 + d :] / SQUARE_WEIGHT) - eighth - slack
        if np.any(over > 0):
            j = int(np.argmax(over))
            low, high = self.bounds[j]
            return (
                f"its squares of '{self.names[j]}' imply a variance that no values within the "
                f"public range [{low:g}, {high:g}] can have (beyond its noise)"
            )
        return ""

    def combine(self, releases: Sequence[np.ndarray], *, cap: float = WEIGHT_CAP) -> Combined:
        """Centre and scale per numeric feature from the hospitals' noisy sums.

        Each release weighs its noisy count, but none more than ``cap`` times the median
        count (the upper median of the releases given): a release above that is scaled
        down whole (count, sums and squares alike, so its means stay its own). Honest
        hospitals of similar sizes are never capped, and then the result is the pooled
        estimate (the sums added up). ``cap = inf``: no cap (the pooled estimate always).

        The mean and second moment of ``u`` come from the summed sums over the summed
        count; estimates are clipped to what a variable within the range can have. A
        variance is trusted only above the noise on it: below one standard deviation of
        that noise (``sigma * sqrt(sum of the releases' squared scale factors) / (W *
        count)``, known to everyone) or below :data:`SCALE_FLOOR`, it becomes that floor.
        Noise can make an estimate tiny or negative, and a tiny scale would blow its feature
        up to dominate every input (breast-cancer, 5 hospitals: a tenth of the scales came
        out at a third of the true deviation or less without this floor, none with it).
        Everything here is post-processing of DP releases: it costs no privacy.
        """
        if not releases:
            raise ConfigError("no hospital released feature statistics")
        stack = np.stack(releases)
        counts = stack[:, 0] / COUNT_WEIGHT
        factor = np.ones(len(releases))
        if math.isfinite(cap):
            median = float(np.sort(counts)[len(releases) // 2])
            ceiling = cap * max(median, 1.0)
            over = counts > ceiling
            factor[over] = ceiling / counts[over]
        total = np.sum(stack * factor[:, None], axis=0)
        weights = np.maximum(counts * factor, 0.0)
        shares = weights / weights.sum() if weights.sum() > 0 else np.zeros(len(releases))
        d = len(self.names)
        patients = float(total[0] / COUNT_WEIGHT)
        n = max(patients, 1.0)
        mean = np.clip(total[1 : 1 + d] / n, -0.5, 0.5)
        second = np.clip(total[1 + d :] / (SQUARE_WEIGHT * n) + 0.125, 0.0, 0.25)
        variance = second - mean**2
        noise_floor = self.sigma * math.sqrt(float(np.sum(factor**2))) / (SQUARE_WEIGHT * n)
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
            shares=tuple(float(w) for w in shares),
            capped=tuple(int(i) for i in np.flatnonzero(factor < 1.0)),
        )
