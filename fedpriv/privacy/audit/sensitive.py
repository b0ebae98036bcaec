"""The hidden column of an attribute-inference audit, and the values an attacker guesses between.

The user names the column (by name or index); a categorical one (few distinct values, like a
diagnosis code) is guessed among its values, any other above or below the population median.
The attacker works in the model's feature space: the dataset's standardised columns (the
standardisation uses the whole dataset's statistics, as the model's own input does).

A feature the schema one-hot encodes spans one model column per category: it is hidden and
guessed as a whole (its candidates are the k one-hot rows), never one of its columns alone,
which would leave the others giving it away. Names and indices are the schema's features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedpriv.errors import ConfigError, DataError

__all__ = [
    "CATEGORICAL_MAX",
    "SensitiveAttribute",
    "feature_columns",
    "resolve_sensitive_feature",
    "sensitive_attribute",
]

#: a column with at most this many distinct values is categorical: its values are the guesses
CATEGORICAL_MAX = 10


@dataclasses.dataclass(frozen=True, eq=False)
class SensitiveAttribute:
    """The hidden column and the values an attacker chooses between.

    ``candidates[k]`` is the model-space value substituted for class ``k``. A categorical
    column's classes are its values; any other column is split at the population median
    (class 1: above it) and each side is represented by the population median of that side.
    """

    index: int  # the feature's first model column
    name: str
    chosen_by: str
    encoding: str  # "categorical", "median-split" or "one-hot"
    candidates: np.ndarray  # (k,), or (k, columns) for a one-hot feature
    labels: tuple[str, ...]  # each class in the file's units, for people
    threshold: float | None = None  # model space, median split only
    #: every model column of the feature (one, or one per category when one-hot)
    columns: tuple[int, ...] = ()

    @property
    def hidden(self) -> int | list[int]:
        """The model columns to hide: an index, or a list for a one-hot feature."""
        return list(self.columns) if len(self.columns) > 1 else self.index

    def classes(self, values: np.ndarray) -> np.ndarray:
        """The class of each record's true value (``values``: ``features[:, hidden]``)."""
        if self.threshold is not None:
            return (values > self.threshold).astype(np.int64)
        if self.candidates.ndim == 2:
            distance = np.abs(values[:, None, :] - self.candidates[None, :, :]).sum(axis=2)
            return distance.argmin(axis=1)
        return np.abs(values[:, None] - self.candidates[None, :]).argmin(axis=1)


def feature_columns(dataset: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Each feature's name and model columns, in model order."""
    schema = getattr(dataset, "schema", None)
    if schema is not None and getattr(dataset, "kind", "tabular") == "tabular":
        return tuple((f.name, tuple(schema.input_columns(f.name))) for f in schema.features)
    width = int(dataset.features.shape[1])
    names = tuple(dataset.feature_names)
    if len(names) != width:
        names = tuple(f"feature_{i}" for i in range(width))
    return tuple((n, (i,)) for i, n in enumerate(names))


def _names(dataset: Any) -> tuple[str, ...]:
    return tuple(name for name, _ in feature_columns(dataset))


def resolve_sensitive_feature(
    dataset: Any, spec: str | int | None, population: np.ndarray
) -> tuple[int, str]:
    """The feature ``spec`` names (a feature name, else an index among the features), and
    how it was chosen; a feature is one model column, or a one-hot feature's columns.

    With no ``spec`` the default is the first categorical column (few distinct values, like a
    diagnosis code, or a one-hot feature), else the column most correlated with the label in
    the population: the one a model is most likely to have learned something about.
    """
    groups = feature_columns(dataset)
    names = _names(dataset)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        features = dataset.features
        for i, (_, columns) in enumerate(groups):
            if len(columns) > 1 or np.unique(features[:, columns[0]]).size <= CATEGORICAL_MAX:
                return i, f"default: the first column with at most {CATEGORICAL_MAX} values"
        x = features[population].astype(np.float64)
        y = dataset.labels[population].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.nan_to_num(np.corrcoef(np.column_stack([x, y]), rowvar=False)[-1, :-1])
        strength = np.array([np.abs(r[list(columns)]).max() for _, columns in groups])
        best = int(strength.argmax())
        return (
            best,
            f"default: the column most correlated with the label (|r| = {strength[best]:.2f})",
        )
    text = str(spec).strip()
    if text in names:
        return names.index(text), "user"
    try:
        index = int(text)
    except ValueError:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ConfigError(
            f"unknown sensitive feature '{text}': name one of the dataset's columns ({shown}) "
            f"or give its index 0..{len(names) - 1}"
        ) from None
    if not 0 <= index < len(names):
        raise ConfigError(
            f"sensitive feature index {index} is out of range: the dataset has {len(names)} "
            f"feature columns (0..{len(names) - 1})"
        )
    return index, "user"


def sensitive_attribute(
    dataset: Any, spec: str | int | None, population: np.ndarray
) -> SensitiveAttribute:
    """Resolve ``spec`` and decide what the attacker guesses between."""
    position, chosen_by = resolve_sensitive_feature(dataset, spec, population)
    name, columns = feature_columns(dataset)[position]
    index = columns[0]
    if len(columns) > 1:
        k = len(columns)
        codes = tuple(n.split("=", 1)[1] for n in dataset.schema.input_names[index : index + k])
        return SensitiveAttribute(
            index, name, chosen_by, "one-hot", np.eye(k), codes, columns=columns
        )
    column = dataset.features[:, index].astype(np.float64)
    raw = _raw_column(dataset, name)
    values = np.unique(column)
    if values.size <= CATEGORICAL_MAX:
        first = [int(np.flatnonzero(column == v)[0]) for v in values]
        labels = tuple(
            _fmt(raw[i]) if raw is not None else _fmt(v) for i, v in zip(first, values, strict=True)
        )
        return SensitiveAttribute(
            index, name, chosen_by, "categorical", values, labels, columns=columns
        )
    known = column[population]
    threshold = float(np.median(known))
    low, high = known[known <= threshold], known[known > threshold]
    if low.size == 0 or high.size == 0:
        raise DataError(
            f"the population records all share one value of '{name}': it cannot be split at "
            "the median; choose another --sensitive-feature"
        )
    shown = _fmt(float(np.median(raw[population]))) if raw is not None else _fmt(threshold)
    return SensitiveAttribute(
        index,
        name,
        chosen_by,
        "median-split",
        np.array([np.median(low), np.median(high)]),
        (f"<= {shown}", f"> {shown}"),
        threshold,
        columns,
    )


def _raw_column(dataset: Any, name: str) -> np.ndarray | None:
    """The column in the file's units, when the dataset keeps it."""
    numeric = getattr(getattr(dataset, "source", None), "numeric", {})
    values = numeric.get(name)
    return None if values is None or len(values) != len(dataset) else np.asarray(values)


def _fmt(value: float) -> str:
    return f"{value:.4g}"
