"""Datasets: a registry of embedded ones plus the user's own .npz (MedMNIST layout) and .csv files.

Every dataset is returned in one *index space*: row ``i`` of ``features`` and ``labels`` is
record ``i``. ``partitions.json`` refers to records by these indices, so an outside auditor
can reload a run with :func:`load_dataset` and nothing else.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.config import NORMALISATIONS
from fedpriv.data import handoff
from fedpriv.data.schema import Schema, builtin_schema, parse_feature_statistics
from fedpriv.errors import ConfigError, DataError

__all__ = [
    "NORMALISATIONS",
    "Dataset",
    "RecordSource",
    "available_datasets",
    "conform",
    "file_version",
    "load_dataset",
    "load_raw",
    "register_dataset",
    "schema_problems",
    "with_feature_statistics",
]

logger = logging.getLogger(__name__)

_MEDMNIST_SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSource:
    """What identifies each record as it is in the file, before any preprocessing.

    The privacy ledger identifies a patient by a keyed hash of ``patient_ids`` when a patient
    column is named, else of the raw record: ``columns`` (sorted by name) with their raw values
    (``numeric`` float64 columns, ``text`` string columns) for tables, or ``digests``
    (SHA-256 of the raw bytes) for images. Nothing of it ever leaves the site.
    """

    columns: tuple[str, ...] = ()
    numeric: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    text: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    digests: np.ndarray | None = None
    patient_ids: np.ndarray | None = None
    patient_column: str = ""

    def take(self, index: np.ndarray) -> RecordSource:
        """The rows ``index`` (in that order)."""
        return RecordSource(
            columns=self.columns,
            numeric={k: v[index] for k, v in self.numeric.items()},
            text={k: v[index] for k, v in self.text.items()},
            digests=None if self.digests is None else self.digests[index],
            patient_ids=None if self.patient_ids is None else self.patient_ids[index],
            patient_column=self.patient_column,
        )

    @classmethod
    def concatenate(cls, parts: Sequence[RecordSource]) -> RecordSource:
        first = parts[0]
        return RecordSource(
            columns=first.columns,
            numeric={k: np.concatenate([p.numeric[k] for p in parts]) for k in first.numeric},
            text={k: np.concatenate([p.text[k] for p in parts]) for k in first.text},
            digests=None
            if first.digests is None
            else np.concatenate([p.digests for p in parts if p.digests is not None]),
            patient_ids=None
            if first.patient_ids is None
            else np.concatenate([p.patient_ids for p in parts if p.patient_ids is not None]),
            patient_column=first.patient_column,
        )

    def row_material(self, columns: Sequence[str] | None = None) -> list[bytes]:
        """Canonical bytes of each record over ``columns`` (default: all), in name order:
        the same record gives the same bytes whatever the column order or number format."""
        if self.digests is not None:
            return [bytes(d) for d in self.digests]
        names = sorted(columns if columns is not None else self.columns)
        header = "\x1f".join(names).encode()
        numeric = [n for n in names if n in self.numeric]
        text = [n for n in names if n in self.text]
        size = len(next(iter({**self.numeric, **self.text}.values()))) if names else 0
        matrix = (
            np.stack([_canonical_floats(self.numeric[n]) for n in numeric], axis=1)
            if numeric
            else np.zeros((size, 0))
        )
        strings = [self.text[n] for n in text]
        rows = []
        for i in range(size):
            parts = [header, matrix[i].tobytes()]
            parts.extend(str(column[i]).encode() for column in strings)
            rows.append(b"\x1e".join(parts))
        return rows

    def __len__(self) -> int:
        if self.digests is not None:
            return int(self.digests.shape[0])
        for values in (*self.numeric.values(), *self.text.values()):
            return int(values.shape[0])
        return 0 if self.patient_ids is None else int(self.patient_ids.shape[0])


def _canonical_floats(values: np.ndarray) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).copy()
    out[out == 0.0] = 0.0  # -0.0 and 0.0 are the same value
    out[np.isnan(out)] = np.nan  # one NaN bit pattern
    return out


def _image_digests(images: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(images.reshape(images.shape[0], -1))
    tag = f"{flat.dtype.str}{images.shape[1:]}".encode()
    return np.array([hashlib.sha256(tag + row.tobytes()).digest() for row in flat], dtype="S32")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Features, labels and (optionally) the site each record came from.

    ``features`` is float32: ``(n, d)`` for tabular data, ``(n, channels, height, width)``
    for images. ``labels`` is int64 in ``[0, num_classes)``. ``test_indices``, when set, is
    the dataset's own held-back test split (MedMNIST's ``test_*``); otherwise the simulation
    draws one. ``feature_names`` names the features in model order (what an
    attribute-inference audit lets the user point at); empty when unnamed. Each is one column
    of ``features`` except a schema's one-hot feature, which spreads over one column per
    category: ``input_names`` names every column.
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    sites: np.ndarray | None = None
    test_indices: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()
    source: RecordSource = dataclasses.field(default_factory=RecordSource)
    #: the feature values as in the file (float64, ``(n, len(feature_names))``), before any
    #: normalisation: what a schema is checked against; never leaves the site
    raw_features: np.ndarray | None = None
    #: each class index's label as the file writes it (empty: the index itself)
    label_codes: tuple[str, ...] = ()
    #: the schema that normalised ``features``; None: standardised per file, or fixed pixels
    schema: Schema | None = None

    @property
    def kind(self) -> str:
        return "image" if self.features.ndim == 4 else "tabular"

    @property
    def input_names(self) -> tuple[str, ...]:
        """One name per column of a tabular ``features`` (``name=code`` for a one-hot
        feature's columns); ``feature_i`` when unnamed."""
        if self.schema is not None and self.kind == "tabular":
            return self.schema.input_names
        width = int(np.prod(self.features.shape[1:]))
        names = tuple(self.feature_names)
        return names if len(names) == width else tuple(f"feature_{i}" for i in range(width))

    @property
    def normalisation(self) -> str:
        """How ``features`` were scaled, in words (site check, notices)."""
        if self.schema is not None:
            return f"schema {self.schema.digest[:12]} (public ranges)"
        if self.kind == "image":
            return "fixed pixel range"
        return "standardised with this file's own mean and standard deviation"

    def record_label_codes(self) -> list[str]:
        """Each record's label as the file writes it."""
        codes = self.label_codes or tuple(str(i) for i in range(self.num_classes))
        return [codes[i] for i in self.labels]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


Loader = Callable[[], Dataset]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register an embedded dataset under ``name``; a second registration of a name raises."""

    def decorator(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset '{name}' is already registered")
        _REGISTRY[name] = loader
        return loader

    return decorator


def available_datasets() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def load_dataset(
    spec: str,
    *,
    label_column: str = "label",
    site_column: str = "site",
    patient_column: str = "",
    schema: Schema | None = None,
    normalisation: str = "auto",
) -> Dataset:
    """Load a registered dataset by name, or a ``.npz`` / ``.csv`` file by path.

    ``patient_column`` (CSV only) names the column that identifies each record's patient;
    it is never a feature. Features are normalised by ``schema`` (an embedded dataset's own
    when None), record by record; see :data:`NORMALISATIONS`. A file that does not match
    the schema is refused with a line naming the column. The result is cached per process
    (hospitals load the same file every round).
    """
    if normalisation not in NORMALISATIONS:
        raise ConfigError(
            f"unknown normalisation '{normalisation}': use one of {', '.join(NORMALISATIONS)}"
        )
    return _load_cached(
        str(spec),
        label_column,
        site_column,
        patient_column,
        file_version(spec),
        schema,
        normalisation,
    )


def file_version(spec: str) -> tuple[int, int]:
    """A file's (size, mtime): a file changed on disk is read again, never served stale."""
    try:
        info = Path(spec).expanduser().stat()
    except OSError:
        return (0, 0)
    return (info.st_size, info.st_mtime_ns)


def load_key(
    spec: str,
    *,
    label_column: str = "label",
    site_column: str = "site",
    patient_column: str = "",
    schema: Schema | None = None,
    normalisation: str = "auto",
) -> tuple[str, ...]:
    """What names one dataset as :func:`load_dataset` loads it, the file's version aside
    (the key a simulation's workers find the server's copy by, fedpriv.data.handoff)."""
    return (
        str(spec),
        label_column,
        site_column,
        patient_column,
        schema.digest if schema is not None else "",
        normalisation,
    )


@functools.lru_cache(maxsize=8)
def _load_cached(
    spec: str,
    label_column: str,
    site_column: str,
    patient_column: str,
    version: tuple[int, int],
    schema: Schema | None,
    normalisation: str,
) -> Dataset:
    # a simulation's worker: the server's snapshot, whatever the file's version now
    shared = handoff.read(
        load_key(
            spec,
            label_column=label_column,
            site_column=site_column,
            patient_column=patient_column,
            schema=schema,
            normalisation=normalisation,
        )
    )
    if shared is not None:
        return shared
    return _load_uncached(spec, label_column, site_column, patient_column, schema, normalisation)


def _load_uncached(
    spec: str,
    label_column: str,
    site_column: str,
    patient_column: str,
    schema: Schema | None,
    normalisation: str,
) -> Dataset:
    if normalisation == "file":
        if schema is not None:
            raise ConfigError("a schema and normalisation 'file' contradict: drop one")
        dataset = load_raw(
            spec, label_column=label_column, site_column=site_column, patient_column=patient_column
        )
        if dataset.kind == "tabular":
            logger.warning("%s: features %s", spec, dataset.normalisation)
        return dataset
    chosen = schema if schema is not None else builtin_schema(spec) if spec in _REGISTRY else None
    columns = chosen.feature_names if chosen is not None else None
    dataset = load_raw(
        spec,
        label_column=label_column,
        site_column=site_column,
        patient_column=patient_column,
        feature_columns=columns,
    )
    if chosen is None:
        if dataset.kind == "image":
            return dataset  # a fixed pixel range: public and per record already
        if normalisation in ("schema", "federated"):
            raise DataError(
                f"'{spec}' has no schema and normalisation is '{normalisation}': give the "
                "federation's schema.toml (draft one with `fedpriv schema init`)"
            )
        logger.warning("%s: features %s (no schema)", spec, dataset.normalisation)
        return dataset
    return conform(dataset, chosen, label_column=label_column)


def schema_problems(dataset: Dataset, schema: Schema, *, label_column: str = "label") -> list[str]:
    """One line per column of ``dataset`` that does not match ``schema``."""
    if dataset.raw_features is None:
        return [
            f"'{dataset.name}' is an image dataset without named columns: a schema describes "
            "a table's columns (images keep their fixed pixel range)"
        ]
    columns = {n: dataset.raw_features[:, j] for j, n in enumerate(dataset.feature_names)}
    return schema.problems(columns, dataset.record_label_codes(), label_column=label_column)


def conform(dataset: Dataset, schema: Schema, *, label_column: str = "label") -> Dataset:
    """``dataset`` normalised by the schema's public ranges and labelled by its codes; a
    mismatch is a DataError naming the first column (``fedpriv site check`` lists all)."""
    problems = schema_problems(dataset, schema, label_column=label_column)
    if problems:
        more = (
            f" (and {len(problems) - 1} more: run `fedpriv site check`)"
            if len(problems) > 1
            else ""
        )
        raise DataError(f"'{dataset.name}' does not match the schema: {problems[0]}{more}")
    assert dataset.raw_features is not None  # schema_problems refused it otherwise
    index = [dataset.feature_names.index(n) for n in schema.feature_names]
    raw = dataset.raw_features[:, index]
    features = schema.normalise(raw)
    if dataset.kind == "image" and int(np.prod(dataset.features.shape[1:])) == schema.width:
        features = features.reshape(dataset.features.shape)
    return dataclasses.replace(
        dataset,
        features=features,
        labels=schema.label_index(dataset.record_label_codes()),
        num_classes=schema.num_classes,
        class_names=schema.class_names,
        feature_names=schema.feature_names,
        raw_features=raw,
        label_codes=tuple(lab.code for lab in schema.labels),
        schema=schema,
    )


def with_feature_statistics(dataset: Dataset, statistics: str) -> Dataset:
    """``dataset`` (conformed to its schema) normalised by the run's federated centre and
    scale per numeric feature (normalisation federated); ``statistics`` empty: before the
    release, the schema's own mapping (what nothing trains on: the server gathers the
    statistics before round 1). ``dataset.schema`` stays the federation's (its digest)."""
    if not statistics:
        return dataset
    if dataset.schema is None or dataset.raw_features is None:
        raise DataError(
            f"'{dataset.name}' has no schema: normalisation federated needs the federation's "
            "schema.toml (its ranges bound each patient's contribution)"
        )
    reference = dataset.schema.with_reference(parse_feature_statistics(statistics))
    features = reference.normalise(dataset.raw_features).reshape(dataset.features.shape)
    return dataclasses.replace(dataset, features=features)


def load_raw(
    spec: str,
    *,
    label_column: str = "label",
    site_column: str = "site",
    patient_column: str = "",
    feature_columns: tuple[str, ...] | None = None,
) -> Dataset:
    """The dataset as in the file, not cached: ``raw_features`` and ``label_codes`` as
    written (``features`` standardised per file); what a schema is checked against."""
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if patient_column and (spec in _REGISTRY or suffix != ".csv"):
        raise DataError(
            f"a patient column ('{patient_column}') can only be named for a .csv file; "
            f"'{spec}' identifies each record by its content"
        )
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    if suffix in (".npz", ".csv"):
        if not path.is_file():
            raise DataError(f"dataset file '{path}' does not exist: check the path")
        if suffix == ".npz":
            return _load_npz(path)
        return _load_csv(
            path,
            label_column=label_column,
            site_column=site_column,
            patient_column=patient_column,
            feature_columns=feature_columns,
        )
    names = ", ".join(available_datasets())
    raise DataError(
        f"unknown dataset '{spec}': use one of {names}, or a path to a .npz (MedMNIST layout) "
        "or .csv file"
    )


# ---- embedded datasets (shipped inside scikit-learn, no download) --------------------------


@register_dataset("breast-cancer")
def _breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    raw = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    names = [str(n) for n in bunch.feature_names]
    numeric = {n: raw[:, i] for i, n in enumerate(names)}
    numeric["label"] = labels.astype(np.float64)
    return Dataset(
        name="breast-cancer",
        features=_standardize(raw),
        labels=labels,
        num_classes=2,
        class_names=tuple(str(c) for c in bunch.target_names),
        feature_names=tuple(names),
        source=RecordSource(columns=tuple(sorted(numeric)), numeric=numeric),
        raw_features=raw,
        label_codes=("0", "1"),
    )


@register_dataset("digits")
def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images)
    images = raw.astype(np.float32) / 16.0
    return Dataset(
        name="digits",
        features=images[:, None, :, :],
        labels=np.asarray(bunch.target, dtype=np.int64),
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
        feature_names=tuple(
            f"pixel_{r}_{c}" for r in range(raw.shape[1]) for c in range(raw.shape[2])
        ),
        source=RecordSource(digests=_image_digests(raw)),
        raw_features=raw.reshape(raw.shape[0], -1).astype(np.float64),
        label_codes=tuple(str(c) for c in range(10)),
    )


