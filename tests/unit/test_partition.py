"""Partitioners: every record goes to exactly one hospital, deterministically from the seed."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.data import Dataset, create_partitioner, load_dataset, make_split
from fedpriv.errors import DataError

LABELS = np.repeat(np.arange(10), 50)  # 500 records, 10 balanced classes


def _run(
    name: str, seed: int = 0, labels: np.ndarray = LABELS, **params: object
) -> list[np.ndarray]:
    partitioner = create_partitioner(name, **params)
    return partitioner(labels, sites=None, num_hospitals=5, rng=np.random.default_rng(seed))


@pytest.mark.parametrize(
    ("name", "params"),
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("label-skew", {"classes_per_hospital": 2})],
)
def test_coverage_disjointness_determinism(name: str, params: dict) -> None:
    parts = _run(name, **params)
    joined = np.concatenate(parts)
    assert joined.size == LABELS.size, "every record is assigned"
    assert np.unique(joined).size == LABELS.size, "no record is assigned twice"
    again = _run(name, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = _run(name, seed=1, **params)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [p.size for p in _run("iid")]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    def skew(alpha: float) -> float:
        parts = _run("dirichlet", alpha=alpha)
        # mean over hospitals of the share of their most common class
        return float(np.mean([np.bincount(LABELS[p]).max() / p.size for p in parts]))

    assert skew(0.1) > 0.5
    assert skew(1000.0) < 0.2


def test_label_skew_gives_each_hospital_its_classes_only() -> None:
    parts = _run("label-skew", classes_per_hospital=2)
    for part in parts:
        assert np.unique(LABELS[part]).size == 2


def test_label_skew_must_cover_every_class() -> None:
    with pytest.raises(DataError, match="covers only 5 of 10 classes"):
        _run("label-skew", classes_per_hospital=1)


def test_natural_partition_follows_sites() -> None:
    sites = np.array(["b", "a", "c", "a", "b", "c", "c", "a", "b", "a"])
    labels = np.zeros(10, dtype=np.int64)
    partitioner = create_partitioner("natural")
    parts = partitioner(labels, sites=sites, num_hospitals=3, rng=np.random.default_rng(0))
    assert [sorted(set(sites[p])) for p in parts] == [["a"], ["b"], ["c"]]
    with pytest.raises(DataError, match="set --hospitals 3"):
        partitioner(labels, sites=sites, num_hospitals=4, rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="needs a site column"):
        partitioner(labels, sites=None, num_hospitals=3, rng=np.random.default_rng(0))


def test_dirichlet_refuses_nonpositive_alpha() -> None:
    with pytest.raises(DataError, match="alpha"):
        _run("dirichlet", alpha=0.0)


def test_unknown_partitioner() -> None:
    with pytest.raises(DataError, match="unknown partition 'zipf'"):
        create_partitioner("zipf")


# ---- whole splits ---------------------------------------------------------------------


def test_split_is_disjoint_and_covers_the_dataset() -> None:
    dataset = load_dataset("digits")
    split = make_split(dataset, num_hospitals=5, partition="dirichlet", alpha=0.5, seed=3)
    pieces = (
        [split.test] + [h.train for h in split.hospitals] + [h.held_out for h in split.hospitals]
    )
    joined = np.concatenate(pieces)
    assert joined.size == len(dataset)
    assert np.unique(joined).size == len(dataset)
    for hospital in split.hospitals:
        assert hospital.train.size >= 1 and hospital.held_out.size >= 1
    # the held-out fraction is respected per hospital
    for hospital in split.hospitals:
        assert abs(hospital.held_out.size / hospital.size - 0.2) < 0.05


def test_split_json_round_trip_and_determinism() -> None:
    dataset = load_dataset("breast-cancer")
    a = make_split(dataset, num_hospitals=4, partition="iid", seed=9)
    b = make_split(dataset, num_hospitals=4, partition="iid", seed=9)
    assert a.dumps() == b.dumps()
    restored = type(a).from_json(a.to_json())
    assert restored.dumps() == a.dumps()


def test_test_split_is_stratified() -> None:
    dataset = load_dataset("digits")
    split = make_split(dataset, num_hospitals=2, partition="iid", seed=0, test_fraction=0.2)
    shares = np.bincount(dataset.labels[split.test], minlength=10) / np.bincount(dataset.labels)
    assert np.all(np.abs(shares - 0.2) < 0.02)


def test_more_hospitals_than_records_is_refused() -> None:
    tiny = Dataset(
        name="tiny",
        features=np.zeros((10, 2), dtype=np.float32),
        labels=np.array([0, 1] * 5),
        num_classes=2,
    )
    with pytest.raises(DataError, match="use fewer hospitals"):
        make_split(tiny, num_hospitals=6, partition="iid", seed=0)


def test_a_hospital_left_empty_is_refused() -> None:
    # 2 of 3 hospitals hold one class each under label-skew, the third only the single
    # record of the rare class: it cannot have a training and a held-out record.
    labels = np.array([0] * 20 + [1] * 20 + [2] * 3)
    data = Dataset(
        name="rare",
        features=np.zeros((labels.size, 2), dtype=np.float32),
        labels=labels,
        num_classes=3,
        test_indices=np.array([40, 41]),
    )
    with pytest.raises(DataError, match="needs at least 2"):
        make_split(data, num_hospitals=3, partition="label-skew", classes_per_hospital=1, seed=0)


def test_predefined_test_split_is_used() -> None:
    data = Dataset(
        name="npz-like",
        features=np.zeros((30, 2), dtype=np.float32),
        labels=np.arange(30) % 2,
        num_classes=2,
        test_indices=np.arange(25, 30),
    )
    split = make_split(data, num_hospitals=2, partition="iid", seed=0)
    assert split.test.tolist() == [25, 26, 27, 28, 29]
