"""Normalisation from federated statistics: the mechanism (sensitivity by brute force,
clipping, patients with several records, the noise's scale, the combination against numpy
on the pooled records), the hospital's release (ledger, once per run, refusals), and the
accounting of release plus DP-SGD against Google's dp-accounting."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from fedpriv.config import STATS_SHARE, RunConfig
from fedpriv.data.schema import CATEGORICAL, ONE_HOT, Feature, Label, Schema
from fedpriv.errors import ConfigError
from fedpriv.privacy.statistics import (
    COUNT_WEIGHT,
    SCALE_FLOOR,
    StatisticsMechanism,
)
from tests.reference_dp import google_epsilon

SCHEMA = Schema(
    features=(
        Feature("age", minimum=0, maximum=100),
        Feature("sex", kind=CATEGORICAL, categories=(1.0, 2.0)),
        Feature("bp", minimum=50, maximum=250),
    ),
    labels=(Label("0"), Label("1")),
)


def _mechanism(noise: float = 1.0) -> StatisticsMechanism:
    return StatisticsMechanism.for_schema(SCHEMA, noise)


def test_categorical_features_are_not_released_and_keep_the_schemas_mapping() -> None:
    mechanism = _mechanism()
    assert mechanism.names == ("age", "bp") and mechanism.columns == (0, 2)
    assert mechanism.width == 5
    reference = SCHEMA.with_reference({"age": (40.0, 10.0), "bp": (120.0, 20.0)})
    raw = np.array([[50.0, 2.0, 140.0]])
    assert np.allclose(reference.normalise(raw), [[1.0, 1.0, 1.0]])  # sex: 2nd of 2 -> 1
    with pytest.raises(ConfigError, match="lacks the schema's feature 'bp'"):
        SCHEMA.with_reference({"age": (40.0, 10.0)})
    only_categories = Schema(features=(SCHEMA.features[1],), labels=SCHEMA.labels)
    with pytest.raises(ConfigError, match="at least one numeric feature"):
        StatisticsMechanism.for_schema(only_categories, 1.0)


def test_a_one_hot_feature_releases_nothing_and_keeps_its_columns() -> None:
    """One-hot columns are 0 or 1 by the schema's category list: no centre or scale is
    released for them, so the vector and its sensitivity are those of the ordinal schema."""
    ward = Feature("ward", kind=CATEGORICAL, categories=(1.0, 2.0, 3.0), encoding=ONE_HOT)
    schema = Schema(features=(*SCHEMA.features, ward), labels=SCHEMA.labels)
    mechanism = StatisticsMechanism.for_schema(schema, 1.0)
    assert mechanism.names == ("age", "bp") and mechanism.columns == (0, 2)
    assert mechanism.width == 5 and mechanism.sensitivity == _mechanism().sensitivity
    reference = schema.with_reference({"age": (40.0, 10.0), "bp": (120.0, 20.0)})
    assert reference.features[3].encoding == ONE_HOT and reference.width == 6
    raw = np.array([[50.0, 2.0, 140.0, 3.0], [40.0, 1.0, 120.0, 1.0]])
    assert np.allclose(reference.normalise(raw), [[1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]])
    rows = mechanism.contributions(raw, np.array([0, 1]))
    assert rows.shape == (2, 5)
    assert np.allclose(
        rows,
        StatisticsMechanism.for_schema(SCHEMA, 1.0).contributions(raw[:, :3], np.array([0, 1])),
    )


def test_sensitivity_is_the_largest_patient_contribution_by_brute_force() -> None:
    """Every corner of the ranges (and beyond them: clipped), one record or several: no
    patient's row is longer than the sensitivity, and the corners reach it."""
    mechanism = _mechanism()
    corners = [
        [age, 1.0, bp] for age, bp in itertools.product((-30, 0, 100, 170), (0, 50, 250, 999))
    ]
    rng = np.random.default_rng(0)
    inside = np.column_stack(
        [rng.uniform(0, 100, 500), rng.integers(1, 3, 500), rng.uniform(50, 250, 500)]
    )
    raw = np.vstack([corners, inside])
    rows = mechanism.contributions(raw, np.arange(raw.shape[0]))
    norms = np.linalg.norm(rows, axis=1)
    assert norms.max() <= mechanism.sensitivity + 1e-12
    assert np.isclose(norms[: len(corners)].max(), mechanism.sensitivity)
    # a patient with many records still contributes one row of at most that length
    many = mechanism.contributions(raw, np.zeros(raw.shape[0], dtype=np.int64))
    assert many.shape == (1, 5) and np.linalg.norm(many) <= mechanism.sensitivity
    assert many[0, 0] == COUNT_WEIGHT  # one patient, counted once
    # adding a patient changes the sums by its row: the sensitivity bounds that change
    with_one = mechanism.exact_sums(raw[:10], np.arange(10))
    without = mechanism.exact_sums(raw[1:10], np.arange(9))
    assert np.linalg.norm(with_one - without) <= mechanism.sensitivity + 1e-12


