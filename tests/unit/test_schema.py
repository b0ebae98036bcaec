"""The federation's schema: refusals naming the column, the same public transformation at
every site, no statistic pooled over hospitals, and record identities untouched by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpriv.cli import app
from fedpriv.config import RunConfig
from fedpriv.data import load_dataset, load_schema
from fedpriv.data.datasets import load_raw
from fedpriv.data.schema import (
    Feature,
    Label,
    Schema,
    builtin_schema,
    canonical_code,
    draft_schema,
)
from fedpriv.errors import ConfigError, DataError

SCHEMA = """
name = "test-federation"
[[feature]]
name = "age"
kind = "numeric"
min = 0
max = 100
[[feature]]
name = "sex"
kind = "categorical"
categories = [1, 2]
[[feature]]
name = "bp"
kind = "numeric"
min = 50
max = 250
[[label]]
code = "0"
name = "healthy"
[[label]]
code = "1"
name = "ill"
[[label]]
code = "2"
name = "severe"
"""


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(SCHEMA)
    return path


def _csv(path: Path, rows: list[str], header: str = "patient,age,sex,bp,label") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_schema_round_trips_and_its_digest_is_its_meaning(schema_file: Path) -> None:
    schema = load_schema(schema_file)
    assert schema.feature_names == ("age", "sex", "bp") and schema.width == 3
    assert schema.class_names == ("healthy", "ill", "severe")
    again = schema_file.parent / "again.toml"
    schema.save(again)
    assert load_schema(again) == schema and load_schema(again).digest == schema.digest
    wider = Schema(
        features=(Feature("age", maximum=120), *schema.features[1:]), labels=schema.labels
    )
    assert wider.digest != schema.digest  # a different range is a different meaning


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[feature]]\nname = "a"\nkind = "text"', "unknown kind 'text'"),
        ('[[feature]]\nname = "a"\nmin = 5\nmax = 1', "min 5 must be below max 1"),
        ('[[feature]]\nname = "a"\nkind = "categorical"', "lacks 'categories'"),
        ('[[feature]]\nname = "a"\nmin = 0\nmax = 1\n[[label]]\ncode = 0', "two [[label]]"),
        ('colour = "red"', "unknown key 'colour'"),
    ],
)
def test_a_malformed_schema_file_is_one_clear_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="schema file") as refused:
        load_schema(path)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("header", "row", "column", "what"),
    [
        ("patient,age,sex,label", "p9,40,1,0", "bp", "is missing"),
        ("patient,age,sex,bp,label", "p9,140,1,120,0", "age", "outside its range [0, 100]"),
        ("patient,age,sex,bp,label", "p9,40,3,120,0", "sex", "not among its categories"),
        ("patient,age,sex,bp,label", "p9,40,1,120,7", "label", "label code(s) 7 not in"),
    ],
)
def test_a_file_that_does_not_match_is_refused_naming_the_column(
    tmp_path: Path, schema_file: Path, header: str, row: str, column: str, what: str
) -> None:
    good = "p1,30,1,110,0" if "bp" in header else "p1,30,1,0"
    data = _csv(tmp_path / "site.csv", [good, row], header)
    with pytest.raises(DataError) as refused:
        load_dataset(str(data), patient_column="patient", schema=load_schema(schema_file))
    message = str(refused.value)
    assert f"column '{column}'" in message and what in message and "\n" not in message


def test_the_same_record_normalises_identically_at_every_site(
    tmp_path: Path, schema_file: Path
) -> None:
    """Deployment: two sites with very different patients share one record's values."""
    shared = "x,55,2,130,1"
    young = _csv(
        tmp_path / "young.csv", [shared] + [f"y{i},{20 + i},1,{100 + i},0" for i in range(9)]
    )
    old = _csv(tmp_path / "old.csv", [f"o{i},{80 + i},2,{200 + i},2" for i in range(9)] + [shared])
    schema = load_schema(schema_file)
    a = load_dataset(str(young), patient_column="patient", schema=schema)
    b = load_dataset(str(old), patient_column="patient", schema=schema)
    assert np.array_equal(a.features[0], b.features[-1])
    assert np.allclose(a.features[0], [0.55, 1.0, 0.4])  # (55-0)/100, 2nd of 2, (130-50)/200
    assert a.labels[0] == b.labels[-1] == 1 and a.num_classes == b.num_classes == 3
    # what the schema fixes: per-file standardisation gives the same record two meanings
    a_file = load_dataset(str(young), patient_column="patient", normalisation="file")
    b_file = load_dataset(str(old), patient_column="patient", normalisation="file")
    assert not np.allclose(a_file.features[0], b_file.features[-1])