def _standardize(features: np.ndarray) -> np.ndarray:
    # Per-file scaling (normalisation "file", or a file without a schema): a feature's value
    # then means something different at each site; warned wherever it is used.
    with np.errstate(over="ignore", invalid="ignore"):
        mean = features.mean(axis=0)
        std = features.std(axis=0)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        # values near the float limit (1e308): their sum overflowed. Each column divided by
        # its largest magnitude first gives the same standardised values
        scale = np.abs(features).max(axis=0)
        features = features / np.where(scale > 0, scale, 1.0)
        mean = features.mean(axis=0)
        std = features.std(axis=0)
    std[std == 0] = 1.0
    return ((features - mean) / std).astype(np.float32)


# ---- user files ----------------------------------------------------------------------------


def _load_npz(path: Path) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"'{path}' is not a readable .npz file: {exc}") from None
    with archive:
        keys = set(archive.files)
        missing = [
            f"{split}_{part}"
            for split in _MEDMNIST_SPLITS
            for part in ("images", "labels")
            if f"{split}_{part}" not in keys
        ]
        if missing:
            raise DataError(
                f"'{path}' lacks {', '.join(missing)}: a .npz must follow the MedMNIST layout "
                "(train_images, train_labels, val_images, val_labels, test_images, test_labels)"
            )
        images = [np.asarray(archive[f"{s}_images"]) for s in _MEDMNIST_SPLITS]
        labels = [np.asarray(archive[f"{s}_labels"]) for s in _MEDMNIST_SPLITS]
    for split, imgs, labs in zip(_MEDMNIST_SPLITS, images, labels, strict=True):
        if imgs.shape[0] != labs.shape[0]:
            raise DataError(
                f"'{path}': {split}_images has {imgs.shape[0]} records but {split}_labels "
                f"has {labs.shape[0]}"
            )
        if imgs.ndim not in (3, 4):
            raise DataError(
                f"'{path}': {split}_images must be (n, h, w) or (n, h, w, channels), "
                f"got shape {imgs.shape}"
            )
        if labs.ndim == 2 and labs.shape[1] > 1:
            raise DataError(
                f"'{path}': {split}_labels has {labs.shape[1]} columns; multi-label "
                "datasets are not supported, use a single-label MedMNIST dataset"
            )
    stacked = np.concatenate(images)
    digests = _image_digests(stacked)
    if stacked.ndim == 3:
        stacked = stacked[:, None, :, :]
    else:
        stacked = np.transpose(stacked, (0, 3, 1, 2))
    features = stacked.astype(np.float32)
    if features.max(initial=0.0) > 1.0:
        features /= 255.0
    label_vec = np.concatenate([lab.reshape(-1) for lab in labels]).astype(np.int64)
    if label_vec.size == 0:
        raise DataError(f"'{path}' holds no records")
    if label_vec.min() < 0:
        raise DataError(f"'{path}': labels must be non-negative class indices")
    n_train_val = images[0].shape[0] + images[1].shape[0]
    return Dataset(
        name=path.stem,
        features=features,
        labels=label_vec,
        num_classes=int(label_vec.max()) + 1,
        test_indices=np.arange(n_train_val, label_vec.size, dtype=np.int64),
        source=RecordSource(digests=digests),
    )


