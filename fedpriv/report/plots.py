"""The report's figures, each returned as an embeddable PNG data URL (or None: nothing to draw).

Fixes what readers tripped on: rounds are whole numbers on every axis; hospitals whose
epsilon curves coincide share one line and one legend entry; ROC curves stop at the false-
positive rate the non-members can resolve and shade what lies below it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_plot", "epsilon_plot", "png", "roc_plot"]

#: at most this many legend entries; more hospitals are drawn as a band
_LEGEND_MAX = 5


def png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _whole_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def accuracy_plot(rows: Sequence[Mapping[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    rounds = [int(r["round"]) for r in rows if isinstance(r.get("round"), int)]
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    drawn = False
    for key, label in (
        ("eval_accuracy", "held-out at the hospitals (federated)"),
        ("test_accuracy", "central test split"),
    ):
        points = sorted(_accuracy_points(rows, key).items())
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    _whole_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def _accuracy_points(rows: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    """``key`` by the round whose model it describes: a row's federated evaluation may be of
    the model its hospitals received (``evaluated_round``), and the last row may carry the
    round before's (``previous_evaluation``)."""
    points: dict[int, float] = {}
    for row in rows:
        if not isinstance(row.get("round"), int):
            continue
        earlier = row.get("previous_evaluation")
        if key == "eval_accuracy" and isinstance(earlier, Mapping):
            value, at = earlier.get(key), earlier.get("round")
            if isinstance(value, int | float) and isinstance(at, int | float):
                points[int(at)] = float(value)
        value = row.get(key)
        if isinstance(value, int | float):
            at = row.get("evaluated_round", row["round"]) if key == "eval_accuracy" else None
            points[int(at if isinstance(at, int | float) else row["round"])] = float(value)
    return points


def _groups(series: Mapping[str, list[tuple[int, float]]]) -> list[tuple[list[str], list]]:
    """Hospitals with the same curve (to 1e-9) as one group, in name order."""
    groups: list[tuple[list[str], list[tuple[int, float]]]] = []
    for hospital, points in sorted(series.items()):
        for names, shared in groups:
            if len(shared) == len(points) and all(
                a[0] == b[0] and abs(a[1] - b[1]) <= 1e-9
                for a, b in zip(shared, points, strict=True)
            ):
                names.append(hospital)
                break
        else:
            groups.append(([hospital], points))
    return groups


def _label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} ... {names[-1]} ({len(names)} hospitals, same curve)"


def epsilon_plot(rows: Sequence[Mapping[str, Any]], *, cap: float | None = None) -> str | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for hospital, eps in (row.get("epsilon") or {}).items():
            if isinstance(eps, int | float) and isinstance(row.get("round"), int):
                series.setdefault(str(hospital), []).append((int(row["round"]), float(eps)))
    if not series:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    groups = _groups(series)
    if len(groups) <= _LEGEND_MAX:
        for names, points in groups:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=_label(names))
    else:
        rounds = sorted({p[0] for points in series.values() for p in points})
        table = np.full((len(series), len(rounds)), np.nan)
        for i, points in enumerate(series.values()):
            for r, eps in points:
                table[i, rounds.index(r)] = eps
        ax.fill_between(
            rounds,
            np.nanmin(table, axis=0),
            np.nanmax(table, axis=0),
            alpha=0.3,
            label=f"range over {len(series)} hospitals",
        )
        ax.plot(rounds, np.nanmax(table, axis=0), marker=".", label="largest")
    if cap is not None and math.isfinite(cap):
        ax.axhline(cap, color="firebrick", linestyle="--", label=f"lifetime cap {cap:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("largest patient epsilon")
    _whole_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def roc_plot(attacks: Mapping[str, Mapping[str, Any]], *, non_members: int) -> str | None:
    """Log-log ROC per attack. Below 1/non_members no FPR can be measured: that band is
    shaded and labelled, and the axis stops a little below it instead of at 1e-4."""
    curves = {n: e["roc"] for n, e in attacks.items() if isinstance(e.get("roc"), dict)}
    if not curves or non_members < 1:
        return None
    import matplotlib.pyplot as plt

    resolvable = 1.0 / non_members
    floor = resolvable / 3
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    for name, roc in curves.items():
        fpr = np.maximum(np.asarray(roc.get("fpr", []), dtype=float), floor)
        tpr = np.maximum(np.asarray(roc.get("tpr", []), dtype=float), floor)
        if fpr.size:
            ax.plot(fpr, tpr, label=f"{name} (AUC {float(attacks[name]['auc']):.3f})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", label="guessing")
    ax.axvspan(
        floor, resolvable, color="grey", alpha=0.2, label=f"FPR < 1/{non_members}: not resolvable"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png(fig)
