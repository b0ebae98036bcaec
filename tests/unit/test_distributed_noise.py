"""Distributed noise (fedpriv.privacy.distributed_noise): the settings it refuses, the
accounting against Google's dp-accounting, and a hospital's DP-SGD step that really adds
only its share (measured on real Opacus steps, against a chi-square bound)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from scipy import stats

from fedpriv import messages as msg
from fedpriv.client.hospital import PrivacyState, local_data, train_round
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError, FedprivError, RunDirectoryError
from fedpriv.privacy.accounting import DpEvent, compose_epsilon, plan_dp, plan_for_run
from fedpriv.privacy.distributed_noise import (
    NoiseSplit,
    default_colluders,
    noise_scale,
    sum_scale,
    usable_size,
)
from fedpriv.protocols.base import Update
from fedpriv.protocols.plain import PlainHospital
from fedpriv.server.run import initial_weights
from tests.reference_dp import google_epsilon

MLP_ARGS = {"in_features": 30, "num_classes": 2}
ON = {"strategy": "fedsgd", "aggregation": "secagg", "distributed-noise": True}


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"strategy": "fedavg"}, "needs strategy fedsgd"),
        ({"aggregation": "plain"}, "aggregation secagg"),
        ({"aggregation": "ckks"}, "aggregation secagg"),
        ({"dp": False}, "sample-level DP"),
        ({"dp-level": "client"}, "sample-level DP"),
        ({"dp-level": "both"}, "sample-level DP"),
        ({"noise-colluders": 3}, "below the secure-aggregation threshold 3"),
        ({"noise-colluders": 4, "secagg-threshold": 4}, "threshold 4"),
    ],
)
def test_distributed_noise_refuses_what_it_cannot_protect(
    settings: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        RunConfig.from_mapping({**ON, "hospitals": 5, **settings})
    assert "\n" not in str(caught.value)


def test_noise_colluders_must_be_minus_one_or_more() -> None:
    with pytest.raises(ConfigError, match="noise-colluders must be -1"):
        RunConfig(noise_colluders=-2)
    assert RunConfig.from_mapping({**ON, "noise-colluders": 2}).noise_colluders == 2
    assert not RunConfig().distributed_noise, "off by default"


def test_the_default_colluders_are_a_minority_below_the_threshold() -> None:
    # majority thresholds (k // 2 + 1): odd k leaves one honest share (no gain), even k two
    assert [default_colluders(k, k // 2 + 1) for k in (2, 3, 4, 5, 6, 10)] == [0, 1, 1, 2, 2, 4]
    # a higher threshold keeps the minority; a low one caps c below it
    assert default_colluders(5, 5) == 2 and default_colluders(9, 2) == 1


def test_a_split_with_as_many_colluders_as_the_threshold_is_refused() -> None:
    with pytest.raises(FedprivError, match="protects nothing"):
        NoiseSplit(threshold=3, colluders=3, scale=1.0)


def _plan(records: int) -> Any:
    return plan_dp(
        num_records=records,
        batch_size=64,
        local_epochs=1,
        rounds=20,
        one_step_per_round=True,
        target_epsilon=4.0,
        delta=1e-5,
        accountant="prv",
        max_grad_norm=1.0,
    )


def test_each_hospital_adds_its_share_and_shares_cover_every_hospital() -> None:
    big, small = _plan(300), _plan(100)  # q = 1/5 and 1/2: different sigma and q
    assert big.sample_rate == 0.2 and small.sample_rate == 0.5
    rho = max(p.noise_multiplier / p.sample_rate for p in (big, small))
    split = NoiseSplit(threshold=4, colluders=1, scale=rho)
    for plan in (big, small):
        a = sum_scale(examples=100, units=100, sample_rate=plan.sample_rate)
        assert a == pytest.approx(1 / plan.sample_rate)
        added = split.added(plan, a)
        # in the sum, t - c honest shares of (a added C)^2 hold at least (a sigma C)^2
        assert split.honest * (a * added) ** 2 >= (a * plan.noise_multiplier) ** 2 * (1 - 1e-12)
    # the hospital that sets rho adds exactly sigma / sqrt(t - c)
    top = max((big, small), key=lambda p: p.noise_multiplier / p.sample_rate)
    assert split.added(top, 1 / top.sample_rate) == pytest.approx(
        top.noise_multiplier / math.sqrt(3)
    )
    # patients with several records each (a > 1/q) would be under-protected: refused
    with pytest.raises(FedprivError, match="declines the round"):
        split.added(top, 2 * sum_scale(examples=100, units=100, sample_rate=top.sample_rate))


@pytest.mark.parametrize(("threshold", "colluders"), [(3, 1), (5, 2), (4, 0)])
def test_recorded_and_fallback_epsilons_match_google(threshold: int, colluders: int) -> None:
    """What the ledger records (the full sigma: the honest shares' sum) and what holds if
    the assumption fails (sigma / sqrt(t - c)), against dp-accounting's PLD."""
    plan = _plan(300)
    split = NoiseSplit(threshold=threshold, colluders=colluders, scale=1.0)
    run = DpEvent(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * plan.rounds)
    recorded = compose_epsilon([run], delta=1e-5, accountant="prv")
    assert recorded == pytest.approx(plan.planned_epsilon)
    assert recorded == pytest.approx(google_epsilon([run.as_tuple()], 1e-5), rel=0.03)
    fallback = split.fallback_epsilon(plan, RunConfig())
    sigma = plan.noise_multiplier / math.sqrt(threshold - colluders)
    assert split.fallback_multiplier(plan) == pytest.approx(sigma)
    theirs = google_epsilon([(sigma, plan.sample_rate, plan.rounds)], 1e-5)
    assert fallback == pytest.approx(theirs, rel=0.03)
    assert fallback > recorded or threshold - colluders == 1


class _Capture(PlainHospital):
    """The plaintext side with a fixed noise split: keeps what the hospital's step did."""

    def __init__(self, split: NoiseSplit | None) -> None:
        self.split = split
        self.updates: list[Update] = []

    def noise_split(self, order: Any, state: Any) -> NoiseSplit | None:
        return self.split

    def encode(self, order: Any, update: Update, state: Any) -> tuple[ArrayRecord, dict]:
        self.updates.append(update)
        return super().encode(order, update, state)


def _gradients(
    tmp_path: Path,
    split: NoiseSplit | None,
    runs: int = 2,
    *,
    run_name: str = "dn",
    ledger: str = "",
) -> tuple[Any, ...]:
    """``runs`` FedSGD steps of hospital 0 from the same model: every patient is sampled
    (q = 1), so the steps differ by their noise only. Each run has its own ledger unless
    ``ledger`` names one."""
    config = RunConfig(
        hospitals=3, rounds=1, strategy="fedsgd", run_name=run_name, noise_multiplier=2.0
    )
    data = local_data(config, {"partition-id": 0})
    record = msg.order_record(config, model_name="mlp", model_args=MLP_ARGS, mode=msg.MODE_GRADIENT)
    record[msg.SERVER_ROUND] = 1
    arrays = ArrayRecord({k: Array(v) for k, v in initial_weights("mlp", MLP_ARGS, 0).items()})
    side = _Capture(split)
    results = []
    for run in range(runs):
        privacy = PrivacyState(
            ledger_path=tmp_path / (ledger or f"{run}.sqlite"), budget_epsilon=1e6
        )
        results.append(
            train_round(msg.parse_order(record), data, arrays, privacy=privacy, side=side)
        )
    steps = [
        np.concatenate([np.ravel(u.before[k] - u.after[k]) for k in u.before]).astype(np.float64)
        for u in side.updates
    ]
    return results, steps


def test_a_hospital_step_carries_only_its_share_of_the_noise(tmp_path: Path) -> None:
    split = NoiseSplit(threshold=3, colluders=1, scale=2.0)  # a = 1 (q = 1): sigma / sqrt(2)
    results, (first, second) = _gradients(tmp_path, split)
    report = results[0].privacy
    assert report["sample_rate"] == 1.0 and report["noise_multiplier"] == 2.0
    shares = report["distributed_noise"]
    assert shares["added_noise_multiplier"] == pytest.approx(2.0 / math.sqrt(2))
    assert shares["conditional_noise_multiplier"] == 2.0
    units = report["patients"]
    # the difference of two steps: N(0, 2 (z C / B)^2) per value, B = the patients (q = 1)
    d = first.size
    chi2 = float(np.sum((first - second) ** 2)) / (2 * (2.0 / math.sqrt(2) / units) ** 2)
    low, high = stats.chi2.ppf([1e-6, 1 - 1e-6], d)
    assert low < chi2 < high, (chi2, d)
    # the full noise (sigma = 2, twice the variance) lies far outside the same bounds
    assert not low < chi2 / 2 < high


def test_the_ledger_records_the_full_noise_and_the_assumption(tmp_path: Path) -> None:
    import json
    import sqlite3

    split = NoiseSplit(threshold=4, colluders=1, scale=2.0)
    _gradients(tmp_path, split, runs=1)
    with sqlite3.connect(tmp_path / "0.sqlite") as conn:
        events = conn.execute("SELECT noise_multiplier, sample_rate, steps FROM events").fetchall()
        (request,) = conn.execute("SELECT request FROM plans").fetchone()
    assert events == [(2.0, 1.0, 1)]
    assert json.loads(request)["distributed-noise"] == {
        "colluders": 1,
        "threshold": 4,
        "scale": 2.0,
    }


def test_the_ledger_says_what_is_left_if_the_assumption_fails(tmp_path: Path) -> None:
    """A conditional run (t = 4, c = 1: the hospital adds sigma / sqrt(3)), then an ordinary
    run, in one ledger. The recorded epsilon composes the full sigma twice; if more hospitals
    collude, the first run counts at the hospital's own share only. Both against Google's
    accountant; `fedpriv budget` and the hospital's report say so."""
    import json

    from typer.testing import CliRunner

    from fedpriv.cli import app
    from fedpriv.privacy.ledger import Ledger

    split = NoiseSplit(threshold=4, colluders=1, scale=2.0)
    (first,), _ = _gradients(tmp_path, split, runs=1, run_name="split", ledger="h.sqlite")
    _gradients(tmp_path, None, runs=1, run_name="whole", ledger="h.sqlite")
    summary = Ledger.open(tmp_path / "h.sqlite", writable=False).summary(exact=True)
    assert summary.runs == 2 and summary.conditional_runs == (("split", 1, 4),)
    share = 2.0 / math.sqrt(3)
    recorded = google_epsilon([(2.0, 1.0, 1), (2.0, 1.0, 1)], 1e-5)
    colluding = google_epsilon([(share, 1.0, 1), (2.0, 1.0, 1)], 1e-5)
    assert summary.max_epsilon == pytest.approx(recorded, rel=0.03)
    assert summary.max_epsilon_if_colluding == pytest.approx(colluding, rel=0.03)
    assert summary.max_if_colluding_exact and colluding > 1.3 * recorded
    # the hospital's report at the first run: the fast bound, an upper bound of Google's
    alone = google_epsilon([(share, 1.0, 1)], 1e-5)
    reported = first.privacy["distributed_noise"]
    assert reported["fallback_epsilon_exact"] is False
    assert 0.99 * alone <= reported["fallback_epsilon"] <= 1.3 * alone

    runner = CliRunner()
    shown = runner.invoke(app, ["budget", "--ledger", str(tmp_path / "h.sqlite")])
    said = " ".join(shown.output.split())
    assert shown.exit_code == 0, shown.output
    assert "conditional: 1 run(s)" in said and "split (at most 1 of t = 4)" in said
    fast = Ledger.open(tmp_path / "h.sqlite", writable=False).summary()
    assert fast.max_epsilon_if_colluding is not None and not fast.max_if_colluding_exact
    assert f"the largest ε is ≤ {fast.max_epsilon_if_colluding:.3f}" in said
    machine = runner.invoke(
        app, ["budget", "--ledger", str(tmp_path / "h.sqlite"), "--json", "--exact"]
    )
    (entry,) = json.loads(machine.output)
    assert entry["summary"]["max_epsilon_if_colluding"] == pytest.approx(colluding, rel=0.03)


def test_a_ledger_without_split_runs_has_no_conditional_figure(tmp_path: Path) -> None:
    from fedpriv.privacy.ledger import Ledger

    _gradients(tmp_path, None, runs=1, run_name="whole", ledger="h.sqlite")
    ledger = Ledger.open(tmp_path / "h.sqlite", writable=False)
    summary = ledger.summary()
    assert summary.conditional_runs == () and summary.max_epsilon_if_colluding is None
    assert ledger.fallback_epsilon() is None


def test_shares_grow_by_what_rounding_can_add_to_the_sensitivity() -> None:
    plan = _plan(300)
    exact = NoiseSplit(threshold=3, colluders=1, scale=100.0)
    rounded = NoiseSplit(threshold=3, colluders=1, scale=100.0, rounding=1e-6)
    values = 10_001
    factor = rounded.added(plan, 5.0, values=values) / exact.added(plan, 5.0, values=values)
    # one patient moves the rounded sum by up to a C + sqrt(d) step (a >= 1 covers all)
    assert factor == pytest.approx(1 + math.sqrt(values) * 1e-6 / plan.max_grad_norm)


def _privacy_json(run_dir: Path, hospitals: dict[str, Any], split: dict[str, Any]) -> None:
    """A distributed-noise run's privacy.json at epsilon 3.5 (what the summary and the
    report read)."""
    import json

    document = {"dp": True, "max_epsilon": 3.5, "max_epsilon_exact": True, "delta": 1e-5}
    document.update(hospitals=hospitals, distributed_noise=split)
    (run_dir / "privacy.json").write_text(json.dumps(document))


def test_the_terminal_summary_says_the_guarantee_is_conditional(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary `fedpriv simulate` prints reads privacy.json: a distributed-noise run's
    epsilon is followed by its assumption and what is left without it."""
    from types import SimpleNamespace

    from fedpriv.cli import _print_summary

    config = RunConfig.from_mapping({**ON, "hospitals": 3, "rounds": 1})
    _privacy_json(
        tmp_path,
        {"hospital-0": {"excluded_for_budget": 0}},
        {"colluders": 1, "max_fallback_epsilon": 9.25},
    )
    final = {"hospitals": {"hospital-0": {"eval_accuracy": 0.9}}, "epsilon": {"hospital-0": 3.5}}
    result = SimpleNamespace(
        rows=[final], final=final, run_dir=tmp_path, last_round=1, config=config
    )
    _print_summary(result)
    said = " ".join(capsys.readouterr().out.split())
    assert "epsilon 3.50 at delta 1e-05" in said
    assert "conditional (distributed noise): holds while at most 1 hospitals collude" in said
    assert "if more do, epsilon ≤ 9.25 per patient" in said


def test_the_progress_bar_marks_a_conditional_epsilon() -> None:
    from fedpriv.cli import _round_status

    row = {"round": 2, "eval_accuracy": 0.9, "epsilon": {"h0": 1.5, "h1": 2.25}}
    split = RunConfig.from_mapping({**ON, "hospitals": 4, "rounds": 2})
    assert _round_status(row, split).endswith("ε ≤ 2.25 (conditional)")
    assert _round_status(row, RunConfig()).endswith("ε ≤ 2.25")


# ---- patients with several records each --------------------------------------------------


def _visits(path: Path, patients: int = 150, seed: int = 3) -> Path:
    """A table where each patient holds one to four records (visits), named in a patient
    column: the label is the patient's, the features vary a little between visits."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        base = rng.normal(size=4)
        label = int(base[0] + base[1] > 0)
        for _ in range(int(rng.integers(1, 5))):
            values = base + 0.3 * rng.normal(size=4)
            rows.append(f"p{p}," + ",".join(f"{v:.4f}" for v in values) + f",{label}")
    path.write_text("patient,a,b,c,d,label\n" + "\n".join(rows) + "\n")
    return path


def _by_hand(config: RunConfig, records: int, patients: int) -> float:
    """``a_i sigma_i`` written out: the hospital's own plan for its patients, and its
    examples over its expected batch of patients (Opacus's divisor)."""
    plan = plan_for_run(config, patients, one_step_per_round=True)
    assert plan.sample_rate == 1 / math.ceil(patients / config.batch_size)  # Opacus's
    return records / max(1.0, patients * plan.sample_rate) * plan.noise_multiplier


@pytest.mark.parametrize("batch_size", [16, 128])  # q < 1 at most hospitals; q = 1 at all
def test_rho_is_the_largest_share_any_declared_hospital_needs(batch_size: int) -> None:
    config = RunConfig.from_mapping(
        {**ON, "hospitals": 5, "rounds": 3, "batch-size": batch_size, "accountant": "rdp"}
    )
    records = {"h0": 40, "h1": 90, "h2": 90, "h3": 200, "h4": 30}
    patients = {"h0": 40, "h1": 30, "h2": 90, "h3": 50, "h4": 12}
    expected = max(_by_hand(config, records[h], patients[h]) for h in records)
    assert noise_scale(config, records, patients) == pytest.approx(expected, rel=1e-12)
    # an old declaration (no patient count) is one record per patient: rho was sigma / q
    alone = {h: (records[h], records[h]) for h in records}
    assert noise_scale(config, records) == pytest.approx(
        max(_by_hand(config, n, u) for n, u in alone.values()), rel=1e-12
    )
    # several records per patient need more than one record each: the old rho fell short
    assert noise_scale(config, records, patients) > noise_scale(config, records)


def test_the_secagg_range_is_sized_for_the_declared_patients() -> None:
    """The same declarations size secure aggregation's range R: the largest honest update
    of a hospital training its declared patients (DP-SGD samples and clips patients)."""
    from fedpriv.privacy.update_norm import run_update_bound
    from fedpriv.protocols.secagg import max_norm

    config = RunConfig.from_mapping({"aggregation": "secagg", "hospitals": 3, "accountant": "rdp"})
    records = {"h0": 120, "h1": 300, "h2": 90, "h3": 50}
    patients = {"h0": 40, "h1": 150, "h2": 90, "h3": 51}  # h3's cannot be: no say
    size = 1_000

    def bound(units: int) -> float:
        value = run_update_bound(config, units=units, parameters=size)
        assert value is not None
        return value.total

    expected = max(bound(patients[h]) for h in ("h0", "h1", "h2"))
    assert max_norm(config, declared=records, parameters=size, patients=patients) == (
        pytest.approx(expected, rel=1e-12),
        "derived",
    )
    # without patient counts: one record per patient, as before (a different range)
    per_record = max(bound(n) for n in records.values())
    assert max_norm(config, declared=records, parameters=size)[0] == pytest.approx(
        per_record, rel=1e-12
    )
    assert abs(per_record - expected) > 0.05 * expected


@pytest.mark.parametrize(
    "bad",
    [-1, 201, 2.5, True, "50", None, float("nan"), 0],  # 0 patients of 200 records
)
def test_a_declaration_that_cannot_be_a_hospitals_has_no_say(bad: Any) -> None:
    config = RunConfig.from_mapping({**ON, "hospitals": 3, "rounds": 3, "accountant": "rdp"})
    records = {"h0": 40, "h1": 200}
    honest = noise_scale(config, {"h0": 40}, {"h0": 40})
    assert noise_scale(config, records, {"h0": 40, "h1": bad}) == honest
    assert usable_size(200, bad) is None
    # too few patients to train (min-patients): no say either (a liar would raise everyone's
    # noise); with no usable declaration at all, one clear error
    assert noise_scale(config, records, {"h0": 40, "h1": config.min_patients - 1}) == honest
    with pytest.raises(FedprivError, match="no hospital declared enough training patients"):
        noise_scale(config, {"h1": 200}, {"h1": bad})


def _federation(tmp_path: Path, rounds: int = 1) -> tuple[Any, Any]:
    from fedpriv.server.prepare import prepare_run

    config = RunConfig.from_mapping(
        {
            **ON,
            "dataset": str(_visits(tmp_path / "visits.csv")),
            "patient-column": "patient",
            "hospitals": 3,
            "rounds": rounds,
            "seed": 5,
            "out": str(tmp_path / "runs"),
            "run-name": "visits",
        }
    )
    return config, prepare_run(config, central=False)


def _step(
    tmp_path: Path, config: RunConfig, hospital: int, split: NoiseSplit, ledger: str
) -> tuple[Any, Any]:
    """Round 1 of one simulated hospital under ``split``, on its own ledger."""
    data = local_data(config, {"partition-id": hospital})
    args = {"in_features": 4, "num_classes": 2}
    record = msg.order_record(config, model_name="mlp", model_args=args, mode=msg.MODE_GRADIENT)
    record[msg.SERVER_ROUND] = 1
    arrays = ArrayRecord({k: Array(v) for k, v in initial_weights("mlp", args, 0).items()})
    privacy = PrivacyState(ledger_path=tmp_path / f"{ledger}-{hospital}.sqlite", budget_epsilon=10)
    side = _Capture(split)
    return train_round(msg.parse_order(record), data, arrays, privacy=privacy, side=side), data


def test_hospitals_whose_patients_hold_several_records_train_under_distributed_noise(
    tmp_path: Path,
) -> None:
    """Each hospital's counts as the simulation declares them (the same a site sends with
    its schema), rho from them, then each hospital's real DP-SGD step: none declines, each
    adds rho / (a_i sqrt(t - c)), and its recorded epsilon is dp-accounting's for its full
    sigma. Sized as before (one record per patient) every hospital declined."""
    config, plan = _federation(tmp_path)
    config = plan.config
    assert set(plan.declared) == set(plan.declared_patients) and len(plan.declared) == 3
    rho = noise_scale(config, plan.declared, plan.declared_patients)
    split = NoiseSplit(threshold=3, colluders=1, scale=rho)  # t - c = 2 honest shares
    old = NoiseSplit(threshold=3, colluders=1, scale=noise_scale(config, plan.declared))
    needs = []
    for k in range(3):
        result, data = _step(tmp_path, config, k, split, "new")
        # the declaration is the hospital's own count: its records, its distinct patients
        assert plan.declared[data.name] == data.train_labels.size
        patients = len({str(p) for p in data.train_records.patient_ids})
        assert plan.declared_patients[data.name] == patients < data.train_labels.size
        assert not result.declined, result.declined
        report = result.privacy
        a = data.train_labels.size / max(1.0, patients * report["sample_rate"])
        needs.append(a * report["noise_multiplier"])
        added = report["distributed_noise"]["added_noise_multiplier"]
        assert added == pytest.approx(rho / (a * math.sqrt(2)))
        assert report["epsilon"] == pytest.approx(
            google_epsilon(report["events"], config.delta), rel=0.03
        )
        assert report["events"] == [
            {"noise_multiplier": report["noise_multiplier"], "sample_rate": 1.0, "steps": 1}
        ]
        refused, _ = _step(tmp_path, config, k, old, "old")
        assert "declines the round" in refused.declined
    assert rho == pytest.approx(max(needs), rel=1e-12)


def test_a_hospital_that_declares_more_patients_than_it_has_declines(tmp_path: Path) -> None:
    """A liar must not leave its own patients under-protected: declaring more patients (or
    fewer records) than it holds makes its share look smaller, and its own check, on what it
    really holds, declines. Declaring fewer patients only raises everyone's noise."""
    config, plan = _federation(tmp_path)
    config = plan.config
    needs = {
        h: _by_hand(config, plan.declared[h], plan.declared_patients[h]) for h in plan.declared
    }
    liar = max(needs, key=needs.__getitem__)  # so that rho is its declaration's to set
    k = list(plan.declared).index(liar)  # the split's order
    records, patients = plan.declared[liar], plan.declared_patients[liar]
    lies = {
        "one record per patient": (records, records),
        "fewer records": (patients + 1, patients),
    }
    for what, (said_records, said_patients) in lies.items():
        assert (said_records, said_patients) != (records, patients)
        assert said_records <= records and said_patients >= patients
        rho = noise_scale(
            config,
            {**plan.declared, liar: said_records},
            {**plan.declared_patients, liar: said_patients},
        )
        assert rho < needs[liar], what
        split = NoiseSplit(threshold=3, colluders=1, scale=rho)
        result, data = _step(tmp_path, config, k, split, what.replace(" ", "-"))
        assert data.name == liar
        assert "declines the round" in result.declined, (what, result.declined)
    modest = dict(plan.declared_patients, **{liar: config.min_patients})
    assert noise_scale(config, plan.declared, modest) > max(needs.values())


@pytest.mark.usefixtures("flower_task")
def test_sites_declare_their_patients_with_their_schema(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deployment: each site's schema reply carries its training records and their patients
    (its patient column; distinct records without one), the server keeps both. A reply
    whose counts cannot be a hospital's is logged and gives it no say; a site that sends no
    patient count (an older one) holds one record per patient."""
    from flwr.app import Message

    from fedpriv.client.site import check_site
    from fedpriv.privacy.identity import SiteKey
    from fedpriv.server.prepare import _prepare_deployment, resolve_model_from_hospitals
    from tests.unit.test_site_policy import InProcessGrid

    sites: dict[int, dict[str, Any]] = {}
    for node, name in ((1, "st-mary"), (2, "county"), (3, "old"), (4, "odd")):
        site = {
            "hospital-name": name,
            "data-path": str(_visits(tmp_path / f"{name}.csv", patients=40, seed=node)),
            "patient-column": "patient",
            "ledger-path": str(tmp_path / f"{name}.sqlite"),
        }
        check_site(site)
        sites[node] = site
    # no patient column, and records that repeat: a patient per distinct record, as its
    # ledger counts them
    plain = {
        "hospital-name": "plain",
        "data-path": str(tmp_path / "plain.csv"),
        "ledger-path": str(tmp_path / "plain.sqlite"),
    }
    (tmp_path / "plain.csv").write_text(
        "a,b,c,d,label\n" + "".join(f"{i % 7},{i % 5},1,2,{i % 2}\n" for i in range(80))
    )
    check_site(plain)
    sites[5] = plain

    class Tampered(InProcessGrid):
        """Site "old" sends no patient count; site "odd" more patients than records."""

        def send_and_receive(self, messages: Any, timeout: float) -> list[Message]:
            replies = super().send_and_receive(messages, timeout)
            for reply in replies:
                schema = reply.content.config_records[msg.SCHEMA]
                name = str(reply.content.config_records[msg.HOSPITAL][msg.HOSPITAL_NAME])
                if name == "old":
                    del schema[msg.SCHEMA_PATIENTS]
                elif name == "odd":
                    schema[msg.SCHEMA_PATIENTS] = int(schema[msg.SCHEMA_EXAMPLES]) + 1
            return replies

    config = RunConfig(deployment=True, out=str(tmp_path / "runs"), run_name="sites")
    plan = _prepare_deployment(config, resume_dir=None)
    resolved = resolve_model_from_hospitals(Tampered(sites), plan)  # type: ignore[arg-type]
    key = SiteKey.create(tmp_path / "any.key")
    for node in (1, 2, 3, 5):
        data = local_data(config, sites[node])
        records = data.train_records
        assert records is not None
        assert resolved.declared[data.name] == data.train_labels.size
        # what its ledger will count: the distinct keyed identities of its records
        keyed = key.records(records).keys
        if node == 5:  # no patient column: its distinct records, fewer than its rows
            distinct = len(set(records.row_material()))
            assert resolved.declared_patients[data.name] == distinct < data.train_labels.size
            assert distinct == np.unique(keyed).size
        elif node == 3:
            assert data.name not in resolved.declared_patients
        else:
            assert records.patient_ids is not None
            patients = len({str(p) for p in records.patient_ids})
            assert resolved.declared_patients[data.name] == patients < data.train_labels.size
            assert patients == np.unique(keyed).size
    assert "odd" not in resolved.declared and "odd" not in resolved.declared_patients
    assert "odd declared" in caplog.text and "it has no say" in caplog.text
    # a resumed run is not sent the schema query again: it keeps what was declared (before,
    # it had nothing, so distributed noise could not size its shares and no claim was
    # checked against a declaration)
    resumed = _prepare_deployment(config, resume_dir=resolved.run_dir.path)
    assert resumed.declared == resolved.declared and resumed.declared
    assert resumed.declared_patients == resolved.declared_patients
    (resolved.run_dir.path / "declared.json").write_text('{"records": {"a": "many"}}')
    with pytest.raises(RunDirectoryError, match="does not hold the hospitals' counts"):
        _prepare_deployment(config, resume_dir=resolved.run_dir.path)


def test_the_report_states_the_condition_once_and_the_figures_where_the_spend_is(
    tmp_path: Path,
) -> None:
    """report.html: the assumption in words with the guarantee at the top (once); the
    privacy section repeats only its figures and points there."""
    import json

    from fedpriv.report import build_report

    config = RunConfig.from_mapping({**ON, "hospitals": 4, "rounds": 1}).to_mapping()
    (tmp_path / "config.json").write_text(json.dumps({**config, "model": "mlp"}))
    (tmp_path / "metrics.jsonl").write_text("")
    report = {"epsilon": 3.5, "epsilon_exact": True, "budget_epsilon": 10.0, "delta": 1e-5}
    _privacy_json(
        tmp_path,
        {"hospital-0": report},
        {
            "colluders": 1,
            "threshold": 3,
            "max_fallback_epsilon": 9.25,
            "max_fallback_epsilon_exact": False,
        },
    )
    page = " ".join(build_report(tmp_path).read_text().split())
    assert page.count("This guarantee is conditional") == 1
    assert page.count("epsilon &le; 9.25 per patient") == 2  # the guarantee, the figures
    summary = page[page.index("<p id='summary'>") : page.index("<section id='results'>")]
    assert "This guarantee is conditional" in summary and "at most 1 hospitals collude" in summary
    privacy = page[page.index("<section id='privacy'>") :]
    assert "the epsilons above are conditional (at most 1 hospitals collude" in privacy
    assert "sums over at least 3 hospitals" in privacy and "href='#summary'" in privacy


def test_a_simulation_counts_its_hospitals_patients_only_where_they_are_used(
    tmp_path: Path,
) -> None:
    """Secure aggregation (its range, distributed noise) sizes by the declared patients; other
    runs do not read them, and counting reads every training record at start-up."""
    from fedpriv.server.prepare import prepare_run

    common = {"dataset": "breast-cancer", "hospitals": 3, "rounds": 1, "out": str(tmp_path)}
    plain = prepare_run(RunConfig.from_mapping({**common, "run-name": "plain"}), central=False)
    assert plain.declared and plain.declared_patients == {}
    masked = prepare_run(
        RunConfig.from_mapping({**common, **ON, "run-name": "masked"}), central=False
    )
    assert masked.declared == plain.declared
    # breast-cancer has no patient column: a patient per distinct record
    assert masked.declared_patients == {name: count for name, count in masked.declared.items()}
