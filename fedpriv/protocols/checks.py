"""The server trusts nothing it is told: every reply is checked against the global model.

A contribution is refused, with a log line naming the hospital, when its arrays are not the
global model's (names, shapes, dtypes), hold a NaN, an infinity or an absurd value, move the
model much further than the round's other hospitals do, or when its claimed example count is
not a positive integer within the cap (the run's ``max-examples``, or what the hospital
declared before round 1). One hospital's bad reply never reaches the aggregate, and never
fails the round for the others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

__all__ = ["Limits", "Rejected", "check_arrays", "check_count", "outlying_norms"]

#: no weight or update of a model fedpriv trains is anywhere near this (float32 reaches 3e38)
MAX_MAGNITUDE = 1e6
#: an update more than this many times the round's median norm is refused (with >= 3 updates)
NORM_FACTOR = 10.0


class Rejected(Exception):
    """A contribution that must not reach the aggregate; the message says why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts: the most examples any hospital may claim, and what each
    hospital declared before round 1 (``declared``; a claim above it is refused), with the
    patients those examples belong to (``patients``; a hospital missing there holds one
    record per patient)."""

    max_examples: int = 1_000_000
    declared: Mapping[str, int] = dataclasses.field(default_factory=dict)
    patients: Mapping[str, int] = dataclasses.field(default_factory=dict)


def check_count(hospital: str, claimed: Any, limits: Limits) -> int:
    """The claimed example count as an int, or Rejected."""
    if isinstance(claimed, bool) or not isinstance(claimed, int | float | np.integer | np.floating):
        raise Rejected(f"example count {claimed!r} is not a number")
    value = float(claimed)
    if not math.isfinite(value) or not value.is_integer():
        raise Rejected(f"example count {claimed!r} is not a whole number")
    count = int(value)
    if count < 1:
        raise Rejected(f"example count {count} is not positive")
    cap = min(limits.max_examples, limits.declared.get(hospital, limits.max_examples))
    if count > cap:
        why = "declared before round 1" if hospital in limits.declared else "max-examples"
        raise Rejected(f"claims {count} examples, more than the {cap} allowed ({why})")
    return count


def check_arrays(arrays: ArrayRecord, reference: ArrayRecord) -> dict[str, np.ndarray]:
    """The contribution's arrays if they are exactly the global model's (names, shapes,
    dtypes) and hold finite, bounded values; Rejected otherwise."""
    names = list(reference.keys())
    if list(arrays.keys()) != names:
        extra = sorted(set(arrays.keys()) - set(names))
        missing = sorted(set(names) - set(arrays.keys()))
        detail = "; ".join(
            part
            for part in (
                f"unexpected {extra[:3]}" if extra else "",
                f"missing {missing[:3]}" if missing else "",
                "in another order" if not extra and not missing else "",
            )
            if part
        )
        raise Rejected(f"its arrays are not the model's ({detail})")
    out: dict[str, np.ndarray] = {}
    for name in names:
        expected = reference[name].numpy()
        try:
            value = arrays[name].numpy()
        except Exception as exc:  # a malformed Array cannot be read at all
            raise Rejected(f"array '{name}' cannot be read ({type(exc).__name__})") from None
        if value.shape != expected.shape:
            raise Rejected(
                f"array '{name}' has shape {value.shape}, the model's is {expected.shape}"
            )
        if value.dtype != expected.dtype:
            raise Rejected(f"array '{name}' is {value.dtype}, the model's is {expected.dtype}")
        if not np.all(np.isfinite(value)):
            raise Rejected(f"array '{name}' holds NaN or infinite values")
        if value.size and float(np.max(np.abs(value))) > MAX_MAGNITUDE:
            raise Rejected(f"array '{name}' holds values beyond {MAX_MAGNITUDE:g}")
        out[name] = value
    return out


def outlying_norms(norms: Sequence[float]) -> list[int]:
    """Which updates move the model more than ``NORM_FACTOR`` times the median does (with at
    least three updates, so no single hospital sets the median)."""
    if len(norms) < 3:
        return []
    median = float(np.median(norms))
    bound = NORM_FACTOR * max(median, 1e-12)
    return [i for i, n in enumerate(norms) if n > bound]


def update_norm(values: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    return float(
        math.sqrt(
            sum(
                float(
                    np.sum(
                        np.square(values[k].astype(np.float64) - reference[k].astype(np.float64))
                    )
                )
                for k in reference
            )
        )
    )
