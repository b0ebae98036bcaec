"""Record linkage: how easily a hospital's records can be re-identified from their
quasi-identifiers (age, postcode, sex, ...) joined with an outside list of names.

This checks the *data*, not a model: k-anonymity (the smallest group of records sharing
one combination of quasi-identifier values), distinct and entropy l-diversity of a
sensitive column within those groups, and which records are unique. It works on the values
exactly as they are written in the file (surrounding blanks aside): a linker matches what
is published, so "45" and "45.0" are different values here, and an empty cell is a value
like any other. Nothing computed here leaves the machine it runs on; the row numbers it
reports point into the hospital's own file.

Row numbers are 1-based record numbers: record 1 is the first row below the header. They
match the dataset's index space (``fedpriv.data.load_dataset`` reads a CSV's rows in file
order, record index ``i`` is record number ``i + 1``), which is what ``partitions.json``
refers to, so :func:`hospital_linkage` can report a simulated hospital's unique records by
their place in the shared file.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpriv.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_THRESHOLD",
    "LinkageReport",
    "hospital_linkage",
    "linkage_report",
    "parse_columns",
    "read_csv_rows",
]

#: groups smaller than this are reported as at risk (a common rule for health data)
DEFAULT_THRESHOLD = 5


@dataclasses.dataclass(frozen=True)
class LinkageReport:
    """What a linker could do with one table's quasi-identifiers. ``class_sizes`` maps a
    group size to how many groups have it; ``unique_rows`` are record numbers (1 = first
    row below the header); ``k_without`` is k with each quasi-identifier left out, so the
    column to generalise first is the one whose removal raises k most."""

    quasi_identifiers: tuple[str, ...]
    sensitive_column: str | None
    records: int
    k: int
    equivalence_classes: int
    class_sizes: Mapping[int, int]
    unique_rows: tuple[int, ...]
    threshold: int
    records_below_threshold: int
    l_distinct: int | None
    l_entropy: float | None
    k_without: Mapping[str, int]

    @property
    def unique_records(self) -> int:
        return len(self.unique_rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "quasi_identifiers": list(self.quasi_identifiers),
            "sensitive_column": self.sensitive_column,
            "records": self.records,
            "k": self.k,
            "equivalence_classes": self.equivalence_classes,
            "class_sizes": {str(size): n for size, n in sorted(self.class_sizes.items())},
            "unique_records": {"count": self.unique_records, "rows": list(self.unique_rows)},
            "threshold": self.threshold,
            "records_below_threshold": self.records_below_threshold,
            "l_diversity": None
            if self.l_distinct is None
            else {"distinct": self.l_distinct, "entropy": self.l_entropy},
            "k_without": dict(self.k_without),
        }

    def advice(self) -> list[str]:
        """Plain sentences for the hospital's data steward: what the numbers mean, what to do."""
        lines = []
        if self.k < self.threshold:
            lines.append(
                f"{self.records_below_threshold} of {self.records} records sit in groups smaller "
                f"than {self.threshold} on ({', '.join(self.quasi_identifiers)}): generalise "
                "these columns (age in bands, postcode to its district, dates to the year) or "
                "suppress them before the data is used or shared"
            )
        else:
            lines.append(
                f"every record shares its quasi-identifiers with at least {self.k - 1} others"
            )
        if self.k_without:
            column, best = max(self.k_without.items(), key=lambda item: (item[1], item[0]))
            if best > self.k:
                lines.append(f"leaving out '{column}' alone would raise k from {self.k} to {best}")
        if self.l_distinct is not None and self.l_distinct < 2:
            lines.append(
                f"some group holds a single value of '{self.sensitive_column}': whoever knows a "
                "patient's quasi-identifiers learns it without finding the record"
            )
        return lines


def parse_columns(text: str) -> tuple[str, ...]:
    """``"age, zip,sex"`` -> ``("age", "zip", "sex")``; empty or repeated names are refused."""
    names = tuple(part.strip() for part in text.split(","))
    if not any(names):
        raise ConfigError("--quasi-identifiers is empty: name the columns, e.g. age,zip,sex")
    if "" in names:
        raise ConfigError(f"--quasi-identifiers {text!r} has an empty column name")
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise ConfigError(f"--quasi-identifiers names '{repeated[0]}' twice")
    return names


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """A site's CSV as raw text by column name, one dict per record in file order (the same
    order and the same checks as the dataset loader, so record numbers agree with it)."""
    file = Path(path).expanduser()
    if file.suffix.lower() != ".csv":
        raise DataError(
            f"'{file}' is not a .csv file: linkage checks need named columns, which only a "
            "CSV has (a .npz holds images without quasi-identifiers)"
        )
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            raw = list(reader)
    except FileNotFoundError:
        raise DataError(f"dataset file '{file}' does not exist: check the path") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"'{file}' is not a readable CSV file: {exc}") from None
    if not header:
        raise DataError(f"'{file}' is empty: a CSV needs a header row and records")
    names = [h.strip() for h in header]
    if len(set(names)) != len(names):
        duplicate = next(h for h in names if names.count(h) > 1)
        raise DataError(f"'{file}' names the column '{duplicate}' twice")
    rows = []
    for line, values in enumerate(raw, start=2):
        if len(values) != len(names):
            raise DataError(
                f"'{file}' line {line}: {len(values)} fields, the header has {len(names)}"
            )
        rows.append({n: v.strip() for n, v in zip(names, values, strict=True)})
    if not rows:
        raise DataError(f"'{file}' has a header but no records")
    return rows