def test_label_codes_follow_the_schema_not_the_codes_a_file_happens_to_hold(
    tmp_path: Path, schema_file: Path
) -> None:
    """Before, a site holding codes 1 and 2 only numbered them 0 and 1."""
    data = _csv(tmp_path / "site.csv", ["a,30,1,110,1", "b,40,2,120,2", "c,50,1,130,2"])
    schema = load_schema(schema_file)
    loaded = load_dataset(str(data), patient_column="patient", schema=schema)
    assert loaded.labels.tolist() == [1, 2, 2] and loaded.num_classes == 3
    per_file = load_dataset(str(data), patient_column="patient", normalisation="file")
    assert per_file.labels.tolist() == [0, 1, 1]  # the old way: code 1 became class 0
    assert canonical_code(" 2.0") == canonical_code("2") == "2"


def test_simulation_uses_no_statistic_pooled_over_hospitals(
    tmp_path: Path, schema_file: Path
) -> None:
    """A hospital's inputs do not change when another hospital's records change."""
    from fedpriv.client.hospital import local_data

    rng = np.random.default_rng(0)
    rows = [
        f"p{i},{rng.integers(1, 99)},{rng.integers(1, 3)},{rng.integers(60, 240)},{i % 3}"
        for i in range(120)
    ]
    first = _csv(tmp_path / "first.csv", rows)
    config = RunConfig(
        dataset=str(first),
        patient_column="patient",
        schema=str(schema_file),
        hospitals=3,
        out=str(tmp_path),
    )
    before = local_data(config, {"partition-id": 0})
    hospital_1 = set(local_data(config, {"partition-id": 1}).train_records.patient_ids)
    changed = [
        (r.replace(r.split(",")[1], "99", 1) if r.split(",")[0] in hospital_1 else r) for r in rows
    ]
    second = _csv(tmp_path / "second.csv", changed)
    assert changed != rows
    after = local_data(config.replace(dataset=str(second)), {"partition-id": 0})
    assert np.array_equal(before.train_features, after.train_features)
    assert np.array_equal(before.held_out_features, after.held_out_features)
    # per-file standardisation would have moved them: the test can see a pooled statistic
    pooled = config.replace(schema="", normalisation="file")
    assert not np.array_equal(
        local_data(pooled, {"partition-id": 0}).train_features,
        local_data(pooled.replace(dataset=str(second)), {"partition-id": 0}).train_features,
    )


def test_record_identities_do_not_depend_on_the_normalisation(
    tmp_path: Path, schema_file: Path
) -> None:
    """The ledger keys a record by its raw file values: a schema must not re-identify it."""
    from fedpriv.client.hospital import held_out_by_patient

    data = _csv(
        tmp_path / "site.csv", [f"p{i},{i},{1 + i % 2},{100 + i},{i % 3}" for i in range(40)]
    )
    schema = load_schema(schema_file)
    for patient in ("patient", ""):
        header_file = (
            data
            if patient
            else _csv(
                tmp_path / "nopatient.csv",
                [f"{i},{1 + i % 2},{100 + i},{i % 3}" for i in range(40)],
                header="age,sex,bp,label",
            )
        )
        plain = load_dataset(str(header_file), patient_column=patient, normalisation="file")
        by_schema = load_dataset(str(header_file), patient_column=patient, schema=schema)
        assert not np.allclose(plain.features, by_schema.features)
        assert plain.source.row_material() == by_schema.source.row_material()
        assert np.array_equal(
            held_out_by_patient(plain.source, 3, 0.2), held_out_by_patient(by_schema.source, 3, 0.2)
        )
    cancer = load_dataset("breast-cancer")
    cancer_file = load_dataset("breast-cancer", normalisation="file")
    assert cancer.source.row_material() == cancer_file.source.row_material()