def test_values_outside_the_public_range_are_clipped_to_it() -> None:
    mechanism = _mechanism()
    far = mechanism.contributions(np.array([[-50.0, 1.0, 900.0]]), np.array([0]))
    edge = mechanism.contributions(np.array([[0.0, 1.0, 250.0]]), np.array([0]))
    assert np.array_equal(far, edge)


def test_the_noise_is_gaussian_at_noise_multiplier_times_sensitivity() -> None:
    mechanism = _mechanism(noise=3.0)
    raw = np.array([[30.0, 1.0, 120.0], [60.0, 2.0, 180.0]])
    exact = mechanism.exact_sums(raw, np.arange(2))
    rng = np.random.default_rng(1)
    noise = np.stack([mechanism.release(raw, np.arange(2), rng) - exact for _ in range(4000)])
    assert mechanism.sigma == pytest.approx(3.0 * mechanism.sensitivity)
    assert np.allclose(noise.std(axis=0), mechanism.sigma, rtol=0.05)
    assert np.allclose(noise.mean(axis=0), 0.0, atol=0.1 * mechanism.sigma)


def test_the_combination_of_site_sums_is_the_pooled_mean_and_deviation() -> None:
    """Without noise worth the name, the server's centre and scale are numpy's mean and
    standard deviation over all sites' records, though no one computed them over those."""
    rng = np.random.default_rng(2)
    sites = [
        np.column_stack(
            [rng.normal(mu, 12, n).clip(0, 100), rng.integers(1, 3, n), rng.normal(140, 25, n)]
        )
        for mu, n in ((35, 80), (55, 120), (70, 60))
    ]
    mechanism = _mechanism(noise=1e-9)
    releases = [mechanism.release(s, np.arange(len(s)), rng) for s in sites]
    combined = mechanism.combine(releases)
    pooled = np.vstack(sites)
    assert combined.patients == pytest.approx(260)
    for j, name in ((0, "age"), (2, "bp")):
        centre, scale = combined.reference[name]
        assert centre == pytest.approx(pooled[:, j].mean(), rel=1e-6)
        assert scale == pytest.approx(pooled[:, j].std(), rel=1e-6)
    assert combined.floored == ()
    assert json.loads(combined.dumps())["age"] == list(combined.reference["age"])


def test_a_variance_below_the_noise_on_it_becomes_the_noise_floor() -> None:
    """The server knows the noise: a variance estimate below one standard deviation of the
    noise on it is not trusted, whatever the estimate says."""
    mechanism = _mechanism(noise=2.0)
    rng = np.random.default_rng(4)
    # ages within 40..41 (a deviation of 0.3 % of the range), blood pressures all over it
    raw = np.column_stack([rng.uniform(40, 41, 300), np.ones(300), rng.uniform(50, 250, 300)])
    floored = 0
    for _ in range(50):  # fresh noise each time
        releases = [mechanism.release(raw[k::3], np.arange(100), rng) for k in range(3)]
        combined = mechanism.combine(releases)
        noise_deviation = np.sqrt(mechanism.sigma * np.sqrt(3) / (4.0 * combined.patients))
        assert noise_deviation > SCALE_FLOOR  # the noise's level binds here, not the fixed one
        age_scale = combined.reference["age"][1]
        assert age_scale >= noise_deviation * 100 - 1e-9
        if "age" in combined.floored:
            floored += 1
            assert age_scale == pytest.approx(noise_deviation * 100)
        assert "bp" not in combined.floored
        assert combined.reference["bp"][1] == pytest.approx(200 / np.sqrt(12), rel=0.3)
    assert floored >= 25  # most of the time the tiny variance is below its noise


def test_a_variance_lost_in_noise_or_zero_becomes_the_floor() -> None:
    mechanism = _mechanism(noise=1e-9)
    constant = np.column_stack([np.full(50, 40.0), np.ones(50), np.full(50, 120.0)])
    combined = mechanism.combine(
        [mechanism.release(constant, np.arange(50), np.random.default_rng(3))]
    )
    assert combined.floored == ("age", "bp")
    assert combined.reference["age"] == pytest.approx((40.0, SCALE_FLOOR * 100))
    assert combined.reference["bp"][1] == pytest.approx(SCALE_FLOOR * 200)
    with pytest.raises(ConfigError, match="expected 5 numbers"):
        mechanism.check([1.0, 2.0], who="hospital-0")
    with pytest.raises(ConfigError, match="non-finite"):
        mechanism.check([1.0, 2.0, 3.0, float("nan"), 4.0], who="hospital-0")


