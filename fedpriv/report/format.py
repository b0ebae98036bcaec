"""How the report writes numbers: floats to 3 places, probabilities such as delta in full
(1e-05, never 0.000), yes/no for booleans, a dash for nothing."""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["fmt", "fmt_small"]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "-"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def fmt_small(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return html.escape(str(value))