def _load_csv(
    path: Path,
    *,
    label_column: str,
    site_column: str,
    patient_column: str = "",
    feature_columns: tuple[str, ...] | None = None,
) -> Dataset:
    """``feature_columns`` (a schema's): only those present are features, in that order;
    any other column is kept (as number or text) only to identify the record."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header, columns, count, numbers = _table(handle.read())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"'{path}' is not a readable CSV file: {exc}") from None
    if not header:
        raise DataError(f"'{path}' is empty: a CSV needs a header row and records")
    header = [h.strip() for h in header]
    if label_column not in header:
        raise DataError(
            f"'{path}' has no label column '{label_column}' (columns: {', '.join(header)}); "
            "name it with --label-column"
        )
    if patient_column and patient_column not in header:
        raise DataError(
            f"'{path}' has no patient column '{patient_column}' (columns: {', '.join(header)})"
        )
    if patient_column and patient_column in (label_column, site_column):
        raise DataError(
            f"the patient column '{patient_column}' cannot also be the label or site column"
        )
    if len(set(header)) != len(header):
        duplicate = next(h for h in header if header.count(h) > 1)
        raise DataError(f"'{path}' names the column '{duplicate}' twice")
    if not count:
        raise DataError(f"'{path}' has a header but no records")
    label_idx = header.index(label_column)
    site_idx = header.index(site_column) if site_column and site_column in header else None
    patient_idx = header.index(patient_column) if patient_column else None
    other_idx = [i for i in range(len(header)) if i not in (label_idx, site_idx, patient_idx)]
    if feature_columns is None:
        feature_idx = other_idx
    else:
        feature_idx = [header.index(n) for n in feature_columns if n in header]
    extra_idx = [i for i in other_idx if i not in feature_idx]
    if not feature_idx and feature_columns is None:  # a schema names what is missing
        raise DataError(f"'{path}' has no feature columns besides the label")
    if isinstance(columns, int):  # the first record whose fields do not match the header
        r, fields = columns, count
        raise DataError(f"'{path}' line {r}: {fields} fields, the header has {len(header)}")
    raw_labels = [v.strip() for v in columns[label_idx]]
    raw_sites = [v.strip() for v in columns[site_idx]] if site_idx is not None else []
    raw_patients: list[str] = []
    if patient_idx is not None:
        raw_patients = [v.strip() for v in columns[patient_idx]]
        if not all(raw_patients):
            r = raw_patients.index("") + 2
            raise DataError(
                f"'{path}' line {r}: the patient column '{patient_column}' is empty; "
                "every record needs its patient's identifier"
            )
    matrix = np.empty((count, len(feature_idx)), dtype=np.float64)
    for c, i in enumerate(feature_idx):
        if numbers is not None and np.isfinite(numbers[:, i]).all():
            matrix[:, c] = numbers[:, i]
            continue  # else the column's cells are read again below, and the first bad one named
        try:
            matrix[:, c] = np.fromiter(map(float, columns[i]), dtype=np.float64, count=count)
        except ValueError:
            for r, value in enumerate(columns[i], start=2):
                try:
                    float(value)
                except ValueError:
                    raise DataError(
                        f"'{path}' line {r}: column '{header[i]}' holds {value!r}, not a "
                        "number; encode categorical features numerically first"
                    ) from None
            raise
        finite = np.isfinite(matrix[:, c])
        if not finite.all():  # float() reads "nan" and "inf": a missing value, not a number
            r = int(np.argmin(finite))
            raise DataError(
                f"'{path}' line {r + 2}: column '{header[i]}' holds {columns[i][r]!r}, not a "
                "finite number; fill in or remove missing values first"
            )
    # ties under the natural order ("1" and "1.0") by their text: a set's order follows the
    # hash seed, and every process must give a class the same index
    classes = sorted(set(raw_labels), key=lambda v: (*_natural_key(v), v))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[v] for v in raw_labels], dtype=np.int64)
    sites = np.array(raw_sites) if site_idx is not None else None
    # the record as it is in the file, by column name, whatever role a column plays: a
    # column of numbers by value (so "1.50" and "1.5" agree), any other as text
    numeric = {header[i]: matrix[:, c] for c, i in enumerate(feature_idx)}
    text: dict[str, np.ndarray] = {}
    extras = [(header[i], [v.strip() for v in columns[i]]) for i in extra_idx]
    for name, values in ((label_column, raw_labels), (site_column, raw_sites), *extras):
        if name not in header or name in numeric:
            continue
        as_numbers = _as_numbers(values)
        if as_numbers is not None:
            numeric[name] = as_numbers
        else:
            text[name] = np.array(values, dtype=object)
    source = RecordSource(
        columns=tuple(sorted([*numeric, *text])),
        numeric=numeric,
        text=text,
        patient_ids=np.array(raw_patients, dtype=object) if patient_idx is not None else None,
        patient_column=patient_column,
    )
    return Dataset(
        name=path.stem,
        features=_standardize(matrix),
        labels=labels,
        num_classes=len(classes),
        sites=sites,
        class_names=tuple(classes),
        feature_names=tuple(header[i] for i in feature_idx),
        source=source,
        raw_features=matrix,
        label_codes=tuple(classes),
    )


def _table(text: str) -> tuple[list[str], Any, int, np.ndarray | None]:
    """What :func:`_cells` gives, and every cell as a float64 (records x columns) when the
    file is plain and every cell a number :func:`_numbers` reads (else None); then the
    columns' cells are split from the lines only for the columns asked for."""
    plain = _plain_lines(text)
    if plain is None:
        return (*_csv_cells(text), None)
    header, lines = plain
    numbers = _numbers(lines, len(header))
    if numbers is None:
        return header, _split_plain(lines, len(header)), len(lines), None
    return header, _LineColumns(lines, len(header)), len(lines), numbers


