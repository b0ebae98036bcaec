"""Attribute-inference audit: beats imputation on a planted leak, not on models that cannot
leak; its advantage and interval against brute force; choosing the sensitive column."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from fedpriv.data import Dataset, load_dataset, load_schema
from fedpriv.errors import ConfigError, DataError, FedprivError
from fedpriv.models import build
from fedpriv.privacy.audit.attribute import attack_log_likelihoods, paired_advantage
from fedpriv.privacy.audit.base import AuditInputs, HospitalRecords, create_audit
from fedpriv.privacy.audit.sensitive import resolve_sensitive_feature, sensitive_attribute

SENSITIVE = 2  # column index of the planted binary attribute


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models: a second torch thread only fights the other processes for the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _standardize(raw: np.ndarray) -> np.ndarray:
    return ((raw - raw.mean(0)) / raw.std(0)).astype(np.float32)


def _planted(seed: int = 0) -> tuple[Dataset, np.ndarray, np.ndarray, np.ndarray]:
    """Records whose binary column 2 is independent of everything else, except that for the
    60 members the label is that column XOR the sign of column 0: no imputation from the
    population (nor any linear one) sees it; a model fitted to the members can reveal it."""
    rng = np.random.default_rng(seed)
    n = 320
    raw = rng.normal(size=(n, 6))
    raw[:, SENSITIVE] = rng.integers(0, 2, n)
    labels = (raw[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    members, non_members, population = np.arange(60), np.arange(60, 120), np.arange(120, n)
    labels[members] = (raw[members, SENSITIVE] != (raw[members, 0] > 0)).astype(np.int64)
    data = Dataset(
        name="planted",
        features=_standardize(raw),
        labels=labels,
        num_classes=2,
        feature_names=("a", "b", "secret", "c", "d", "e"),
    )
    return data, members, non_members, population


def _fit(data: Dataset, index: np.ndarray, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    model = build("mlp", in_features=data.features.shape[1], num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(data.features[index]), torch.from_numpy(data.labels[index])
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


class _Constant(nn.Module):
    """Says the same thing about every record: it cannot leak anything."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.3, -0.2]]).expand(x.shape[0], 2)


def _inputs(
    data: Dataset,
    model: nn.Module,
    members: np.ndarray,
    non_members: np.ndarray,
    population: np.ndarray,
    **options: Any,
) -> AuditInputs:
    half_m, half_n = members.size // 2, non_members.size // 2
    hospitals = (
        HospitalRecords("north", members[:half_m], non_members[:half_n]),
        HospitalRecords("south", members[half_m:], non_members[half_n:]),
    )
    return AuditInputs(
        run_dir=Path("."),
        config={},
        model=model,
        dataset=data,
        hospitals=hospitals,
        population=population,
        options={"bootstrap_samples": 400, **options},
        seed=3,
    )


def test_attack_beats_imputation_on_a_planted_leak_by_the_recomputed_margin() -> None:
    data, members, non_members, population = _planted()
    model = _fit(data, members)
    result = create_audit("attribute").run(
        _inputs(data, model, members, non_members, population, sensitive_feature="secret")
    )
    assert result.verdict == "leak" and result.details["finding"] == "member-leak"
    adv = result.details["advantage"]
    assert adv["members"]["ci"][0] > 0.2
    assert adv["members_minus_non_members"]["ci"][0] > 0

    # independent recomputation, one record and one candidate value at a time
    x, y = data.features, data.labels
    aux = np.delete(x, SENSITIVE, axis=1).astype(np.float64)
    column = x[:, SENSITIVE].astype(np.float64)
    values = np.unique(column)
    truth = (column == values[1]).astype(int)
    prior = LogisticRegression(max_iter=2000).fit(aux[population], truth[population])
    with_label = np.column_stack([aux, np.eye(2)[y]])
    imputer = LogisticRegression(max_iter=2000).fit(with_label[population], truth[population])
    hits_attack, hits_imputation = [], []
    with torch.no_grad():
        for i in members:
            scores = []
            for k, value in enumerate(values):
                record = x[i].copy()
                record[SENSITIVE] = value
                log_p = torch.log_softmax(model(torch.from_numpy(record[None])).double(), 1)
                log_prior = prior.predict_log_proba(aux[i][None])[0, k]
                scores.append(float(log_p[0, y[i]]) + log_prior)
            hits_attack.append(int(np.argmax(scores)) == truth[i])
            hits_imputation.append(imputer.predict(with_label[i][None])[0] == truth[i])
    assert result.metrics["members"]["accuracy"] == pytest.approx(np.mean(hits_attack))
    assert result.baseline["members"]["accuracy"] == pytest.approx(np.mean(hits_imputation))
    assert adv["members"]["value"] == pytest.approx(np.mean(hits_attack) - np.mean(hits_imputation))
    per_hospital = result.details["hospitals"]
    assert [h["members"]["records"] for h in per_hospital] == [30, 30]


