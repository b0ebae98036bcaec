"""Per-patient spend from a ledger's events: which events each patient was in, and the epsilon.

A *version* is a set of patients (what one DP event could have touched); an event points to
one. A patient's history is every event whose version contains it, so patients who were in
the same versions share one history: they form a *group*, and the epsilon is computed once
per group. The fast bound is a sum of cached RDP curves (a matrix product over groups and
versions); the exact accountant is asked only where the fast bound is not enough.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from fedpriv.privacy.accounting import (
    RDP_ORDERS,
    DpEvent,
    compose_epsilon,
    epsilon_from_rdp,
    merge_events,
)

__all__ = [
    "Groups",
    "Version",
    "decode_members",
    "encode_members",
    "group_patients",
    "history_key",
]

Curve = Callable[[float, float], np.ndarray]


def encode_members(pids: np.ndarray) -> bytes:
    """A set of patient ids as a compressed bitmap (ids are small dense integers)."""
    if pids.size == 0:
        return zlib.compress(b"")
    bits = np.zeros(int(pids.max()) + 1, dtype=bool)
    bits[pids] = True
    return zlib.compress(np.packbits(bits).tobytes(), 6)


def decode_members(blob: bytes) -> np.ndarray:
    """The bitmap as a boolean array indexed by patient id (shorter than the largest id is
    fine: missing bits are 0)."""
    return np.unpackbits(np.frombuffer(zlib.decompress(blob), dtype=np.uint8)).astype(bool)


@dataclasses.dataclass(frozen=True, eq=False)
class Version:
    vid: int
    members: np.ndarray  # bool, indexed by pid
    everyone: bool = False  # events migrated from a ledger that did not know patients

    def contains(self, pids: np.ndarray) -> np.ndarray:
        if self.everyone:
            return np.ones(pids.shape, dtype=bool)
        inside = pids < self.members.size
        out = np.zeros(pids.shape, dtype=bool)
        out[inside] = self.members[pids[inside]]
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Groups:
    """Patients with the same history. ``of[i]`` is the group of ``pids[i]``;
    ``histories[g]`` the merged mechanisms of group ``g``; ``rdp[g]`` its RDP curve."""

    pids: np.ndarray
    of: np.ndarray
    histories: list[tuple[tuple[float, float, int], ...]]
    rdp: np.ndarray

    def fast_epsilon(self, delta: float, extra: np.ndarray | None = None) -> np.ndarray:
        curves = self.rdp if extra is None else self.rdp + extra[None, :]
        return np.array([epsilon_from_rdp(c, delta) for c in curves])

    def sizes(self) -> np.ndarray:
        return np.bincount(self.of, minlength=len(self.histories))


def history_key(history: Iterable[tuple[float, float, int]]) -> str:
    """A stable text key of a merged history (the exact-epsilon cache's key)."""
    return ";".join(f"{sigma!r},{q!r},{steps}" for sigma, q, steps in history)


def group_patients(
    pids: np.ndarray,
    versions: Sequence[Version],
    events: Sequence[tuple[int, DpEvent]],
    curve: Curve,
) -> Groups:
    """Group ``pids`` by the versions (with events) they belong to."""
    with_events = sorted({vid for vid, _ in events})
    by_vid = {v.vid: v for v in versions}
    used = [by_vid[vid] for vid in with_events if vid in by_vid]
    pids = np.asarray(pids, dtype=np.int64)
    if not used or pids.size == 0:
        return Groups(
            pids=pids,
            of=np.zeros(pids.size, dtype=np.int64),
            histories=[()],
            rdp=np.zeros((1, RDP_ORDERS.size)),
        )
    matrix = np.stack([v.contains(pids) for v in used], axis=1)
    packed = np.packbits(matrix, axis=1)
    rows, of = np.unique(packed, axis=0, return_inverse=True)
    membership = np.unpackbits(rows, axis=1, count=len(used)).astype(bool)
    per_version: dict[int, list[DpEvent]] = {}
    for vid, event in events:
        per_version.setdefault(vid, []).append(event)
    version_rdp = np.stack([_rdp([*per_version[v.vid]], curve) for v in used], axis=0)
    histories = [
        merge_events(e for j, v in enumerate(used) if member[j] for e in per_version[v.vid])
        for member in membership
    ]
    return Groups(
        pids=pids,
        of=of.reshape(-1).astype(np.int64),
        histories=histories,
        rdp=membership.astype(np.float64) @ version_rdp,
    )


def _rdp(events: list[DpEvent], curve: Curve) -> np.ndarray:
    total = np.zeros(RDP_ORDERS.size)
    for sigma, q, steps in merge_events(events):
        total = total + steps * curve(sigma, q)
    return total


def exact_epsilon(
    history: tuple[tuple[float, float, int], ...], *, delta: float, accountant: str
) -> float:
    return compose_epsilon(
        [DpEvent(sigma, q, steps) for sigma, q, steps in history],
        delta=delta,
        accountant=accountant,
    )