def test_the_run_configuration_splits_epsilon_and_refuses_a_release_larger_than_it() -> None:
    config = RunConfig(normalisation="federated", epsilon=4.0)
    assert config.stats_epsilon == pytest.approx(STATS_SHARE * 4.0)
    assert RunConfig(normalisation="federated", stats_epsilon=0.5).stats_epsilon == 0.5
    assert RunConfig().stats_epsilon == 0.0  # no release, no share
    with pytest.raises(ConfigError, match="stats-epsilon 4 must be below epsilon 4"):
        RunConfig(normalisation="federated", stats_epsilon=4.0)


def test_a_hospital_releases_once_per_run_recorded_in_its_ledger(tmp_path: Path) -> None:
    """The release is a ledger event on every training patient (sample rate 1, one step),
    recorded before the noisy sums exist; a second request for the run is refused."""
    from fedpriv.client.hospital import local_data, privacy_state, require_statistics
    from fedpriv.client.statistics import release_statistics
    from fedpriv.privacy.accounting import statistics_noise
    from fedpriv.privacy.ledger import Ledger

    config = RunConfig(
        dataset="breast-cancer",
        hospitals=3,
        normalisation="federated",
        accountant="rdp",
        out=str(tmp_path),
        run_name="stats",
        insecure_dp_seed=0,
    )
    node = {"partition-id": 1}
    data = local_data(config, node)
    privacy = privacy_state(config, node, data.name)
    release = release_statistics(config, data, privacy=privacy)
    assert release.sums is not None and not release.declined
    noise = statistics_noise(config.stats_epsilon, config.delta, "rdp")
    assert release.noise_multiplier == noise
    (event,) = Ledger.open(privacy.ledger_path).events()
    assert (event.hospital, event.round, event.run_id) == (data.name, 0, "stats")
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (noise, 1.0, 1)
    assert release.epsilon == pytest.approx(config.stats_epsilon, rel=0.1)
    again = release_statistics(config, data, privacy=privacy)
    assert again.sums is None and "already released" in again.declined
    assert len(Ledger.open(privacy.ledger_path).events()) == 1  # never charged twice
    # training orders without the run's statistics are refused, not silently schema-mapped
    with pytest.raises(ConfigError, match="carries none"):
        require_statistics(config)
    require_statistics(config.replace(feature_statistics=json.dumps({"age": [1, 2]})))


def test_a_site_file_without_a_schema_column_is_refused_naming_it(tmp_path: Path) -> None:
    from fedpriv.client.hospital import local_data
    from fedpriv.data import load_schema

    schema_file = tmp_path / "schema.toml"
    SCHEMA.save(schema_file)
    data = tmp_path / "site.csv"
    data.write_text(
        "patient,age,sex,label\n" + "\n".join(f"p{i},{30 + i},1,{i % 2}" for i in range(20))
    )
    node = {
        "data-path": str(data),
        "patient-column": "patient",
        "hospital-name": "st-mary",
        "schema-path": str(schema_file),
    }
    digest = load_schema(schema_file).digest
    run = RunConfig(deployment=True, normalisation="federated", schema_digest=digest)
    with pytest.raises(ConfigError, match="column 'bp' is missing") as refused:
        local_data(run, node)
    assert "\n" not in str(refused.value)
    del node["schema-path"]
    with pytest.raises(ConfigError, match="'schema-path' is missing"):
        local_data(run.replace(schema_digest=""), node)


@pytest.mark.parametrize("patients", [73, 230])  # breast-cancer's (q = 1) and digits' sizes
def test_release_and_dp_sgd_together_stay_at_the_runs_epsilon_by_dp_accounting(
    patients: int,
) -> None:
    """Independently of fedpriv's accountant: the release alone is at stats-epsilon, and
    release plus the whole planned DP-SGD run at the run's epsilon (not above, and not
    wastefully below), while DP-SGD alone would have been calibrated to less noise."""
    from fedpriv.privacy.accounting import plan_for_run, statistics_event

    config = RunConfig(normalisation="federated", epsilon=4.0, delta=1e-5)
    event = statistics_event(config)
    assert event is not None and (event.sample_rate, event.steps) == (1.0, 1)
    alone = google_epsilon([event.as_tuple()], config.delta)
    # fedpriv's accountant is an upper bound: a little loose on one full-batch Gaussian
    assert 0.85 * config.stats_epsilon <= alone <= config.stats_epsilon + 0.02
    plan = plan_for_run(config, patients, one_step_per_round=False)
    training = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * plan.rounds)
    composed = google_epsilon([event.as_tuple(), training], config.delta)
    assert 0.95 * config.epsilon <= composed <= config.epsilon + 0.02
    assert plan.planned_epsilon <= config.epsilon
    without = plan_for_run(RunConfig(epsilon=4.0), patients, one_step_per_round=False)
    assert plan.noise_multiplier > without.noise_multiplier
    # the default share costs DP-SGD a few percent of noise, not a quarter
    assert plan.noise_multiplier < 1.08 * without.noise_multiplier