@pytest.mark.parametrize("kind", ["population-only", "constant"])
def test_no_leak_from_a_model_that_never_saw_the_members(kind: str) -> None:
    data, members, non_members, population = _planted()
    model = _fit(data, population) if kind == "population-only" else _Constant()
    result = create_audit("attribute").run(
        _inputs(data, model, members, non_members, population, sensitive_feature="2")
    )
    assert result.verdict != "leak"
    low, high = result.details["advantage"]["members"]["ci"]
    assert low <= 0.0 <= high
    assert set(result.metrics) == set(result.baseline) == {"members", "non_members"}


def test_an_advantage_everyone_shares_is_distributional_not_a_leak() -> None:
    """The XOR holds for every patient: the model learns it from its members and reveals the
    column of patients it never saw just as well (Jayaraman and Evans' distinction)."""
    rng = np.random.default_rng(0)
    n = 600
    raw = rng.normal(size=(n, 6))
    raw[:, SENSITIVE] = rng.integers(0, 2, n)
    labels = (raw[:, SENSITIVE] != (raw[:, 0] > 0)).astype(np.int64)
    data = Dataset(name="xor", features=_standardize(raw), labels=labels, num_classes=2)
    members, non_members, population = np.arange(200), np.arange(200, 400), np.arange(400, n)
    result = create_audit("attribute").run(
        _inputs(data, _fit(data, members), members, non_members, population)
    )
    assert result.details["sensitive_feature"]["chosen_by"].startswith("default")
    assert result.details["finding"] == "distributional" and result.verdict == "no-leak"
    assert result.details["advantage"]["non_members"]["ci"][0] > 0.2
    assert "patients it never saw alike" in result.reading


def test_advantage_interval_matches_exhaustive_bootstrap() -> None:
    # the two guessers agree on most records: only a paired bootstrap keeps the low end at 0
    attack = np.array([1, 1, 1, 1, 0, 1])
    imputation = np.array([1, 1, 1, 0, 0, 0])
    truth = np.array([0, 0, 1, 1, 1, 1])
    n = attack.size
    exact_plain, exact_balanced = [], []
    for pick in itertools.product(range(n), repeat=n):  # every resample, equally likely
        diffs = [int(attack[i]) - int(imputation[i]) for i in pick]
        exact_plain.append(sum(diffs) / n)
        per_class = {}
        for i in pick:
            per_class.setdefault(int(truth[i]), []).append(int(attack[i]) - int(imputation[i]))
        exact_balanced.append(float(np.mean([np.mean(v) for v in per_class.values()])))

    def quantile(values: list[float], p: float) -> float:
        ordered = np.sort(values)
        return float(ordered[int(np.ceil(p * ordered.size)) - 1])

    for exact, kwargs in ((exact_plain, {}), (exact_balanced, {"truth": truth})):
        adv = paired_advantage(
            attack, imputation, samples=20000, rng=np.random.default_rng(0), **kwargs
        )
        assert quantile(exact, 0.015) <= adv.low <= quantile(exact, 0.035)
        assert quantile(exact, 0.965) <= adv.high <= quantile(exact, 0.985)
    assert paired_advantage(attack, imputation, samples=10, rng=np.random.default_rng(0)).value == (
        pytest.approx(2 / 6)
    )
    balanced = paired_advantage(
        attack, imputation, samples=10, rng=np.random.default_rng(0), truth=truth
    )
    assert balanced.value == pytest.approx((0 + 2 / 4) / 2)


