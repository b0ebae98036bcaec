"""Generated public data sets for the DP recipe search and the privacy-utility table.

    python benchmarks/public_sets.py --out /tmp/fedpriv-public

``tabular.csv``: a larger table than breast-cancer (12,000 rows, 20 features, 3 classes;
scikit-learn's ``make_classification``). ``organs28.npz``: a MedMNIST-sized set in the
MedMNIST layout (28x28 grey images, 4 classes, 3,000 / 500 / 1,000 train / val / test): a
shape (disc, ring, horizontal or vertical bar) of random size, place and contrast on a noisy,
blurred background, so it is neither trivial nor hopeless without DP. Both are deterministic and
generated, so anything tuned on them spends nobody's privacy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["image_set", "tabular_set"]


def tabular_set(path: Path, *, rows: int = 12_000, seed: int = 0) -> Path:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=20,
        n_informative=8,
        n_redundant=4,
        n_classes=3,
        n_clusters_per_class=2,
        class_sep=1.0,
        flip_y=0.03,
        random_state=seed,
    )
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    body = np.column_stack([x.round(5), y])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, body, delimiter=",", header=header, comments="", fmt="%.5g")
    return path


def _shape(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    cy, cx = 14 + rng.uniform(-3, 3, size=2)
    r = float(size)
    d = np.hypot(yy - cy, xx - cx)
    if kind == 0:  # disc
        return (d < r).astype(np.float32)
    if kind == 1:  # ring
        return ((d < r) & (d > 0.55 * r)).astype(np.float32)
    wide = np.abs(xx - cx) < 1.6 * r
    tall = np.abs(yy - cy) < 1.6 * r
    if kind == 2:  # horizontal bar
        return (wide & (np.abs(yy - cy) < 0.4 * r)).astype(np.float32)
    return (tall & (np.abs(xx - cx) < 0.4 * r)).astype(np.float32)  # vertical bar


def _blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, 1, mode="edge")
    return sum(padded[i : i + 28, j : j + 28] for i in range(3) for j in range(3)) / 9.0


def image_set(
    path: Path, *, sizes: tuple[int, int, int] = (3000, 500, 1000), seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        labels = rng.integers(0, 4, size=n)
        images = np.empty((n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            shape = _shape(int(label), int(rng.integers(3, 7)), rng)
            background = _blur(rng.normal(0.0, 1.0, size=(28, 28)).astype(np.float32))
            image = 0.2 + rng.uniform(0.4, 0.7) * shape + 0.08 * background
            image += rng.normal(0.0, 0.05, size=(28, 28))
            images[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedpriv-public"))
    args = parser.parse_args()
    print(tabular_set(args.out / "tabular.csv"))
    print(image_set(args.out / "organs28.npz"))


if __name__ == "__main__":
    main()
