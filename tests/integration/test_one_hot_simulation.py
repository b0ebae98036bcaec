"""A one-hot encoded nominal column through a real Flower simulation: the model is built for
the schema's width (a column per category), the hospitals' statistics release covers the
numeric features only and leaves the one-hot columns 0 or 1, and the attribute-inference
audit hides and guesses the ward as a whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import fedpriv
from fedpriv.config import RunConfig
from fedpriv.data import dataset_for, load_schema
from fedpriv.privacy.audit.run import audit_run
from fedpriv.server.rundir import RunDirectory

SCHEMA = """
name = "wards"
[[feature]]
name = "age"
kind = "numeric"
min = 0
max = 120
[[feature]]
name = "ward"
kind = "categorical"
categories = [3, 1, 4, 2]
encoding = "one-hot"
[[feature]]
name = "bp"
kind = "numeric"
min = 60
max = 220
[[label]]
code = "0"
[[label]]
code = "1"
"""


def _table(tmp_path: Path, n: int = 240) -> tuple[Path, Path]:
    """The label depends on the ward non-monotonically in its code (wards 1 and 3 raise
    it, 2 and 4 lower it) and on age."""
    rng = np.random.default_rng(7)
    age = rng.uniform(20, 90, n).round()
    ward = rng.integers(1, 5, n)
    logit = (age - 55) / 15 + np.where(ward % 2 == 1, 1.5, -1.5)
    label = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    rows = [
        f"p{i},{a:g},{w},{rng.integers(90, 180)},{y}"
        for i, (a, w, y) in enumerate(zip(age, ward, label, strict=True))
    ]
    data = tmp_path / "wards.csv"
    data.write_text("patient,age,ward,bp,label\n" + "\n".join(rows) + "\n")
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA)
    return data, schema


def test_a_one_hot_column_trains_releases_and_audits(tmp_path: Path) -> None:
    data, schema_path = _table(tmp_path)
    config = RunConfig(
        dataset=str(data),
        schema=str(schema_path),
        patient_column="patient",
        hospitals=2,
        rounds=2,
        normalisation="federated",
        accountant="rdp",
        out=str(tmp_path / "runs"),
        run_name="wards",
        insecure_dp_seed=0,
    )
    result = fedpriv.simulate(config)
    assert not result.stopped and result.rows[-1]["test_accuracy"] is not None
    schema = load_schema(schema_path)
    run_config, model_name, model_args = RunDirectory.open(result.run_dir).read_config()
    assert run_config.schema_digest == schema.digest
    # the model takes the schema's width: age, four ward columns, bp
    assert model_name == "mlp" and model_args["in_features"] == schema.width == 6
    state = torch.load(result.run_dir / "model.pt", weights_only=False)
    weights = state.get("state_dict", state)
    first = next(v for k, v in weights.items() if k.endswith("weight"))
    assert tuple(first.shape)[1] == 6
    # the release combined a centre and scale for the numeric features only
    assert set(json.loads(run_config.feature_statistics)) == {"age", "bp"}
    dataset = dataset_for(run_config)
    assert dataset.raw_features is not None and dataset.features.shape == (240, 6)
    block = dataset.features[:, 1:5]
    assert set(np.unique(block)) == {0.0, 1.0} and np.all(block.sum(axis=1) == 1)
    assert np.array_equal(block.argmax(axis=1) + 1, dataset.raw_features[:, 1])
    # the attribute audit hides the whole ward, guessed among its four codes
    audit = audit_run(
        result.run_dir,
        attacks=["attribute"],
        bootstrap_samples=50,
        options={"sensitive_feature": "ward"},
    )
    entry = audit["attacks"]["attribute"]
    feature = entry["sensitive_feature"]
    assert feature["encoding"] == "one-hot" and feature["columns"] == [1, 2, 3, 4]
    assert feature["classes"] == ["1", "2", "3", "4"]
    assert entry["verdict"] in ("leak", "no-leak", "inconclusive")