def test_columns_beyond_the_schema_are_ignored_but_still_identify_the_record(
    tmp_path: Path, schema_file: Path
) -> None:
    data = _csv(
        tmp_path / "site.csv",
        ["p1,30,1,110,0,ward A", "p2,40,2,120,1,ward B"],
        header="patient,age,sex,bp,label,note",
    )
    loaded = load_dataset(str(data), patient_column="patient", schema=load_schema(schema_file))
    assert loaded.feature_names == ("age", "sex", "bp") and loaded.features.shape == (2, 3)
    assert "note" in loaded.source.columns


def test_embedded_datasets_use_their_public_schemas() -> None:
    cancer, digits = builtin_schema("breast-cancer"), builtin_schema("digits")
    assert cancer is not None and digits is not None
    assert cancer.width == 30 and [lab.name for lab in cancer.labels] == ["malignant", "benign"]
    assert digits.width == 64 and all(f.minimum == 0 and f.maximum == 16 for f in digits.features)
    data = load_dataset("breast-cancer")
    assert data.schema == cancer and np.abs(data.features.mean(axis=0)).max() < 0.01
    assert load_dataset("digits").features.max() == 1.0  # pixels 0..16 onto [0, 1], as before


def test_a_public_centre_and_scale_replace_the_range_mapping(tmp_path: Path) -> None:
    text = SCHEMA.replace("max = 100\n", "max = 100\ncentre = 50\nscale = 10\n", 1)
    path = tmp_path / "centred.toml"
    path.write_text(text)
    schema = load_schema(path)
    assert (
        schema.features[0].centre == 50
        and schema.digest != load_schema_text(SCHEMA, tmp_path).digest
    )
    data = _csv(tmp_path / "site.csv", ["a,70,1,150,0", "b,40,2,250,1"])
    loaded = load_dataset(str(data), patient_column="patient", schema=schema)
    assert np.allclose(loaded.features[:, 0], [2.0, -1.0]) and np.allclose(
        loaded.features[:, 2], [0.5, 1.0]
    )
    schema.save(tmp_path / "again.toml")
    assert load_schema(tmp_path / "again.toml") == schema
    path.write_text(SCHEMA.replace("max = 100\n", "max = 100\ncentre = 50\n", 1))
    with pytest.raises(ConfigError, match="both centre and scale"):
        load_schema(path)


def load_schema_text(text: str, where: Path) -> Schema:
    path = where / "plain.toml"
    path.write_text(text)
    return load_schema(path)


def test_the_run_refuses_a_dataset_whose_schema_is_not_the_runs(
    tmp_path: Path, schema_file: Path
) -> None:
    from fedpriv.data import dataset_for

    config = RunConfig(dataset="breast-cancer", schema_digest="0" * 64)
    with pytest.raises(ConfigError, match="differs from the run's 000000000000"):
        dataset_for(config)
    with pytest.raises(ConfigError, match="unknown normalisation"):
        RunConfig(normalisation="zscore")
    with pytest.raises(ConfigError, match="contradict"):
        RunConfig(schema=str(schema_file), normalisation="file")
    data = _csv(tmp_path / "site.csv", ["a,30,1,110,1"])
    with pytest.raises(DataError, match="has no schema and normalisation is 'schema'"):
        load_dataset(str(data), patient_column="patient", normalisation="schema")


def _site(tmp_path: Path, data: Path, schema: Path | None) -> dict[str, str]:
    config = {"data-path": str(data), "patient-column": "patient", "hospital-name": "st-mary"}
    if schema is not None:
        config["schema-path"] = str(schema)
    return config


def test_a_site_whose_schema_differs_from_the_runs_refuses(
    tmp_path: Path, schema_file: Path
) -> None:
    from fedpriv.client.hospital import local_data

    data = _csv(tmp_path / "site.csv", [f"p{i},{30 + i},1,110,{i % 2}" for i in range(10)])
    digest = load_schema(schema_file).digest
    run = RunConfig(deployment=True, schema_digest=digest)
    ours = local_data(run, _site(tmp_path, data, schema_file))
    assert ours.train_features.shape[1] == 3
    other = tmp_path / "other.toml"
    other.write_text(SCHEMA.replace("max = 100", "max = 120"))
    with pytest.raises(ConfigError, match=r"site 'st-mary''s schema .* differs from the run's"):
        local_data(run, _site(tmp_path, data, other))
    with pytest.raises(ConfigError, match="site 'st-mary' has no schema"):
        local_data(run, _site(tmp_path, data, None))