def _cells(text: str) -> tuple[list[str], Any, int]:
    """The header, then the cells column by column and the number of records; or, when a
    record's fields do not match the header, that record's line number and field count in
    place of the columns. Column by column because a cell-by-cell loop cost 44 s of a
    1,000-hospital simulation's start-up on a 200,000-row file.

    A file without quotes, carriage returns of its own or blank lines is split on commas
    and newlines directly (what ``csv.reader`` would make of it, at about half the cost);
    any other goes through ``csv.reader``."""
    plain = _plain_lines(text)
    if plain is None:
        return _csv_cells(text)
    header, lines = plain
    return header, _split_plain(lines, len(header)), len(lines)


def _plain_lines(text: str) -> tuple[list[str], list[str]] | None:
    """The header and the record lines of a file without quotes, carriage returns of its
    own or blank lines whose every record has the header's number of fields; None for any
    other file (``csv.reader``'s to read)."""
    if "\r" in text:  # a search for one character costs a tenth of one for two
        text = text.replace("\r\n", "\n")
    head, _, body = text.partition("\n")
    header = next(csv.reader([head]), [])
    width = len(header)
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    plain = width > 0 and '"' not in text and "\r" not in body and "\n\n" not in body
    if plain and lines and lines[0] and all(line.count(",") == width - 1 for line in lines):
        return header, lines
    return None