def test_a_deployment_needs_the_schema_to_normalise_by_federated_statistics(
    tmp_path: Path,
) -> None:
    from fedpriv.server.prepare import prepare_run

    with pytest.raises(ConfigError, match="normalisation = federated needs the federation's"):
        prepare_run(RunConfig(deployment=True, normalisation="federated", out=str(tmp_path)))


DEPLOYED_SCHEMA = """
name = "two-numbers"
[[feature]]
name = "a"
kind = "numeric"
min = 0
max = 100
[[feature]]
name = "b"
kind = "numeric"
min = 0
max = 10
[[label]]
code = "0"
[[label]]
code = "1"
"""


class _SitesGrid:
    """The transport only: each query goes to fedpriv's ClientApp query handler of the site
    it is addressed to (real node configs, files and ledgers); an exception comes back as
    an Error reply, as Flower's runtime sends it."""

    def __init__(self, sites: dict[int, dict]) -> None:
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: list, timeout: float) -> list:
        from flwr.app import Context, Error, Message, RecordDict

        from fedpriv.client.handlers import handle_query

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.sites[node],
                state=RecordDict(),
                run_config={},
            )
            try:
                replies.append(handle_query(message, context))
            except Exception as exc:  # what Flower's runtime does with any exception
                error = Error(code=0, reason=f"{type(exc).__name__}: {exc}")
                replies.append(Message(error, reply_to=message))
        return replies


@pytest.mark.usefixtures("flower_task")
def test_deployed_sites_release_to_the_server_which_sends_one_normalisation(
    tmp_path: Path,
) -> None:
    """Real sites (node config data-path, their own ledgers): each releases once into its
    own ledger; a site whose file lacks a schema column is refused with the column's name
    and the others go on; every site then maps a value to the same input."""
    from fedpriv.client.hospital import local_data
    from fedpriv.client.site import check_site
    from fedpriv.privacy.ledger import Ledger
    from fedpriv.server.prepare import _prepare_deployment, resolve_model_from_hospitals
    from fedpriv.server.statistics import STATISTICS_JSON, gather_statistics

    schema = tmp_path / "schema.toml"
    schema.write_text(DEPLOYED_SCHEMA)
    rng = np.random.default_rng(5)
    sites = {}
    for node, (name, centre) in enumerate((("st-mary", 30), ("county", 60), ("bad", 50)), 1):
        data = tmp_path / f"{name}.csv"
        header = "patient,a,label" if name == "bad" else "patient,a,b,label"
        rows = [
            f"{name}-{i},{rng.normal(centre, 8):.2f}"
            + ("" if name == "bad" else f",{rng.uniform(0, 10):.2f}")
            + f",{i % 2}"
            for i in range(150)
        ]
        data.write_text(header + "\n" + "\n".join(rows) + "\n")
        site = {
            "hospital-name": name,
            "data-path": str(data),
            "patient-column": "patient",
            "schema-path": str(schema),
            "ledger-path": str(tmp_path / f"{name}.sqlite"),
        }
        if name != "bad":
            check_site(site)
        sites[node] = site
    grid = _SitesGrid({k: v for k, v in sites.items() if v["hospital-name"] != "bad"})
    config = RunConfig(
        deployment=True,
        schema=str(schema),
        normalisation="federated",
        accountant="rdp",
        out=str(tmp_path / "runs"),
        run_name="fed",
    )
    plan = resolve_model_from_hospitals(grid, _prepare_deployment(config, resume_dir=None))  # type: ignore[arg-type]
    grid.sites = sites  # the bad site joins for the release
    plan = gather_statistics(grid, plan)  # type: ignore[arg-type]
    written = json.loads((plan.run_dir.path / STATISTICS_JSON).read_text())
    assert written["released"] == 2
    (failure,) = written["failed"].values()
    assert "column 'b' is missing" in failure and "\n" not in failure
    centre, scale = json.loads(plan.config.feature_statistics)["a"]
    assert 30 < centre < 60 and scale > 5  # two sites around 30 and 60
    for site in sites.values():
        if site["hospital-name"] == "bad":
            continue
        (event,) = Ledger.open(site["ledger-path"]).events()
        assert (event.round, event.sample_rate, event.steps) == (0, 1.0, 1)
        data = local_data(plan.config, site)
        raw = np.loadtxt(site["data-path"], delimiter=",", skiprows=1, usecols=(1,))
        expected = (raw - centre) / scale
        assert np.allclose(
            np.sort(np.concatenate([data.train_features[:, 0], data.held_out_features[:, 0]])),
            np.sort(expected),
            atol=1e-5,
        )