def test_deployment_sends_the_schemas_digest(tmp_path: Path, schema_file: Path) -> None:
    from fedpriv.server.prepare import prepare_run

    plan = prepare_run(
        RunConfig(deployment=True, schema=str(schema_file), out=str(tmp_path / "runs"))
    )
    assert plan.config.schema_digest == load_schema(schema_file).digest
    with pytest.raises(ConfigError, match="normalisation = schema needs"):
        prepare_run(RunConfig(deployment=True, normalisation="schema", out=str(tmp_path / "r")))


def test_draft_schema_is_marked_as_derived_from_its_file(tmp_path: Path) -> None:
    rows = [f"p{i},{20 + i},{1 + i % 2},{100 + 3 * i},{i % 2}" for i in range(30)]
    data = _csv(tmp_path / "site.csv", rows)
    raw = load_raw(str(data), patient_column="patient")
    assert raw.raw_features is not None
    columns = {n: raw.raw_features[:, j] for j, n in enumerate(raw.feature_names)}
    draft = draft_schema(columns, raw.record_label_codes(), derived_from=str(data))
    kinds = {f.name: f.kind for f in draft.features}
    assert kinds == {"age": "numeric", "sex": "categorical", "bp": "numeric"}
    assert draft.features[0].minimum <= 20 and draft.features[0].maximum >= 49
    assert "DRAFT derived from" in draft.dumps() and draft.labels == (Label("0"), Label("1"))
    # the draft loads the file it came from
    assert load_dataset(str(data), patient_column="patient", schema=draft).num_classes == 2


runner = CliRunner()


def test_cli_site_check_lists_every_mismatched_column(tmp_path: Path, schema_file: Path) -> None:
    data = _csv(tmp_path / "site.csv", ["p1,140,3,7", "p2,40,1,0"], "patient,age,sex,label")
    site = tmp_path / "site.toml"
    site.write_text(
        f'data-path = "{data}"\npatient-column = "patient"\nledger-path = "{tmp_path / "l.db"}"\n'
    )
    result = runner.invoke(app, ["site", "check", str(site), "--schema", str(schema_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 4, result.output
    for column in ("age", "sex", "bp", "label"):
        assert sum(f"column '{column}'" in line for line in lines) == 1
    good = _csv(tmp_path / "good.csv", ["p1,40,1,120,0", "p2,50,2,130,1"])
    site.write_text(
        f'data-path = "{good}"\npatient-column = "patient"\nledger-path = "{tmp_path / "l.db"}"\n'
    )
    result = runner.invoke(app, ["site", "check", str(site), "--schema", str(schema_file)])
    assert (
        result.exit_code == 0
        and "schema: matches (3 features, 3 model inputs, 3 label codes" in result.output
    )


def test_cli_schema_init_and_its_refusals(tmp_path: Path) -> None:
    data = _csv(tmp_path / "site.csv", [f"p{i},{20 + i},1,{100 + i},{i % 2}" for i in range(12)])
    out = tmp_path / "draft.toml"
    result = runner.invoke(
        app, ["schema", "init", str(data), "--patient-column", "patient", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "DRAFT" in result.output and load_schema(out).derived_from == str(data)
    for args, expected in (
        (["schema", "init", str(data), "--out", str(out)], "exists: pass --force"),
        (["schema", "show", str(tmp_path / "none.toml")], "does not exist"),
        (
            ["simulate", "--schema", str(tmp_path / "none.toml"), "--out", str(tmp_path)],
            "does not exist",
        ),
        (
            ["simulate", "--normalisation", "zscore", "--out", str(tmp_path)],
            "unknown normalisation",
        ),
    ):
        result = runner.invoke(app, args)
        output = result.output.strip()
        assert result.exit_code == 2 and "Traceback" not in output, output
        assert len(output.splitlines()) == 1 and expected in output, output