def linkage_report(
    rows: Sequence[Mapping[str, str]],
    quasi_identifiers: Sequence[str],
    sensitive: str | None = None,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    row_numbers: Sequence[int] | None = None,
) -> LinkageReport:
    """k-anonymity, l-diversity and unique records of ``rows`` on ``quasi_identifiers``.

    ``row_numbers`` name the rows in the report (default 1, 2, ...); a hospital's share of
    a larger file passes its own numbers so they point into that file.
    """
    qi = tuple(quasi_identifiers)
    if not qi:
        raise ConfigError("no quasi-identifiers given: name the columns, e.g. age,zip,sex")
    if threshold < 1:
        raise ConfigError(f"the group-size threshold must be at least 1 (got {threshold})")
    if not rows:
        raise DataError("no records to check")
    columns = list(rows[0])
    for name in (*qi, *([sensitive] if sensitive is not None else [])):
        if name not in columns:
            raise DataError(f"the data has no column '{name}' (columns: {', '.join(columns)})")
    if sensitive is not None and sensitive in qi:
        raise ConfigError(
            f"the sensitive column '{sensitive}' is also a quasi-identifier: name it once"
        )
    numbers = list(row_numbers) if row_numbers is not None else list(range(1, len(rows) + 1))
    if len(numbers) != len(rows):
        raise ValueError(f"{len(numbers)} row numbers for {len(rows)} rows")

    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        groups[tuple(row[c] for c in qi)].append(position)
    sizes = [len(members) for members in groups.values()]
    k = min(sizes)

    l_distinct: int | None = None
    l_entropy: float | None = None
    if sensitive is not None:
        smallest_entropy = math.inf
        l_distinct = len(rows)
        for members in groups.values():
            counts = Counter(rows[p][sensitive] for p in members)
            l_distinct = min(l_distinct, len(counts))
            total = len(members)
            entropy = -sum(c / total * math.log(c / total) for c in counts.values())
            smallest_entropy = min(smallest_entropy, entropy)
        l_entropy = math.exp(smallest_entropy)

    return LinkageReport(
        quasi_identifiers=qi,
        sensitive_column=sensitive,
        records=len(rows),
        k=k,
        equivalence_classes=len(groups),
        class_sizes=dict(sorted(Counter(sizes).items())),
        unique_rows=tuple(sorted(numbers[m[0]] for m in groups.values() if len(m) == 1)),
        threshold=threshold,
        records_below_threshold=sum(s for s in sizes if s < threshold),
        l_distinct=l_distinct,
        l_entropy=l_entropy,
        k_without={c: _k(rows, [q for q in qi if q != c]) for c in qi} if len(qi) > 1 else {},
    )


def _k(rows: Sequence[Mapping[str, str]], qi: Sequence[str]) -> int:
    return min(Counter(tuple(row[c] for c in qi) for row in rows).values())


def hospital_linkage(
    csv_path: str | Path,
    records_per_hospital: Mapping[str, Sequence[int]],
    quasi_identifiers: Sequence[str],
    sensitive: str | None = None,
    *,
    threshold: int = DEFAULT_THRESHOLD,
) -> dict[str, LinkageReport]:
    """One report per simulated hospital, on that hospital's records only.

    ``records_per_hospital`` holds dataset record indices (0-based, as in
    ``partitions.json``: a hospital's ``train`` plus ``held_out``); the reports name rows by
    record number (index + 1) in ``csv_path``. Every hospital is checked alone because
    each publishes, or loses, only its own records.
    """
    rows = read_csv_rows(csv_path)
    reports = {}
    for hospital, indices in records_per_hospital.items():
        picked = sorted({int(i) for i in indices})
        if not picked:
            raise DataError(f"hospital '{hospital}' holds no records to check")
        bad = [i for i in (picked[0], picked[-1]) if not 0 <= i < len(rows)]
        if bad:
            raise DataError(
                f"hospital '{hospital}' refers to record index {bad[0]}, but '{csv_path}' "
                f"has {len(rows)} records (indices 0 to {len(rows) - 1})"
            )
        reports[hospital] = linkage_report(
            [rows[i] for i in picked],
            quasi_identifiers,
            sensitive,
            threshold=threshold,
            row_numbers=[i + 1 for i in picked],
        )
    return reports