def test_log_likelihoods_one_record_at_a_time() -> None:
    data, members, _, _ = _planted()
    model = _fit(data, members, steps=20)
    candidates = np.array([-1.5, 0.0, 2.0])
    got = attack_log_likelihoods(model, data.features[:7], data.labels[:7], 4, candidates)
    with torch.no_grad():
        for i in range(7):
            for k, value in enumerate(candidates):
                record = data.features[i].copy()
                record[4] = value
                log_p = torch.log_softmax(model(torch.from_numpy(record[None])).double(), 1)
                assert got[i, k] == pytest.approx(float(log_p[0, data.labels[i]]), abs=1e-6)


def test_sensitive_feature_by_name_index_and_default() -> None:
    data, _, _, population = _planted()
    assert resolve_sensitive_feature(data, "secret", population) == (2, "user")
    assert resolve_sensitive_feature(data, "2", population) == (2, "user")
    assert resolve_sensitive_feature(data, 5, population) == (5, "user")
    index, why = resolve_sensitive_feature(data, None, population)
    assert index == SENSITIVE and why.startswith("default: the first column")
    for bad, message in (
        ("blood_type", r"unknown sensitive feature 'blood_type': name one of .*secret.* 0\.\.5"),
        ("6", r"index 6 is out of range: the dataset has 6 feature columns"),
        ("-1", r"index -1 is out of range"),
    ):
        with pytest.raises(ConfigError, match=message) as caught:
            resolve_sensitive_feature(data, bad, population)
        assert isinstance(caught.value, FedprivError) and "\n" not in str(caught.value)


def test_breast_cancer_feature_is_split_at_the_population_median() -> None:
    data = load_dataset("breast-cancer")
    population = np.arange(0, 569, 4)
    attr = sensitive_attribute(data, "mean radius", population)
    column = data.features[population, 0].astype(np.float64)
    median = np.median(column)
    assert attr.encoding == "median-split" and attr.threshold == pytest.approx(median)
    assert attr.candidates == pytest.approx(
        [np.median(column[column <= median]), np.median(column[column > median])]
    )
    raw_median = np.median(data.source.numeric["mean radius"][population])
    assert attr.labels == (f"<= {raw_median:.4g}", f"> {raw_median:.4g}")
    # with no choice made, the column most correlated with the label, and said so
    index, why = resolve_sensitive_feature(data, None, population)
    r = [
        abs(np.corrcoef(data.features[population, i], data.labels[population])[0, 1])
        for i in range(30)
    ]
    assert index == int(np.argmax(r)) and "most correlated" in why


