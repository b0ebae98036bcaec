"""`fedpriv simulate --quasi-identifiers`: each simulated hospital's linkage check on its own
records, in linkage.json, audit.json and the report; bad columns refused before training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fedpriv.cli import app
from fedpriv.privacy.audit.linkage import linkage_report, read_csv_rows

runner = CliRunner()


def _ward(path: Path, n: int = 240) -> Path:
    rng = np.random.default_rng(3)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["age_band", "sex", "postcode", "diagnosis", "bmi", "label"])
        for _ in range(n):
            diagnosis = int(rng.integers(0, 4))
            writer.writerow(
                [
                    int(rng.integers(0, 6)),
                    int(rng.integers(0, 2)),
                    int(rng.integers(0, 30)),
                    diagnosis,
                    round(float(rng.normal(25, 4)), 1),
                    int(diagnosis >= 2),
                ]
            )
    return path


def test_simulated_hospitals_check_their_own_records(tmp_path: Path) -> None:
    data = _ward(tmp_path / "ward.csv")
    result = runner.invoke(
        app,
        [
            "simulate",
            "--dataset",
            str(data),
            "--hospitals",
            "2",
            "--rounds",
            "1",
            "--no-dp",
            "--out",
            str(tmp_path),
            "--name",
            "ward",
            "--quasi-identifiers",
            "age_band,sex,postcode",
            "--sensitive-column",
            "diagnosis",
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "ward"
    linkage = json.loads((run / "linkage.json").read_text())
    partitions = json.loads((run / "partitions.json").read_text())
    rows = read_csv_rows(data)
    for hospital in partitions["hospitals"]:
        mine = sorted(hospital["train"] + hospital["held_out"])
        # recomputed independently on the hospital's rows: the simulation used only its own
        expected = linkage_report(
            [rows[i] for i in mine], ["age_band", "sex", "postcode"], "diagnosis"
        )
        assert linkage[hospital["name"]]["k"] == expected.k
        assert linkage[hospital["name"]]["unique_records"]["count"] == expected.unique_records
        assert linkage[hospital["name"]]["records"] == len(mine)
    assert f"linkage at {partitions['hospitals'][0]['name']}: k-anonymity" in result.output
    assert "id='linkage'" in (run / "report.html").read_text()


def test_linkage_on_a_dataset_without_columns_is_refused_before_training(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["simulate", "--dataset", "digits", "--out", str(tmp_path), "--quasi-identifiers", "a"],
    )
    assert result.exit_code == 2 and "needs a .csv dataset" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "nothing was started"