def _split_plain(lines: list[str], width: int) -> list[list[str]]:
    cells = ",".join(lines).split(",")
    return [cells[i::width] for i in range(width)]


def _csv_cells(text: str) -> tuple[list[str], Any, int]:
    every = list(csv.reader(io.StringIO(text, newline="")))
    header, rows = (every[0], every[1:]) if every else ([], [])
    width = len(header)
    for r, row in enumerate(rows, start=2):
        if len(row) != width:
            return header, r, len(row)
    return header, [list(c) for c in zip(*rows, strict=True)] or [[] for _ in header], len(rows)


# The characters of a cell numpy's parser reads exactly as Python's float() does: ASCII
# digits, signs, a point and an exponent; no whitespace, underscore, other script's digit,
# "nan" or "inf" (tests/unit/test_datasets.py compares the two on every such cell of up to
# five characters).
_NUMBER_BYTES = b"0123456789+-.eE"


def _numbers(lines: list[str], width: int) -> np.ndarray | None:
    """A plain table's cells as float64 (records x columns), all parsed in one pass in C,
    when every cell is written with :data:`_NUMBER_BYTES` only and is a number; else None.

    What float() per cell makes of them, without a Python string and a float per cell: on
    a 200,000-row file of 21 columns, 2.0-2.7 s of CPU against 3.6-4.1 s (BENCHMARKS.md)."""
    if not _only_number_bytes(lines[0]):  # a column of text: known from the first record
        return None
    flat = ",".join(lines)
    if not _only_number_bytes(flat):
        return None
    with warnings.catch_warnings():
        # where a cell is no number, numpy 2.4 raises; older versions warn and stop there
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            values = np.fromstring(flat, dtype=np.float64, sep=",")
        except ValueError:
            return None
    if values.size != len(lines) * width:  # a cell that is no number ("", "1e", "-")
        return None
    return values.reshape(len(lines), width)


def _only_number_bytes(text: str) -> bool:
    return text.isascii() and not text.encode("ascii").translate(None, _NUMBER_BYTES + b",")


class _LineColumns:
    """A plain table's cells of one column, split from its lines when first asked for."""

    def __init__(self, lines: list[str], width: int) -> None:
        self._lines = lines
        self._width = width
        self._split: dict[int, list[str]] = {}

    def __getitem__(self, i: int) -> list[str]:
        if i not in self._split:
            w = self._width
            if i < w - i:
                self._split[i] = [line.split(",", i + 1)[i] for line in self._lines]
            else:
                self._split[i] = [line.rsplit(",", w - i)[i - w] for line in self._lines]
        return self._split[i]


def _as_numbers(values: list[str]) -> np.ndarray | None:
    """A column as numbers when every value is one, else None."""
    try:
        return np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None


def _natural_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