def test_csv_with_a_categorical_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 300
    age = rng.normal(60, 10, n)
    diagnosis = np.clip(((age - 45) / 8 + rng.normal(0, 0.7, n)).round(), 0, 3).astype(int)
    label = (diagnosis + rng.normal(0, 1, n) > 1.5).astype(int)
    rows = [
        f"{a:.1f},{rng.normal(120, 15):.0f},{d},{y}"
        for a, d, y in zip(age, diagnosis, label, strict=True)
    ]
    path = tmp_path / "ward.csv"
    path.write_text("age,bp,diagnosis,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(str(path))
    assert data.feature_names == ("age", "bp", "diagnosis")
    result = create_audit("attribute").run(
        _inputs(
            data,
            _Constant(),
            np.arange(80),
            np.arange(80, 160),
            np.arange(160, n),
            sensitive_feature="diagnosis",
            attribute_records=50,
        )
    )
    feature = result.details["sensitive_feature"]
    assert feature["encoding"] == "categorical"
    assert feature["classes"] == [str(c) for c in sorted(set(diagnosis))]
    assert result.details["records"]["members"] == 50
    assert result.details["records"]["members_available"] == 80
    out = result.to_json()
    assert {"members", "non_members", "advantage", "baseline", "verdict", "reading"} <= set(out)
    assert "'diagnosis'" in result.reading


WARD_SCHEMA = """
[[feature]]
name = "age"
kind = "numeric"
min = 0
max = 120
[[feature]]
name = "ward"
kind = "categorical"
categories = [10, 20, 30, 40]
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


def _wards(tmp_path: Path, n: int = 300) -> Dataset:
    """A one-hot ward drawn independently of everything else: nothing but its own columns
    says which ward a patient is in."""
    rng = np.random.default_rng(4)
    age = rng.uniform(20, 90, n).round()
    ward = rng.choice([10, 20, 30, 40], n)
    label = (age + rng.normal(0, 10, n) > 55).astype(int)
    rows = [
        f"{a:g},{w},{rng.integers(90, 180)},{y}" for a, w, y in zip(age, ward, label, strict=True)
    ]
    path = tmp_path / "wards.csv"
    path.write_text("age,ward,bp,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "schema.toml").write_text(WARD_SCHEMA)
    return load_dataset(str(path), schema=load_schema(tmp_path / "schema.toml"))


def test_a_one_hot_feature_is_hidden_and_guessed_as_a_whole(tmp_path: Path) -> None:
    data = _wards(tmp_path)
    population = np.arange(160, 300)
    assert data.features.shape[1] == 6
    assert resolve_sensitive_feature(data, "ward", population) == (1, "user")
    assert resolve_sensitive_feature(data, "2", population) == (2, "user")  # bp: a feature index
    index, why = resolve_sensitive_feature(data, None, population)
    assert index == 1 and why.startswith("default: the first column")
    with pytest.raises(ConfigError, match=r"unknown sensitive feature 'ward=20': name one of"):
        resolve_sensitive_feature(data, "ward=20", population)
    attr = sensitive_attribute(data, "ward", population)
    assert attr.encoding == "one-hot" and attr.columns == (1, 2, 3, 4)
    assert attr.labels == ("10", "20", "30", "40")
    assert np.array_equal(attr.candidates, np.eye(4))
    raw = data.raw_features
    assert raw is not None
    truth = attr.classes(data.features[:, attr.hidden].astype(np.float64))
    assert np.array_equal(np.array([10, 20, 30, 40])[truth], raw[:, 1])
    # the attack sets the whole block to each category's row, record by record
    torch.manual_seed(0)
    model = build("mlp", in_features=6, num_classes=2).eval()
    got = attack_log_likelihoods(
        model, data.features[:5], data.labels[:5], attr.hidden, attr.candidates
    )
    with torch.no_grad():
        for i in range(5):
            for k in range(4):
                record = data.features[i].copy()
                record[1:5] = np.eye(4)[k]
                log_p = torch.log_softmax(model(torch.from_numpy(record[None])).double(), 1)
                assert got[i, k] == pytest.approx(float(log_p[0, data.labels[i]]), abs=1e-6)
    result = create_audit("attribute").run(
        _inputs(
            data,
            _Constant(),
            np.arange(80),
            np.arange(80, 160),
            population,
            sensitive_feature="ward",
        )
    )
    feature = result.details["sensitive_feature"]
    assert feature["encoding"] == "one-hot" and feature["columns"] == [1, 2, 3, 4]
    assert result.verdict != "leak"
    # none of the ward's columns reaches the baseline: from age, bp and the label alone it
    # guesses an independent uniform ward about a quarter of the time, not (nearly) always
    assert result.baseline["members"]["accuracy"] < 0.5


def test_unmet_and_bad_options() -> None:
    data, members, non_members, population = _planted()
    audit = create_audit("attribute")
    assert audit.unmet(_inputs(data, _Constant(), members, non_members, population)) is None
    no_model = _inputs(data, None, members, non_members, population)  # type: ignore[arg-type]
    assert "final model" in (audit.unmet(no_model) or "")
    digits = load_dataset("digits")
    images = _inputs(digits, _Constant(), members, non_members, population)
    assert "tabular" in (audit.unmet(images) or "")
    few = _inputs(data, _Constant(), members, non_members, population[:5])
    assert "population records" in (audit.unmet(few) or "")
    with pytest.raises(DataError, match="population records"):
        audit.run(few)  # run directly, it refuses as unmet would, in one line
    with pytest.raises(ConfigError, match="attribute_records must be a positive whole number"):
        audit.run(_inputs(data, _Constant(), members, non_members, population, attribute_records=0))
