"""The report's picture of the inversion audit: records beside their reconstructions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def figure(entry: Mapping[str, Any]) -> Any:
    """A matplotlib figure of ``audit.json``'s ``attacks.inversion`` entry: one column per
    shown record; rows: the record, the reconstruction (its PSNR above), the public records'
    mean of its class, a random public record of its class. None for tables (no images)."""
    shown = entry.get("images") or []
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = entry.get("value_range", [0.0, 1.0])
    rows = (
        ("original", "record"),
        ("reconstruction", "rebuilt"),
        ("class-mean", "class mean"),
        ("random", "random"),
    )
    fig, axes = plt.subplots(
        len(rows), len(shown), figsize=(1.2 * len(shown) + 0.6, 1.2 * len(rows)), squeeze=False
    )
    per_record = {r["index"]: r for r in entry.get("records_attacked", [])}
    for j, item in enumerate(shown):
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            picture = np.asarray(item[key], dtype=np.float64)
            if picture.ndim == 3:
                picture = picture[0] if picture.shape[0] == 1 else np.moveaxis(picture, 0, -1)
            picture = np.clip((picture - low) / max(high - low, 1e-12), 0, 1)
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == 1 and item["index"] in per_record and "psnr" in per_record[item["index"]]:
                ax.set_title(f"{per_record[item['index']]['psnr']:.1f} dB", fontsize=7)
    fig.tight_layout()
    return fig
