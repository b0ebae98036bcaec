"""The federation's schema: what each feature means, its public range, and the label codes.

Every site normalises with the schema's *public* ranges, record by record, so a feature value
means the same at every hospital and no statistic of anyone's records enters the model's
inputs. A site's file is checked against the schema before it trains; a mismatch is refused
with one line naming the column.

Normalisation: a numeric feature maps its range ``[min, max]`` linearly onto ``[0, 1]``, or,
when the schema gives a public reference ``centre`` and ``scale`` (e.g. population norms, or
the published statistics of a public dataset), becomes ``(x - centre) / scale``. A
categorical feature is encoded as its ``encoding`` says:

- ``ordinal`` (the default, and what every schema without the key means): one column, the
  i-th of its k listed categories (in ascending code order) mapped onto ``i / (k - 1)``. Right
  for ordered codes (a stage, a grade); for nominal ones (a blood type, a ward) it imposes an
  order and spacing the codes do not have.
- ``one-hot``: k columns, the one of the record's category set to 1, the others 0; a model
  then learns any effect per category. The input columns are named ``name=code``.

The model's input width is the sum of the features' widths (1 per numeric or ordinal feature,
k per one-hot one), in schema order. Columns a file holds beyond the schema's are ignored: they
never reach the model (a site's local identifiers or notes are common and harmless there),
though they still identify the record in the privacy ledger, exactly as without a schema.

File format (``schema.toml``)::

    name = "my-federation"
    [[feature]]
    name = "age"
    kind = "numeric"
    min = 0
    max = 120
    [[feature]]
    name = "sex"
    kind = "categorical"
    categories = [1, 2]
    [[feature]]
    name = "blood type"
    kind = "categorical"
    categories = [1, 2, 3, 4]
    encoding = "one-hot"
    [[label]]
    code = "0"
    name = "benign"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.errors import ConfigError

__all__ = [
    "CATEGORICAL",
    "ENCODINGS",
    "NUMERIC",
    "ONE_HOT",
    "ORDINAL",
    "Feature",
    "Label",
    "Schema",
    "builtin_schema",
    "canonical_code",
    "check_schema_digest",
    "draft_schema",
    "load_schema",
    "parse_feature_statistics",
]

NUMERIC = "numeric"
CATEGORICAL = "categorical"
#: how a categorical feature becomes model inputs (see the module's text)
ORDINAL = "ordinal"
ONE_HOT = "one-hot"
ENCODINGS = (ORDINAL, ONE_HOT)
_BUILTIN = Path(__file__).parent / "schemas"
_SHOWN = 3  # offending records named per problem


@dataclasses.dataclass(frozen=True)
class Feature:
    """One model input: a numeric range or a list of category codes (numbers)."""

    name: str
    kind: str = NUMERIC
    minimum: float = 0.0
    maximum: float = 1.0
    categories: tuple[float, ...] = ()
    #: optional public reference centre and scale (numeric only): inputs are then
    #: ``(x - centre) / scale`` instead of the range mapped onto [0, 1]
    centre: float | None = None
    scale: float | None = None
    #: categorical only: ordinal (one column) or one-hot (one column per category)
    encoding: str = ORDINAL

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a schema feature needs a name")
        if self.encoding not in ENCODINGS:
            raise ConfigError(
                f"schema feature '{self.name}': unknown encoding '{self.encoding}' "
                f"(use {' or '.join(ENCODINGS)})"
            )
        if self.kind != CATEGORICAL and self.encoding != ORDINAL:
            raise ConfigError(
                f"schema feature '{self.name}': encoding {self.encoding} is for categorical "
                "features (a numeric one is one column)"
            )
        if (self.centre is None) != (self.scale is None):
            raise ConfigError(
                f"schema feature '{self.name}': give both centre and scale, or neither"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"schema feature '{self.name}': scale must be a number > 0")
        if self.kind == NUMERIC:
            if not (math.isfinite(self.minimum) and math.isfinite(self.maximum)):
                raise ConfigError(f"schema feature '{self.name}': min and max must be finite")
            if not self.minimum < self.maximum:
                raise ConfigError(
                    f"schema feature '{self.name}': min {self.minimum:g} must be below "
                    f"max {self.maximum:g}"
                )
        elif self.kind == CATEGORICAL:
            if not self.categories:
                raise ConfigError(f"schema feature '{self.name}': list its categories")
            if len(set(self.categories)) != len(self.categories):
                raise ConfigError(f"schema feature '{self.name}' lists a category twice")
            if not all(math.isfinite(c) for c in self.categories):
                raise ConfigError(f"schema feature '{self.name}': categories must be numbers")
        else:
            raise ConfigError(
                f"schema feature '{self.name}': unknown kind '{self.kind}' "
                f"(use {NUMERIC} or {CATEGORICAL})"
            )

    def problem(self, values: np.ndarray) -> str:
        """One line naming this column if any value falls outside it, else ''."""
        if self.kind == NUMERIC:
            bad = ~((values >= self.minimum) & (values <= self.maximum))  # NaN is bad too
            what = f"outside its range [{self.minimum:g}, {self.maximum:g}]"
        else:
            bad = ~np.isin(values, np.asarray(self.categories, dtype=np.float64))
            listed = ", ".join(f"{c:g}" for c in self.categories)
            what = f"not among its categories ({listed})"
        if not bad.any():
            return ""
        rows = np.flatnonzero(bad)
        shown = ", ".join(f"{values[r]:g} (record {r + 1})" for r in rows[:_SHOWN])
        more = ", ..." if rows.size > _SHOWN else ""
        return f"column '{self.name}': {rows.size} value(s) {what}: {shown}{more}"

    @property
    def width(self) -> int:
        """How many model input columns this feature takes."""
        return len(self.categories) if self.encoding == ONE_HOT else 1

    @property
    def input_names(self) -> tuple[str, ...]:
        """The names of its model input columns: its own, or ``name=code`` per category
        (ascending code order, as ``encode`` places them)."""
        if self.encoding == ONE_HOT:
            return tuple(f"{self.name}={c:g}" for c in sorted(self.categories))
        return (self.name,)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """The public, per-record transformation, ``(n,)`` raw values to ``(n, width)``
        inputs (nothing here depends on other records). A category is its rank among the
        listed codes (ascending); values are checked against the list before (``problem``)."""
        values = np.asarray(values, dtype=np.float64)
        if self.kind == NUMERIC and self.centre is not None and self.scale is not None:
            return ((values - self.centre) / self.scale)[:, None]
        if self.kind == NUMERIC:
            return ((values - self.minimum) / (self.maximum - self.minimum))[:, None]
        codes = np.sort(np.asarray(self.categories, dtype=np.float64))
        rank = np.searchsorted(codes, values).clip(0, codes.size - 1)
        if self.encoding == ONE_HOT:
            return (rank[:, None] == np.arange(codes.size)[None, :]).astype(np.float64)
        return (rank / max(codes.size - 1, 1))[:, None]

    def to_toml(self) -> str:
        lines = ["[[feature]]", f"name = {_quote(self.name)}", f'kind = "{self.kind}"']
        if self.kind == NUMERIC:
            lines += [f"min = {_number(self.minimum)}", f"max = {_number(self.maximum)}"]
            if self.centre is not None and self.scale is not None:
                lines += [f"centre = {_number(self.centre)}", f"scale = {_number(self.scale)}"]
        else:
            lines.append(f"categories = [{', '.join(_number(c) for c in self.categories)}]")
            lines.append(f'encoding = "{self.encoding}"')
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Label:
    """A label code as the sites' files write it (canonical text), and what it means."""

    code: str
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Schema:
    """Features in model order and the label codes (class i is ``labels[i]``).

    ``derived_from`` is set on a draft written from one site's file (``fedpriv schema
    init``): its ranges are that file's extremes until the federation agrees on public ones.
    """

    features: tuple[Feature, ...]
    labels: tuple[Label, ...]
    name: str = ""
    derived_from: str = ""

    def __post_init__(self) -> None:
        if not self.features:
            raise ConfigError("a schema needs at least one [[feature]]")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"the schema names the feature '{twice}' twice")
        if len(self.labels) < 2:
            raise ConfigError("a schema needs at least two [[label]] codes")
        codes = [lab.code for lab in self.labels]
        if len(set(codes)) != len(codes):
            raise ConfigError("the schema lists a label code twice")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def width(self) -> int:
        """The model's input width: the sum of the features' widths (1 per numeric or
        ordinal feature, k per one-hot feature of k categories)."""
        return sum(f.width for f in self.features)

    @property
    def input_names(self) -> tuple[str, ...]:
        """One name per model input column, in model order (``name=code`` for one-hot)."""
        return tuple(n for f in self.features for n in f.input_names)

    def input_columns(self, name: str) -> range:
        """The model input columns of the feature ``name`` (KeyError if none)."""
        start = 0
        for feature in self.features:
            if feature.name == name:
                return range(start, start + feature.width)
            start += feature.width
        raise KeyError(name)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(lab.name or lab.code for lab in self.labels)

    @property
    def digest(self) -> str:
        """SHA-256 of what the schema means (features, ranges, categories, encodings, labels):
        two sites with the same digest read every feature and label the same way. The ordinal
        encoding adds nothing to a feature's entry, so a schema written before encodings
        existed (all ordinal) keeps its digest; one-hot is a different meaning and digest."""
        meaning = {
            "features": [
                [f.name, f.kind, f.minimum, f.maximum, f.centre, f.scale]
                if f.kind == NUMERIC
                else [f.name, f.kind, list(f.categories)]
                + ([f.encoding] if f.encoding != ORDINAL else [])
                for f in self.features
            ],
            "labels": [[lab.code, lab.name] for lab in self.labels],
        }
        text = json.dumps(meaning, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def problems(
        self,
        columns: Mapping[str, np.ndarray],
        label_codes: Sequence[str],
        *,
        label_column: str = "label",
    ) -> list[str]:
        """One line per column that does not match: missing, out of range, unknown category,
        or a label code outside the list. ``columns`` holds raw float64 values by name."""
        found = []
        for feature in self.features:
            if feature.name not in columns:
                found.append(f"column '{feature.name}' is missing (the schema's feature)")
                continue
            problem = feature.problem(np.asarray(columns[feature.name], dtype=np.float64))
            if problem:
                found.append(problem)
        known = {lab.code for lab in self.labels}
        unknown = sorted({canonical_code(c) for c in label_codes} - known)
        if unknown:
            listed = ", ".join(lab.code for lab in self.labels)
            found.append(
                f"column '{label_column}': label code(s) {', '.join(unknown[:_SHOWN])} not in "
                f"the schema's list ({listed})"
            )
        return found

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """Raw ``(n, features)`` values in schema order -> ``(n, width)`` float32 model
        inputs; uses nothing but the schema, so a record normalises the same at every site."""
        matrix = np.asarray(raw, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != len(self.features):
            raise ValueError(f"expected (n, {len(self.features)}) raw values, got {matrix.shape}")
        out = np.empty((matrix.shape[0], self.width), dtype=np.float64)
        start = 0
        for j, feature in enumerate(self.features):
            out[:, start : start + feature.width] = feature.encode(matrix[:, j])
            start += feature.width
        return out.astype(np.float32)

    def with_reference(self, statistics: Mapping[str, tuple[float, float]]) -> Schema:
        """This schema with a centre and scale for each numeric feature (normalisation
        federated: combined from the hospitals' DP releases): the public transformation
        ``(x - centre) / scale`` every hospital then applies. Categorical features keep
        their mapping."""
        missing = [f.name for f in self.features if f.kind == NUMERIC and f.name not in statistics]
        if missing:
            raise ConfigError(
                f"feature-statistics lacks the schema's feature '{missing[0]}': the run's "
                "statistics were combined for another schema"
            )
        features = tuple(
            dataclasses.replace(f, centre=statistics[f.name][0], scale=statistics[f.name][1])
            if f.kind == NUMERIC
            else f
            for f in self.features
        )
        return dataclasses.replace(self, features=features)

    def label_index(self, codes: Sequence[str]) -> np.ndarray:
        """Class indices of raw label codes (every code must be in the list: check first)."""
        index = {lab.code: i for i, lab in enumerate(self.labels)}
        return np.array([index[canonical_code(c)] for c in codes], dtype=np.int64)

    def dumps(self) -> str:
        head = ["# fedpriv federation schema: every site normalises its features with it"]
        if self.derived_from:
            head += [
                f"# DRAFT derived from '{self.derived_from}': the ranges and categories are that",
                "# file's own extremes, which reveal its records' minima and maxima. Replace them",
                "# with public ranges the federation agrees on before sharing this file.",
                "# Categorical columns with three or more codes are one-hot (a draft cannot tell",
                '# whether codes are ordered); set encoding = "ordinal" where they are (a stage).',
            ]
        head.append(f"name = {_quote(self.name)}")
        if self.derived_from:
            head.append(f"derived-from = {_quote(self.derived_from)}")
        parts = ["\n".join(head)]
        parts += [f.to_toml() for f in self.features]
        parts += [
            f"[[label]]\ncode = {_quote(lab.code)}"
            + (f"\nname = {_quote(lab.name)}" * bool(lab.name))
            for lab in self.labels
        ]
        return "\n\n".join(parts) + "\n"

    def save(self, path: str | Path) -> Path:
        file = Path(path)
        file.write_text(self.dumps(), encoding="utf-8")
        return file

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "schema") -> Schema:
        try:
            unknown = sorted(set(data) - {"name", "derived-from", "feature", "label"})
            if unknown:
                raise ConfigError(f"unknown key '{unknown[0]}'")
            try:
                features = tuple(_feature(f) for f in data.get("feature", []))
                labels = tuple(
                    Label(code=canonical_code(str(lab["code"])), name=str(lab.get("name", "")))
                    for lab in data.get("label", [])
                )
            except (KeyError, TypeError) as exc:
                raise ConfigError(f"a [[feature]] or [[label]] lacks {exc}") from None
            return cls(
                features=features,
                labels=labels,
                name=str(data.get("name", "")),
                derived_from=str(data.get("derived-from", "")),
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _feature(table: Mapping[str, Any]) -> Feature:
    kind = str(table.get("kind", NUMERIC))
    name = str(table["name"])
    keys = {"name", "kind", "min", "max", "categories", "centre", "scale", "encoding"}
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"feature '{name}' has an unknown key '{unknown[0]}'")
    encoding = table.get("encoding", ORDINAL)
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        raise ConfigError(
            f"feature '{name}': encoding {encoding!r} is not one of {', '.join(ENCODINGS)}"
        )
    if kind == NUMERIC and "encoding" in table:
        raise ConfigError(
            f"feature '{name}': encoding is for categorical features (a numeric one is one column)"
        )
    try:
        bounds = (float(table["min"]), float(table["max"])) if kind == NUMERIC else (0.0, 1.0)
        categories = tuple(float(c) for c in table["categories"]) if kind == CATEGORICAL else ()
        centre = float(table["centre"]) if "centre" in table else None
        scale = float(table["scale"]) if "scale" in table else None
    except ValueError:
        raise ConfigError(f"feature '{name}': min, max and categories are numbers") from None
    if kind in (NUMERIC, CATEGORICAL):
        return Feature(
            name=name,
            kind=kind,
            minimum=bounds[0],
            maximum=bounds[1],
            categories=categories,
            centre=centre,
            scale=scale,
            encoding=encoding,
        )
    return Feature(name=name, kind=kind)  # refused with its reason


def canonical_code(value: str) -> str:
    """A label code as text, so that '1', '1.0' and ' 1' are the same code."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number.is_integer():
        return str(int(number))
    return repr(number)


def parse_feature_statistics(text: str) -> dict[str, tuple[float, float]]:
    """A run's ``feature-statistics`` (JSON ``{feature: [centre, scale]}``)."""
    try:
        data = json.loads(text)
        parsed = {str(k): (float(v[0]), float(v[1])) for k, v in dict(data).items()}
    except (ValueError, TypeError, KeyError, IndexError):
        raise ConfigError(
            "feature-statistics is not {feature: [centre, scale]} JSON: it is set by the "
            "server from the hospitals' releases, never by hand"
        ) from None
    for name, (centre, scale) in parsed.items():
        if not (math.isfinite(centre) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"feature-statistics: '{name}' needs a finite centre and scale > 0")
    return parsed


def load_schema(path: str | Path) -> Schema:
    """A schema file; ConfigError naming the file and the problem."""
    from fedpriv.config import read_toml

    return Schema.from_mapping(
        read_toml(path, what="schema file"), where=f"schema file '{Path(path)}'"
    )


def check_schema_digest(expected: str, schema: Schema | None, *, who: str) -> None:
    """Refuse (ConfigError) when ``who``'s schema is not the run's (``expected`` digest):
    its features would mean something else than everyone else's."""
    if not expected:
        return
    if schema is None:
        raise ConfigError(
            f"{who} has no schema but the run normalises by schema {expected[:12]}: give it "
            "the federation's schema.toml (site.toml: schema-path)"
        )
    if schema.digest != expected:
        raise ConfigError(
            f"{who}'s schema {schema.digest[:12]} differs from the run's {expected[:12]}: its "
            "features would mean something else; use the federation's schema.toml"
        )


def builtin_schema(dataset: str) -> Schema | None:
    """The schema an embedded dataset ships with (written down from its public definition),
    or None."""
    file = _BUILTIN / f"{dataset}.toml"
    return load_schema(file) if file.is_file() else None


def draft_schema(
    columns: Mapping[str, np.ndarray],
    label_codes: Sequence[str],
    *,
    derived_from: str,
    max_categories: int = 10,
) -> Schema:
    """A first schema from one file, for the federation to review: integer columns with at
    most ``max_categories`` values, each held by two records on average, become categorical;
    others numeric over the file's range rounded outward. Marked as derived from that file.

    A categorical column of three or more codes is drafted one-hot: nothing in a file says
    whether its codes are ordered (a stage) or nominal (a ward), and one-hot is right for
    both (a linear layer over one-hot columns can weight each category as an ordinal column
    would, while an ordinal column forces a monotone, evenly spaced effect on nominal codes),
    at the cost of k - 1 more inputs. A two-code column stays ordinal: one column already
    lets a model give each code its own effect, and one-hot would only duplicate it."""
    features = []
    for name, raw in columns.items():
        values = np.asarray(raw, dtype=np.float64)
        distinct = np.unique(values[np.isfinite(values)])
        if distinct.size == 0:
            raise ConfigError(f"column '{name}' holds no number to draft a range from")
        few = distinct.size <= max_categories and 2 * distinct.size <= values.size
        if few and np.all(distinct == np.round(distinct)):
            features.append(
                Feature(
                    name=name,
                    kind=CATEGORICAL,
                    categories=tuple(float(c) for c in distinct),
                    encoding=ONE_HOT if distinct.size >= 3 else ORDINAL,
                )
            )
            continue
        low, high = _round_outward(float(distinct[0]), float(distinct[-1]))
        features.append(Feature(name=name, kind=NUMERIC, minimum=low, maximum=high))
    codes = sorted({canonical_code(c) for c in label_codes}, key=_code_order)
    return Schema(
        features=tuple(features),
        labels=tuple(Label(code=c) for c in codes),
        name=Path(derived_from).stem,
        derived_from=derived_from,
    )


def _round_outward(low: float, high: float) -> tuple[float, float]:
    span = high - low
    if span <= 0:
        return low - 1.0, high + 1.0
    step = 10.0 ** math.floor(math.log10(span) - 1)
    return round(math.floor(low / step) * step, 12), round(math.ceil(high / step) * step, 12)


def _code_order(code: str) -> tuple[int, float | str]:
    try:
        return (0, float(code))
    except ValueError:
        return (1, code)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
