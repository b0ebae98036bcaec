"""The federation's schema: what each feature means, its public range, and the label codes.

Every site normalises with the schema's *public* ranges, record by record, so a feature value
means the same at every hospital and no statistic of anyone's records enters the model's
inputs. A site's file is checked against the schema before it trains; a mismatch is refused
with one line naming the column.

Normalisation: a numeric feature maps its range ``[min, max]`` linearly onto ``[0, 1]``, or,
when the schema gives a public reference ``centre`` and ``scale`` (e.g. population norms, or
the published statistics of a public dataset), becomes ``(x - centre) / scale``; a
categorical feature maps the i-th of its k listed categories onto ``i / (k - 1)`` (one column
per feature, so the model's input width is the number of features and a feature's name points
at one input column). Columns a file holds beyond the schema's are ignored: they never reach
the model (a site's local identifiers or notes are common and harmless there), though they
still identify the record in the privacy ledger, exactly as without a schema.

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
    "NUMERIC",
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

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a schema feature needs a name")
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

    def transform(self, values: np.ndarray) -> np.ndarray:
        """The public, per-record transformation (nothing here depends on other records)."""
        if self.kind == NUMERIC and self.centre is not None and self.scale is not None:
            return (values - self.centre) / self.scale
        if self.kind == NUMERIC:
            return (values - self.minimum) / (self.maximum - self.minimum)
        codes = np.asarray(self.categories, dtype=np.float64)
        order = np.argsort(codes)
        position = order[np.searchsorted(codes[order], values).clip(0, codes.size - 1)]
        return position / max(codes.size - 1, 1)

    def to_toml(self) -> str:
        lines = ["[[feature]]", f"name = {_quote(self.name)}", f'kind = "{self.kind}"']
        if self.kind == NUMERIC:
            lines += [f"min = {_number(self.minimum)}", f"max = {_number(self.maximum)}"]
            if self.centre is not None and self.scale is not None:
                lines += [f"centre = {_number(self.centre)}", f"scale = {_number(self.scale)}"]
        else:
            lines.append(f"categories = [{', '.join(_number(c) for c in self.categories)}]")
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
        """The model's input width: one column per feature."""
        return len(self.features)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(lab.name or lab.code for lab in self.labels)

    @property
    def digest(self) -> str:
        """SHA-256 of what the schema means (features, ranges, categories, labels): two sites
        with the same digest read every feature and label the same way."""
        meaning = {
            "features": [
                [f.name, f.kind, f.minimum, f.maximum, f.centre, f.scale]
                if f.kind == NUMERIC
                else [f.name, f.kind, list(f.categories)]
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
        """Raw ``(n, width)`` values in schema order -> float32 model inputs; uses
        nothing but the schema, so a record normalises the same at every site."""
        matrix = np.asarray(raw, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self.width:
            raise ValueError(f"expected (n, {self.width}) raw values, got {matrix.shape}")
        out = np.empty(matrix.shape, dtype=np.float64)
        for j, feature in enumerate(self.features):
            out[:, j] = feature.transform(matrix[:, j])
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
    unknown = sorted(set(table) - {"name", "kind", "min", "max", "categories", "centre", "scale"})
    if unknown:
        raise ConfigError(f"feature '{name}' has an unknown key '{unknown[0]}'")
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
    others numeric over the file's range rounded outward. Marked as derived from that file."""
    features = []
    for name, raw in columns.items():
        values = np.asarray(raw, dtype=np.float64)
        distinct = np.unique(values[np.isfinite(values)])
        if distinct.size == 0:
            raise ConfigError(f"column '{name}' holds no number to draft a range from")
        few = distinct.size <= max_categories and 2 * distinct.size <= values.size
        if few and np.all(distinct == np.round(distinct)):
            features.append(
                Feature(name=name, kind=CATEGORICAL, categories=tuple(float(c) for c in distinct))
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
