"""Record linkage checks: k-anonymity, l-diversity and unique records of a site's CSV.

Checked against pyCANON's answers (recorded in tests/fixtures/linkage-pycanon.json by
tests/fixtures/make_linkage_reference.py, which runs pyCANON in its own environment because
its pinned dependencies clash with Flower's), and against a brute-force pairwise count
written here without grouping.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpriv.cli import app
from fedpriv.client.site import site_linkage
from fedpriv.data import load_dataset
from fedpriv.errors import ConfigError, DataError
from fedpriv.privacy.audit.linkage import (
    hospital_linkage,
    linkage_report,
    parse_columns,
    read_csv_rows,
)

REFERENCE = Path(__file__).parents[1] / "fixtures" / "linkage-pycanon.json"
runner = CliRunner()

Rows = Sequence[Mapping[str, str]]


# ---- the independent counts ------------------------------------------------------------


def _same(a: Mapping[str, str], b: Mapping[str, str], qi: Sequence[str]) -> bool:
    return all(a[c] == b[c] for c in qi)


def _brute_force(rows: Rows, qi: Sequence[str], sensitive: str, threshold: int) -> dict:
    """Every figure by comparing each record with every other: O(n^2), no grouping."""
    n = len(rows)
    peers = [[j for j in range(n) if _same(rows[i], rows[j], qi)] for i in range(n)]
    sizes = [len(p) for p in peers]
    # a group is counted once, at its first member
    firsts = [i for i in range(n) if peers[i][0] == i]
    histogram: dict[int, int] = {}
    for i in firsts:
        histogram[sizes[i]] = histogram.get(sizes[i], 0) + 1
    entropies = []
    for i in firsts:
        values = [rows[j][sensitive] for j in peers[i]]
        shares = [values.count(v) / len(values) for v in set(values)]
        entropies.append(-sum(s * math.log(s) for s in shares))
    return {
        "k": min(sizes),
        "classes": len(firsts),
        "histogram": histogram,
        "unique": tuple(i + 1 for i in range(n) if sizes[i] == 1),
        "below": sum(1 for s in sizes if s < threshold),
        "l": min(len({rows[j][sensitive] for j in peers[i]}) for i in range(n)),
        "entropy_l": math.exp(min(entropies)),
        "k_without": {
            c: min(sum(1 for b in rows if _same(a, b, [q for q in qi if q != c])) for a in rows)
            for c in qi
        }
        if len(qi) > 1
        else {},
    }


def _random_rows(seed: int, records: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "age": rng.choice(["30", "40", "50", "60"]),
            "zip": rng.choice(["1000", "1001", "2000"]),
            "sex": rng.choice(["0", "1"]),
            "weight": f"{rng.randint(50, 52)}",
            "diagnosis": rng.choice(["flu", "cold", "asthma"]),
        }
        for _ in range(records)
    ]


# ---- against the references ------------------------------------------------------------


def test_k_and_l_match_pycanon() -> None:
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    tables = [
        [dict(zip(t["columns"], r, strict=True)) for r in t["rows"]] for t in reference["tables"]
    ]
    assert len(reference["cases"]) >= 10
    seen_k = set()
    for case in reference["cases"]:
        report = linkage_report(tables[case["table"]], case["quasi_identifiers"], case["sensitive"])
        where = f"table {case['table']} on {case['quasi_identifiers']}"
        assert report.k == case["k"], where
        assert report.l_distinct == case["l"], where
        # pyCANON reports entropy l rounded down
        assert report.l_entropy is not None
        assert case["entropy_l"] - 1e-9 <= report.l_entropy < case["entropy_l"] + 1 + 1e-9, where
        seen_k.add(case["k"])
    assert len(seen_k) >= 4  # the reference covers small and large groups, not only k = 1


@pytest.mark.parametrize(
    ("seed", "records", "qi"),
    [
        (1, 60, ("age", "sex")),
        (2, 150, ("age", "zip", "sex")),
        (3, 200, ("age", "zip", "sex", "weight")),
        (4, 40, ("zip",)),
        (5, 120, ("weight", "sex")),
    ],
)
def test_every_figure_matches_a_pairwise_count(
    seed: int, records: int, qi: tuple[str, ...]
) -> None:
    rows = _random_rows(seed, records)
    expected = _brute_force(rows, qi, "diagnosis", threshold=5)
    report = linkage_report(rows, qi, "diagnosis", threshold=5)
    assert report.k == expected["k"]
    assert report.equivalence_classes == expected["classes"]
    assert dict(report.class_sizes) == expected["histogram"]
    assert report.unique_rows == expected["unique"]
    assert report.records_below_threshold == expected["below"]
    assert report.l_distinct == expected["l"]
    assert report.l_entropy == pytest.approx(expected["entropy_l"], rel=1e-12)
    assert dict(report.k_without) == expected["k_without"]


def test_a_table_worked_by_hand() -> None:
    rows = [
        {"age": "40", "zip": "1000", "dx": "flu"},
        {"age": "40", "zip": "1000", "dx": "cold"},
        {"age": "40", "zip": "1000", "dx": "flu"},
        {"age": "50", "zip": "1000", "dx": "flu"},  # unique
        {"age": "40", "zip": "2000", "dx": "hiv"},  # unique
        {"age": "40.0", "zip": "2000", "dx": "hiv"},  # unique: raw text, not the number
    ]
    report = linkage_report(
        rows, ["age", "zip"], "dx", threshold=3, row_numbers=[11, 12, 13, 14, 15, 16]
    )
    assert (report.k, report.equivalence_classes, report.unique_rows) == (1, 4, (14, 15, 16))
    assert report.records_below_threshold == 3
    assert report.l_distinct == 1
    assert report.l_entropy == pytest.approx(1.0)
    # leaving out age leaves groups {1000} x 4 and {2000} x 2; leaving out zip: 40 x 4, 50, 40.0
    assert report.k_without == {"age": 2, "zip": 1}
    document = report.to_json()
    assert document == {
        "quasi_identifiers": ["age", "zip"],
        "sensitive_column": "dx",
        "records": 6,
        "k": 1,
        "equivalence_classes": 4,
        "class_sizes": {"1": 3, "3": 1},
        "unique_records": {"count": 3, "rows": [14, 15, 16]},
        "threshold": 3,
        "records_below_threshold": 3,
        "l_diversity": {"distinct": 1, "entropy": pytest.approx(1.0)},
        "k_without": {"age": 2, "zip": 1},
    }
    json.dumps(document)  # plain JSON types only
    advice = " ".join(report.advice())
    assert (
        "3 of 6 records" in advice and "leaving out 'age' alone would raise k from 1 to 2" in advice
    )
    no_sensitive = linkage_report(rows[:3], ["age", "zip"])
    assert no_sensitive.l_distinct is None and no_sensitive.to_json()["l_diversity"] is None
    assert no_sensitive.k == 3 and no_sensitive.unique_rows == ()
    # entropy l of one group holding flu, cold, flu: exp(-(2/3 ln 2/3 + 1/3 ln 1/3))
    entropy = linkage_report(rows[:3], ["age"], "dx").l_entropy
    assert entropy == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))


# ---- bad input -------------------------------------------------------------------------


def test_bad_columns_are_named() -> None:
    rows = [{"age": "40", "zip": "1000", "dx": "flu"}]
    with pytest.raises(DataError, match=r"no column 'sex' \(columns: age, zip, dx\)"):
        linkage_report(rows, ["age", "sex"])
    with pytest.raises(DataError, match="no column 'diagnosis'"):
        linkage_report(rows, ["age"], "diagnosis")
    with pytest.raises(ConfigError, match="no quasi-identifiers"):
        linkage_report(rows, [])
    with pytest.raises(ConfigError, match="also a quasi-identifier"):
        linkage_report(rows, ["age", "dx"], "dx")
    assert parse_columns(" age, zip ,sex") == ("age", "zip", "sex")
    for text, message in (
        ("", "is empty"),
        (" , ", "is empty"),
        ("age,,zip", "empty column"),
        ("age,age", "'age' twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_columns(text)


def test_only_a_csv_has_named_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a \.csv file: linkage checks need named columns"):
        read_csv_rows(tmp_path / "site.npz")
    with pytest.raises(DataError, match="does not exist"):
        read_csv_rows(tmp_path / "missing.csv")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("age,zip\n40,1000\n50\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3: 1 fields"):
        read_csv_rows(ragged)


# ---- simulated hospitals: record indices -> the file's rows ----------------------------


def _write_csv(path: Path, rows: Rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_hospital_reports_use_the_dataset_index_space(tmp_path: Path) -> None:
    clean = [{**r, "diagnosis": str(i % 3)} for i, r in enumerate(_random_rows(7, 90))]
    # blanks around a value are not part of it: " 40" in one row is "40" in another
    written = [dict(r, age=f" {r['age']}" if i % 2 else r["age"]) for i, r in enumerate(clean)]
    path = tmp_path / "shared.csv"
    _write_csv(path, written)
    # dataset record i is the file's record i + 1, in file order
    dataset = load_dataset(str(path), label_column="diagnosis")
    assert np.array_equal(dataset.source.numeric["weight"], [float(r["weight"]) for r in clean])
    order = np.random.default_rng(0).permutation(len(clean))
    split = {"a": order[:30].tolist(), "b": order[30:].tolist()}
    qi = ["age", "zip", "sex"]
    reports = hospital_linkage(path, split, qi, "diagnosis")
    for name, indices in split.items():
        expected = _brute_force([clean[i] for i in sorted(indices)], qi, "diagnosis", threshold=5)
        report = reports[name]
        assert (report.records, report.k, report.l_distinct) == (
            len(indices),
            expected["k"],
            expected["l"],
        )
        # unique rows are named by their place in the shared file, among this hospital's rows
        alone = [i for i in indices if sum(_same(clean[i], clean[j], qi) for j in indices) == 1]
        assert report.unique_rows == tuple(sorted(i + 1 for i in alone))
    assert reports["a"].unique_records >= 1  # the case is not vacuous
    with pytest.raises(DataError, match=r"record index 90, but .* has 90 records"):
        hospital_linkage(path, {"a": [0, 90]}, ["age"])


# ---- the site command ------------------------------------------------------------------


def _site(tmp_path: Path, rows: Rows, data_name: str = "site.csv") -> Path:
    data = tmp_path / data_name
    if data.suffix == ".csv":
        _write_csv(data, rows)
    settings = tmp_path / "site.toml"
    settings.write_text(
        f'data-path = "{data}"\nledger-path = "{tmp_path / "ledger.sqlite"}"\n'
        'label-column = "diagnosis"\n',
        encoding="utf-8",
    )
    return settings


def test_site_check_reports_k_and_l(tmp_path: Path) -> None:
    rows = _random_rows(11, 80)
    settings = _site(tmp_path, rows)
    expected = _brute_force(rows, ["age", "sex"], "diagnosis", threshold=5)
    result = runner.invoke(
        app,
        [
            "site",
            "check",
            str(settings),
            "--quasi-identifiers",
            "age,sex",
            "--sensitive-column",
            "diagnosis",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    linkage = document["linkage"]
    assert (linkage["k"], linkage["l_diversity"]["distinct"]) == (expected["k"], expected["l"])
    assert linkage["unique_records"]["rows"] == list(expected["unique"])
    assert document["sent"].startswith("nothing")
    assert any(c.startswith("data-path: 80 records") for c in document["checks"])
    text = runner.invoke(
        app, ["site", "check", str(settings), "--quasi-identifiers", "age,zip,sex,weight"]
    )
    assert text.exit_code == 0, text.output
    report = site_linkage(
        {"data-path": str(tmp_path / "site.csv")}, ["age", "zip", "sex", "weight"]
    )
    assert f"k = {report.k}," in text.output
    assert f"{report.unique_records} records are unique" in text.output
    assert "nothing was sent" in text.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--quasi-identifiers", "age,postcode"],
            "no column 'postcode' (columns: age, zip, sex, weight, diagnosis)",
        ),
        (["--quasi-identifiers", "age", "--sensitive-column", "hiv"], "no column 'hiv'"),
        (["--quasi-identifiers", ","], "--quasi-identifiers is empty"),
        (["--sensitive-column", "diagnosis"], "--sensitive-column needs --quasi-identifiers"),
    ],
)
def test_site_check_bad_columns_give_one_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    settings = _site(tmp_path, _random_rows(12, 20))
    result = runner.invoke(app, ["site", "check", str(settings), *args])
    assert result.exit_code == 2, result.output
    output = result.output.strip()
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert expected in output


def test_site_check_on_images_says_there_are_no_columns(tmp_path: Path) -> None:
    images = {
        f"{split}_{part}": (
            np.zeros((4, 28, 28), dtype=np.uint8)
            if part == "images"
            else np.array([[0], [1], [0], [1]])
        )
        for split in ("train", "val", "test")
        for part in ("images", "labels")
    }
    np.savez(tmp_path / "site.npz", **images)
    settings = _site(tmp_path, [], data_name="site.npz")
    result = runner.invoke(app, ["site", "check", str(settings), "--quasi-identifiers", "age"])
    assert result.exit_code == 2, result.output
    output = result.output.strip()
    assert len(output.splitlines()) == 1 and "linkage checks need named columns" in output
