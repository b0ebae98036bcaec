"""Who holds which record: a central test split plus, per hospital, training and held-out records.

Training records are the *members* (what DP protects and what audits probe); held-out records
are *non-members*, used for federated evaluation and as the audit's reference population.
Everything is a deterministic function of the dataset and the seed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpriv.config import RunConfig
from fedpriv.data.datasets import Dataset, load_dataset, load_key, with_feature_statistics
from fedpriv.data.partition import MIN_RECORDS_PER_HOSPITAL, create_partitioner, site_names
from fedpriv.data.schema import check_schema_digest, load_schema
from fedpriv.errors import DataError

__all__ = [
    "Canary",
    "FederatedSplit",
    "HospitalSplit",
    "dataset_for",
    "make_split",
    "split_for",
]


@dataclasses.dataclass(frozen=True, eq=False)
class HospitalSplit:
    name: str
    train: np.ndarray
    held_out: np.ndarray

    @property
    def size(self) -> int:
        return int(self.train.size + self.held_out.size)


@dataclasses.dataclass(frozen=True)
class Canary:
    """A mislabelled copy of record ``index`` planted at ``hospital`` if ``included``."""

    index: int
    hospital: int
    label: int
    included: bool


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedSplit:
    hospitals: tuple[HospitalSplit, ...]
    test: np.ndarray
    canaries: tuple[Canary, ...] = ()

    def canaries_of(self, hospital: int) -> list[Canary]:
        return [c for c in self.canaries if c.hospital == hospital and c.included]

    def to_json(self) -> dict[str, Any]:
        return {
            "hospitals": [
                {
                    "hospital": k,
                    "name": h.name,
                    "train": h.train.tolist(),
                    "held_out": h.held_out.tolist(),
                }
                for k, h in enumerate(self.hospitals)
            ],
            "test": self.test.tolist(),
            "canaries": [dataclasses.asdict(c) for c in self.canaries],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FederatedSplit:
        try:
            hospitals = tuple(
                HospitalSplit(
                    name=str(h["name"]),
                    train=np.asarray(h["train"], dtype=np.int64),
                    held_out=np.asarray(h["held_out"], dtype=np.int64),
                )
                for h in data["hospitals"]
            )
            test = np.asarray(data["test"], dtype=np.int64)
            canaries = tuple(
                Canary(
                    index=int(c["index"]),
                    hospital=int(c["hospital"]),
                    label=int(c["label"]),
                    included=bool(c["included"]),
                )
                for c in data.get("canaries", [])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"partitions.json is malformed: {exc}") from None
        return cls(hospitals=hospitals, test=test, canaries=canaries)

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def make_split(
    dataset: Dataset,
    *,
    num_hospitals: int,
    partition: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_hospital: int = 2,
    held_out_fraction: float = 0.2,
    test_fraction: float = 0.2,
    canaries: int = 0,
) -> FederatedSplit:
    """Test split, then canary sources (if any), then the hospitals' shares of the rest.

    Canaries (Steinke et al.'s one-run audit) are records taken out of everyone's data,
    given a wrong label and planted at a hospital with probability 1/2 each; they are never
    held out or tested on, so no accuracy figure counts them.
    """
    rng = np.random.default_rng(seed)
    n = len(dataset)
    if dataset.test_indices is not None:
        test = np.sort(dataset.test_indices.astype(np.int64))
    elif dataset.source.patient_ids is not None:  # whole patients, never half of one
        everyone = _patients_of(dataset, np.arange(n, dtype=np.int64))
        firsts = np.array([members[0] for members in everyone], dtype=np.int64)
        chosen = _stratified_sample(dataset.labels[firsts], test_fraction, rng)
        test = np.sort(np.concatenate([everyone[p] for p in chosen] or [np.empty(0, np.int64)]))
    else:
        test = _stratified_sample(dataset.labels, test_fraction, rng)
    pool = np.setdiff1d(np.arange(n, dtype=np.int64), test, assume_unique=True)
    canary_sources = np.empty(0, dtype=np.int64)
    if canaries:
        if dataset.num_classes < 2:
            raise DataError("canaries need at least two classes to mislabel")
        if canaries > pool.size // 2:
            raise DataError(
                f"{canaries} canaries would take more than half of the {pool.size} records: "
                "use fewer --canaries"
            )
        canary_rng = np.random.default_rng([seed, 0xCA1A])
        canary_sources = np.sort(canary_rng.choice(pool, size=canaries, replace=False))
        pool = np.setdiff1d(pool, canary_sources, assume_unique=True)
    needed = num_hospitals * MIN_RECORDS_PER_HOSPITAL
    if pool.size < needed:
        raise DataError(
            f"{num_hospitals} hospitals need at least {needed} records (one to train on and "
            f"one to hold out each) but only {pool.size} are left after the test split: "
            "use fewer hospitals"
        )
    params: dict[str, Any] = {}
    if partition == "dirichlet":
        params["alpha"] = alpha
    elif partition == "label-skew":
        params["classes_per_hospital"] = classes_per_hospital
    partitioner = create_partitioner(partition, **params)
    # the unit handed out is a patient: all of a patient's records go to one hospital and
    # one side of its split (each record is its own patient without a patient column)
    patients = _patients_of(dataset, pool)
    firsts = np.array([members[0] for members in patients], dtype=np.int64)
    sites = dataset.sites[firsts] if dataset.sites is not None else None
    parts = partitioner(dataset.labels[firsts], sites=sites, num_hospitals=num_hospitals, rng=rng)
    _check_partition(parts, firsts.size, num_hospitals)
    if partition == "natural" and sites is not None:
        names = site_names(sites)
    else:
        names = [f"hospital-{k}" for k in range(num_hospitals)]
    hospitals = []
    for name, local in zip(names, parts, strict=True):
        order = rng.permutation(np.asarray(local, dtype=np.int64))
        if order.size < MIN_RECORDS_PER_HOSPITAL:
            raise DataError(
                f"{name} is left with {order.size} patient(s) but needs at least "
                f"{MIN_RECORDS_PER_HOSPITAL}: use fewer hospitals or a less skewed partition"
            )
        n_held = min(max(1, round(order.size * held_out_fraction)), order.size - 1)
        hospitals.append(
            HospitalSplit(
                name=name,
                train=np.sort(np.concatenate([patients[p] for p in order[n_held:]])),
                held_out=np.sort(np.concatenate([patients[p] for p in order[:n_held]])),
            )
        )
    planted = []
    if canaries:
        canary_rng = np.random.default_rng([seed, 0xCA1A, 1])
        for j, index in enumerate(canary_sources):
            true = int(dataset.labels[index])
            wrong = (true + int(canary_rng.integers(1, dataset.num_classes))) % dataset.num_classes
            planted.append(
                Canary(
                    index=int(index),
                    hospital=j % num_hospitals,
                    label=wrong,
                    included=bool(canary_rng.integers(0, 2)),
                )
            )
    return FederatedSplit(hospitals=tuple(hospitals), test=test, canaries=tuple(planted))


def _patients_of(dataset: Dataset, pool: np.ndarray) -> list[np.ndarray]:
    """The records of ``pool`` grouped by patient, in order of first appearance."""
    ids = dataset.source.patient_ids
    if ids is None:
        return [np.array([i], dtype=np.int64) for i in pool]
    groups: dict[str, list[int]] = {}
    for i in pool:
        groups.setdefault(str(ids[i]).strip(), []).append(int(i))
    return [np.array(members, dtype=np.int64) for members in groups.values()]


def _load_arguments(config: RunConfig) -> dict[str, Any]:
    return {
        "label_column": config.label_column,
        "site_column": config.site_column,
        "patient_column": config.patient_column,
        "schema": load_schema(config.schema) if config.schema else None,
        "normalisation": config.normalisation,
    }


def loaded_for(config: RunConfig) -> dict[tuple[str, ...], Dataset]:
    """The run's dataset as loaded (before any federated statistics), by its load key:
    what a simulation hands its workers (fedpriv.data.handoff). Cached: no second read."""
    arguments = _load_arguments(config)
    return {load_key(config.dataset, **arguments): load_dataset(config.dataset, **arguments)}


def dataset_for(config: RunConfig) -> Dataset:
    """The run's dataset, normalised as the run says (by its schema, or by the statistics
    the hospitals released under DP: the same transformation every hospital applies, never
    a statistic computed over the hospitals' records)."""
    dataset = load_dataset(config.dataset, **_load_arguments(config))
    check_schema_digest(config.schema_digest, dataset.schema, who=f"'{config.dataset}'")
    if config.normalisation == "federated":  # the hospitals' combined statistics, if any yet
        dataset = with_feature_statistics(dataset, config.feature_statistics)
    return dataset


def split_for(config: RunConfig) -> tuple[Dataset, FederatedSplit]:
    """The dataset and split a run configuration describes."""
    dataset = dataset_for(config)
    split = make_split(
        dataset,
        num_hospitals=config.hospitals,
        partition=config.partition,
        seed=config.seed,
        alpha=config.alpha,
        classes_per_hospital=config.classes_per_hospital,
        held_out_fraction=config.held_out_fraction,
        test_fraction=config.test_fraction,
        canaries=config.canaries,
    )
    return dataset, split


def _stratified_sample(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = min(round(members.size * fraction), members.size - 1)
        chosen.append(members[: max(take, 0)])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_partition(parts: Sequence[np.ndarray], size: int, num_hospitals: int) -> None:
    # A partitioner bug must never silently duplicate or drop a record.
    if len(parts) != num_hospitals:
        raise RuntimeError(f"partitioner returned {len(parts)} parts for {num_hospitals}")
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if joined.size != size or np.unique(joined).size != size:
        raise RuntimeError("partitioner returned overlapping or incomplete parts")
