"""A categorical feature's encoding: ordinal (one column, the default) or one-hot (one column
per category). The model's input width is the sum of the features' widths; schemas written
before the key existed keep their meaning and digest; a bad value is one line naming the
feature; the site check and the draft say what they use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpriv.cli import app
from fedpriv.data import load_dataset, load_schema
from fedpriv.data.datasets import load_raw
from fedpriv.data.schema import (
    CATEGORICAL,
    ONE_HOT,
    ORDINAL,
    Feature,
    Label,
    Schema,
    builtin_schema,
    draft_schema,
)
from fedpriv.errors import ConfigError, DataError

SCHEMA = """
name = "wards"
[[feature]]
name = "age"
kind = "numeric"
min = 0
max = 100
[[feature]]
name = "ward"
kind = "categorical"
categories = [30, 10, 20, 40]
encoding = "one-hot"
[[feature]]
name = "stage"
kind = "categorical"
categories = [1, 2, 3]
[[label]]
code = "0"
[[label]]
code = "1"
"""

#: digests computed by the code before encodings existed (main at 024261c): a schema without
#: the key must keep meaning, and hashing to, exactly what it did
DIGESTS_BEFORE = {
    "breast-cancer": "e64ccc59fc3ac2687b202bd25b42a42c8bfcdf8429a61b80a655905831c5adbb",
    "digits": "fb1dc0ffd941eb1e17f40c8020c62e4505af8d61be714bd15ddb77ce08db679d",
}
#: tests/unit/test_schema.py's SCHEMA (an ordinal categorical feature), same origin
ORDINAL_SCHEMA_BEFORE = "44e9adb48e0b578d557439f9dd71f30c915f22220dff291a8d7e39325dec5be2"


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(SCHEMA)
    return path


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("patient,age,ward,stage,label\n" + "\n".join(rows) + "\n")
    return path


def test_one_hot_widens_the_input_and_round_trips(schema_file: Path) -> None:
    schema = load_schema(schema_file)
    ward = schema.features[1]
    assert ward.encoding == ONE_HOT and schema.features[2].encoding == ORDINAL
    assert schema.width == 1 + 4 + 1 and len(schema.features) == 3
    # categories in ascending code order, whatever order the file lists them in
    assert schema.input_names == ("age", "ward=10", "ward=20", "ward=30", "ward=40", "stage")
    assert list(schema.input_columns("ward")) == [1, 2, 3, 4]
    assert list(schema.input_columns("stage")) == [5]
    raw = np.array([[50.0, 30.0, 1.0], [0.0, 10.0, 3.0], [100.0, 40.0, 2.0]])
    expected = np.array(
        [
            [0.5, 0, 0, 1, 0, 0.0],
            [0.0, 1, 0, 0, 0, 1.0],
            [1.0, 0, 0, 0, 1, 0.5],
        ]
    )
    encoded = schema.normalise(raw)
    assert encoded.dtype == np.float32 and np.array_equal(encoded, expected)
    # the category is recovered from its columns: exactly one 1 per record
    block = encoded[:, list(schema.input_columns("ward"))]
    assert np.array_equal(block.sum(axis=1), np.ones(3))
    codes = np.sort(np.asarray(ward.categories))
    assert np.array_equal(codes[block.argmax(axis=1)], raw[:, 1])
    again = schema.save(schema_file.parent / "again.toml")
    assert 'encoding = "one-hot"' in again.read_text()
    reloaded = load_schema(again)
    assert reloaded == schema and reloaded.digest == schema.digest


def test_schemas_without_the_key_keep_their_digest(schema_file: Path) -> None:
    for name, digest in DIGESTS_BEFORE.items():
        schema = builtin_schema(name)
        assert schema is not None and schema.digest == digest
    from tests.unit.test_schema import SCHEMA as ORDINAL_TEXT

    plain = schema_file.parent / "plain.toml"
    plain.write_text(ORDINAL_TEXT)
    assert load_schema(plain).digest == ORDINAL_SCHEMA_BEFORE
    # saying ordinal out loud is the same meaning; one-hot is another
    explicit = plain.parent / "explicit.toml"
    explicit.write_text(
        ORDINAL_TEXT.replace("categories = [1, 2]", 'categories = [1, 2]\nencoding = "ordinal"')
    )
    assert load_schema(explicit).digest == ORDINAL_SCHEMA_BEFORE
    one_hot = plain.parent / "one-hot.toml"
    one_hot.write_text(
        ORDINAL_TEXT.replace("categories = [1, 2]", 'categories = [1, 2]\nencoding = "one-hot"')
    )
    assert load_schema(one_hot).digest != ORDINAL_SCHEMA_BEFORE


@pytest.mark.parametrize(
    ("encoding", "kind", "expected"),
    [
        ('"onehot"', "categorical", "feature 'ward': encoding 'onehot' is not one of"),
        ("1", "categorical", "feature 'ward': encoding 1 is not one of"),
        ('"one-hot"', "numeric", "feature 'ward': encoding is for categorical features"),
    ],
)
def test_a_bad_encoding_is_one_line_naming_the_feature(
    tmp_path: Path, encoding: str, kind: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[[feature]]\nname = "ward"\nkind = "{kind}"\nmin = 0\nmax = 1\n'
        f"categories = [1, 2, 3]\nencoding = {encoding}\n"
        '[[label]]\ncode = "0"\n[[label]]\ncode = "1"\n'
    )
    if kind == "numeric":  # categories are not a numeric feature's key either: drop them
        path.write_text(path.read_text().replace("categories = [1, 2, 3]\n", ""))
    with pytest.raises(ConfigError) as refused:
        load_schema(path)
    message = str(refused.value)
    assert expected in message and "schema file" in message and "\n" not in message
    with pytest.raises(ConfigError, match="feature 'w': unknown encoding 'dummy'"):
        Feature("w", kind=CATEGORICAL, categories=(1.0, 2.0), encoding="dummy")


def test_a_site_file_loads_one_hot_and_an_unknown_category_names_its_column(
    tmp_path: Path, schema_file: Path
) -> None:
    schema = load_schema(schema_file)
    data = _csv(tmp_path / "site.csv", ["p1,40,20,1,0", "p2,60,40,3,1", "p3,70,10,2,1"])
    dataset = load_dataset(str(data), patient_column="patient", schema=schema)
    assert dataset.features.shape == (3, 6) and dataset.input_names == schema.input_names
    assert np.array_equal(dataset.features[:, 1:5].argmax(axis=1), [1, 3, 0])
    assert dataset.raw_features is not None and dataset.raw_features.shape == (3, 3)
    bad = _csv(tmp_path / "bad.csv", ["p1,40,20,1,0", "p2,60,50,3,1"])
    with pytest.raises(DataError) as refused:
        load_dataset(str(bad), patient_column="patient", schema=schema)
    message = str(refused.value)
    assert "column 'ward'" in message and "not among its categories" in message
    assert "50 (record 2)" in message and "\n" not in message


def test_a_draft_one_hot_encodes_three_or_more_codes_and_says_so(tmp_path: Path) -> None:
    rows = [f"p{i},{20 + i},{10 * (1 + i % 4)},{1 + i % 2},{i % 2}" for i in range(30)]
    data = _csv(tmp_path / "site.csv", rows)
    raw = load_raw(str(data), patient_column="patient")
    assert raw.raw_features is not None
    columns = {n: raw.raw_features[:, j] for j, n in enumerate(raw.feature_names)}
    draft = draft_schema(columns, raw.record_label_codes(), derived_from=str(data))
    encodings = {f.name: (f.kind, f.encoding) for f in draft.features}
    assert encodings["ward"] == (CATEGORICAL, ONE_HOT)
    assert encodings["stage"] == (CATEGORICAL, ORDINAL)  # two codes: one column says it all
    text = draft.dumps()
    assert 'encoding = "one-hot"' in text and 'encoding = "ordinal"' in text
    assert "one-hot (a draft cannot tell" in text
    assert draft.width == 1 + 4 + 1
    assert load_dataset(str(data), patient_column="patient", schema=draft).features.shape == (
        30,
        6,
    )


def test_the_width_is_the_sum_of_feature_widths() -> None:
    features = (
        Feature("a", minimum=0, maximum=1),
        Feature("b", kind=CATEGORICAL, categories=(1.0, 2.0, 3.0), encoding=ONE_HOT),
        Feature("c", kind=CATEGORICAL, categories=tuple(float(c) for c in range(7))),
        Feature("d", kind=CATEGORICAL, categories=(5.0, 6.0), encoding=ONE_HOT),
    )
    schema = Schema(features=features, labels=(Label("0"), Label("1")))
    assert [f.width for f in features] == [1, 3, 1, 2] and schema.width == 7
    raw = np.array([[0.5, 2.0, 6.0, 5.0]])
    assert len(schema.input_names) == schema.width
    assert np.array_equal(schema.normalise(raw), [[0.5, 0, 1, 0, 1.0, 1, 0]])
    with pytest.raises(ValueError, match=r"expected \(n, 4\) raw values"):
        schema.normalise(np.zeros((1, 7)))  # model inputs are not raw values


runner = CliRunner()


def test_site_check_reports_features_and_model_inputs(tmp_path: Path, schema_file: Path) -> None:
    good = _csv(tmp_path / "good.csv", ["p1,40,20,1,0", "p2,60,40,3,1"])
    site = tmp_path / "site.toml"
    site.write_text(
        f'data-path = "{good}"\npatient-column = "patient"\nledger-path = "{tmp_path / "l.db"}"\n'
    )
    result = runner.invoke(app, ["site", "check", str(site), "--schema", str(schema_file)])
    assert result.exit_code == 0, result.output
    assert "features (6,)" in result.output
    assert "schema: matches (3 features, 6 model inputs, 2 label codes" in result.output
    bad = _csv(tmp_path / "bad.csv", ["p1,40,20,1,0", "p2,60,25,3,1"])
    site.write_text(site.read_text().replace(str(good), str(bad)))
    result = runner.invoke(app, ["site", "check", str(site), "--schema", str(schema_file)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(lines) == 1 and "column 'ward'" in lines[0] and "25 (record 2)" in lines[0]
    shown = runner.invoke(app, ["schema", "show", str(schema_file)])
    assert shown.exit_code == 0 and "categorical, one-hot" in shown.output
    assert "model inputs: 6" in shown.output
