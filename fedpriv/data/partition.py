"""Partitioners: how the pooled records are shared out among hospitals.

A partitioner takes the labels (and sites, when the data has them) of the pooled records and
returns one array of positions per hospital. The arrays are disjoint and together cover every
position; :func:`fedpriv.data.splits.make_split` checks both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fedpriv.errors import DataError

__all__ = [
    "Partitioner",
    "available_partitioners",
    "create_partitioner",
    "register_partitioner",
]

#: A hospital needs one record to train on and one to hold out.
MIN_RECORDS_PER_HOSPITAL = 2
_DIRICHLET_DRAWS = 100


class Partitioner(Protocol):
    def __call__(
        self,
        labels: np.ndarray,
        *,
        sites: np.ndarray | None,
        num_hospitals: int,
        rng: np.random.Generator,
    ) -> list[np.ndarray]: ...


_REGISTRY: dict[str, Callable[..., list[np.ndarray]]] = {}


def register_partitioner(
    name: str,
) -> Callable[[Callable[..., list[np.ndarray]]], Callable[..., list[np.ndarray]]]:
    def decorator(fn: Callable[..., list[np.ndarray]]) -> Callable[..., list[np.ndarray]]:
        if name in _REGISTRY:
            raise ValueError(f"partitioner '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_partitioners() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def create_partitioner(name: str, **params: Any) -> Partitioner:
    """The partitioner ``name`` with its parameters (``alpha``, ``classes_per_hospital``) bound."""
    if name not in _REGISTRY:
        raise DataError(
            f"unknown partition '{name}': use one of {', '.join(available_partitioners())}"
        )
    return functools.partial(_REGISTRY[name], **params)


@register_partitioner("iid")
def iid(
    labels: np.ndarray,
    *,
    sites: np.ndarray | None,
    num_hospitals: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Uniformly at random, sizes differing by at most one."""
    order = rng.permutation(labels.shape[0])
    return [np.sort(part) for part in np.array_split(order, num_hospitals)]


@register_partitioner("dirichlet")
def dirichlet(
    labels: np.ndarray,
    *,
    sites: np.ndarray | None,
    num_hospitals: int,
    rng: np.random.Generator,
    alpha: float,
) -> list[np.ndarray]:
    """Per class, shares drawn from Dirichlet(alpha); small alpha means skewed hospitals.

    Redraws (up to 100 times) until every hospital has at least two records.
    """
    if alpha <= 0:
        raise DataError(f"alpha must be > 0 (got {alpha})")
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_hospitals)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_hospitals, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(p.size for p in result) >= MIN_RECORDS_PER_HOSPITAL:
            return result
    raise DataError(
        f"Dirichlet(alpha={alpha}) left a hospital with fewer than "
        f"{MIN_RECORDS_PER_HOSPITAL} records in {_DIRICHLET_DRAWS} draws: raise --alpha or "
        "use fewer hospitals"
    )


@register_partitioner("label-skew")
def label_skew(
    labels: np.ndarray,
    *,
    sites: np.ndarray | None,
    num_hospitals: int,
    rng: np.random.Generator,
    classes_per_hospital: int,
) -> list[np.ndarray]:
    """Each hospital sees only ``classes_per_hospital`` classes; every class is held by someone.

    A class's records are shared evenly among the hospitals that hold it.
    """
    classes = np.unique(labels)
    n_classes = classes.size
    if classes_per_hospital > n_classes:
        raise DataError(
            f"classes-per-hospital is {classes_per_hospital} but the data has only "
            f"{n_classes} classes"
        )
    if num_hospitals * classes_per_hospital < n_classes:
        raise DataError(
            f"label-skew with {num_hospitals} hospitals x {classes_per_hospital} classes "
            f"covers only {num_hospitals * classes_per_hospital} of {n_classes} classes: "
            "raise --classes-per-hospital or --hospitals"
        )
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for k in range(num_hospitals):
        for j in range(classes_per_hospital):
            holders[int(order[(k * classes_per_hospital + j) % n_classes])].append(k)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_hospitals)]
    for c, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        for owner, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[owner].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


@register_partitioner("natural")
def natural(
    labels: np.ndarray,
    *,
    sites: np.ndarray | None,
    num_hospitals: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One hospital per value of the site column, in sorted order of the site names."""
    if sites is None:
        raise DataError(
            "partition 'natural' needs a site column: give a .csv with one and name it with "
            "--site-column"
        )
    names = np.unique(sites)
    if names.size != num_hospitals:
        raise DataError(
            f"the site column has {names.size} sites but --hospitals is {num_hospitals}: "
            f"set --hospitals {names.size}"
        )
    return [np.flatnonzero(sites == name) for name in names]


def site_names(sites: np.ndarray) -> list[str]:
    """Hospital names for the natural partition, in the order :func:`natural` uses."""
    return [str(s) for s in np.unique(sites)]
