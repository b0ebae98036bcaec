"""Federated statistics when a minority of hospitals lie: the server's checks reject what no
records within the public ranges could have produced (against the ranges, by hand), honest
releases pass them (many noise draws, features constant at a range edge included), one
liar's share of the combination and its move of any centre stay within the documented bound
(asserted numerically, and the bound is nearly reached by the worst case), the honest
combination is unchanged, and a liar at the real server path is recorded and outvoted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedpriv.data.schema import CATEGORICAL, Feature, Label, Schema
from fedpriv.errors import ConfigError
from fedpriv.privacy.statistics import (
    COUNT_WEIGHT,
    SCALE_FLOOR,
    SQUARE_WEIGHT,
    WEIGHT_CAP,
    StatisticsMechanism,
    influence_bound,
)

SCHEMA = Schema(
    features=(
        Feature("age", minimum=0, maximum=100),
        Feature("sex", kind=CATEGORICAL, categories=(1.0, 2.0)),
        Feature("bp", minimum=50, maximum=250),
    ),
    labels=(Label("0"), Label("1")),
)
SPANS = np.array([100.0, 200.0])
LOWS = np.array([0.0, 50.0])


def _site(rng: np.random.Generator, n: int, age: float = 45.0) -> np.ndarray:
    return np.column_stack(
        [rng.normal(age, 12, n).clip(0, 100), rng.integers(1, 3, n), rng.normal(140, 25, n)]
    )


def _release(mechanism: StatisticsMechanism, raw: np.ndarray, rng: np.random.Generator):
    return mechanism.release(raw, np.arange(len(raw)), rng)


def _lie(count: float, mean_u: float, second_u: float, d: int = 2) -> np.ndarray:
    """What a liar sends: ``count`` patients whose u has this mean and second moment."""
    return np.concatenate(
        [
            [COUNT_WEIGHT * count],
            np.full(d, count * mean_u),
            np.full(d, SQUARE_WEIGHT * count * (second_u - 0.125)),
        ]
    )


def _centres(combined) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The combined centres in units of the public range (0 = min, 1 = max)."""
    return (np.array([combined.reference[n][0] for n in ("age", "bp")]) - LOWS) / SPANS


def _scales(combined) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.array([combined.reference[n][1] for n in ("age", "bp")]) / SPANS


def test_the_bound_is_cap_over_cap_plus_the_honest_hospitals_above_the_median() -> None:
    assert influence_bound(2) == 1.0  # one of two is no minority: nothing to promise
    assert influence_bound(3, 2.0) == pytest.approx(2 / 3)
    assert influence_bound(5, 2.0) == pytest.approx(1 / 2)
    assert influence_bound(10, 2.0) == pytest.approx(1 / 3)
    assert influence_bound(11, 2.0) == pytest.approx(2 / 7)
    assert influence_bound(5, math.inf) == 1.0
    assert influence_bound(5) == influence_bound(5, WEIGHT_CAP)


def test_honest_releases_pass_the_checks_and_combine_exactly_as_before() -> None:
    """400 noisy releases of five honest hospitals of uneven sizes (within twice the median),
    one feature constant at its range's lower edge (the hardest case for the range check):
    none is rejected, none is capped, and the centre and scale are the uncapped pooled ones
    to the last bit."""
    mechanism = StatisticsMechanism.for_schema(SCHEMA, 4.0)
    rng = np.random.default_rng(0)
    sites = [_site(rng, n) for n in (40, 60, 73, 90, 120)]
    for site in sites:
        site[:, 0] = 0.0  # every age at the range's minimum
    rejected = 0
    for _ in range(80):
        releases = [_release(mechanism, s, rng) for s in sites]
        rejected += sum(bool(mechanism.implausible(r)) for r in releases)
        robust = mechanism.combine(releases)
        before = mechanism.combine(releases, cap=math.inf)
        assert robust.reference == before.reference and robust.capped == ()
        assert sum(robust.shares) == pytest.approx(1.0)
    assert rejected == 0


def test_implausible_releases_are_rejected_with_the_reason() -> None:
    mechanism = StatisticsMechanism.for_schema(SCHEMA, 1.0)
    s = mechanism.sigma
    assert mechanism.implausible(_lie(100, 0.5, 0.25)) == ""  # every value at the top: possible
    assert mechanism.implausible(_lie(100, -0.5, 0.25)) == ""
    assert mechanism.implausible(_lie(1e9, 0.5, 0.25)) == ""  # huge, but consistent: capped
    outside = mechanism.implausible(_lie(1e9, 5.5, 30.25))
    assert "mean of 'age'" in outside and "outside the public range [0, 100]" in outside
    # beyond the range by less than the noise allows: accepted; by more: rejected
    near = _lie(100, 0.5, 0.25)
    near[1] += 5 * s
    assert mechanism.implausible(near) == ""
    near[1] += 2 * s
    assert "mean of 'age'" in mechanism.implausible(near)
    # a second moment above 1/4 (a deviation wider than the range allows), or below 0
    wide = mechanism.implausible(_lie(1e6, 0.0, 0.3))
    assert "variance that no values within the public range [0, 100]" in wide
    assert "variance" in mechanism.implausible(_lie(1e6, 0.0, -0.1))
    assert "negative" in mechanism.implausible(_lie(-1000, 0.0, 0.1))
    # malformed: wrong length, NaN, infinite, not numbers at all
    for bad in ([1.0, 2.0], [np.nan] * 5, [np.inf, 0, 0, 0, 0], "abcde", 3.0, None):
        with pytest.raises(ConfigError, match="hospital-9 sent"):
            mechanism.check(bad, who="hospital-9")  # type: ignore[arg-type]


@pytest.mark.parametrize("hospitals", [3, 5, 10])
def test_one_liar_at_the_range_edge_moves_a_centre_at_most_the_bound(hospitals: int) -> None:
    """Noise negligible, so the move is the liar's alone: it claims 1e9 patients all at the
    top of every range; the honest hospitals sit low. Its share of the weight, and how far it
    moves each centre (in units of the range), stay under influence_bound(k); without the cap
    it would own the centre."""
    mechanism = StatisticsMechanism.for_schema(SCHEMA, 1e-9)
    rng = np.random.default_rng(hospitals)
    honest = [_release(mechanism, _site(rng, 80, age=20.0), rng) for _ in range(hospitals - 1)]
    alone = mechanism.combine(honest)
    lie = _lie(1e9, 0.5, 0.25)
    assert mechanism.implausible(lie) == ""  # it passes the checks: only the cap stops it
    bound = influence_bound(hospitals)
    robust = mechanism.combine([lie, *honest])
    assert robust.capped == (0,)
    assert robust.shares[0] <= bound
    moved = np.abs(_centres(robust) - _centres(alone))
    assert np.all(moved <= bound * np.abs(1.0 - _centres(alone)) + 1e-9)
    assert np.all(moved <= bound)
    assert np.all(moved > 0.05)  # it does move them (a bound, not a rejection)
    before = mechanism.combine([lie, *honest], cap=math.inf)
    assert np.allclose(_centres(before), 1.0, atol=1e-6)  # before: the liar's centre, alone
    # scales: the mixture rule bounds them both ways (a fraction a of the weight elsewhere)
    a = robust.shares[0]
    assert np.all(_scales(robust) >= math.sqrt(1 - a) * _scales(alone) - 1e-9)
    assert np.all(_scales(robust) <= np.sqrt(_scales(alone) ** 2 + a) + 1e-9)


def test_the_bound_is_reached_by_the_worst_case_and_no_further() -> None:
    """Five hospitals, two of them nearly empty: the liar's weight (twice the median count)
    faces only the two hospitals at the median; every honest value at the bottom, the lie at
    the top. The centre moves by nearly the bound and not past it."""
    mechanism = StatisticsMechanism.for_schema(SCHEMA, 1e-9)
    bottom = np.column_stack([np.zeros(100), np.ones(100), np.full(100, 50.0)])
    honest = [_release(mechanism, bottom[:n], np.random.default_rng(n)) for n in (1, 1, 100, 100)]
    robust = mechanism.combine([_lie(1e9, 0.5, 0.25), *honest])
    bound = influence_bound(5)
    moved = _centres(robust) - _centres(mechanism.combine(honest))
    assert np.all(moved <= bound) and np.all(moved >= 0.98 * bound)
    assert robust.shares[0] == pytest.approx(200 / 402)


def test_a_liar_shrinking_every_scale_is_bounded_by_its_share() -> None:
    """1e9 patients all at the honest centre (no variance): the scales shrink by at most
    sqrt(1 - share), so no feature is blown up more than that."""
    mechanism = StatisticsMechanism.for_schema(SCHEMA, 1e-9)
    rng = np.random.default_rng(7)
    honest = [_release(mechanism, _site(rng, 80), rng) for _ in range(4)]
    alone = mechanism.combine(honest)
    centre_u = _centres(alone) - 0.5
    lie = np.concatenate(
        [
            [COUNT_WEIGHT * 1e9],
            1e9 * centre_u,
            SQUARE_WEIGHT * 1e9 * (centre_u**2 - 0.125),
        ]
    )
    robust = mechanism.combine([lie, *honest])
    ratio = _scales(robust) / _scales(alone)
    assert np.all(ratio >= math.sqrt(1 - influence_bound(5)) - 1e-9)
    assert np.all(ratio < 0.95)  # it does shrink them
    before = mechanism.combine([lie, *honest], cap=math.inf)
    assert np.allclose(_scales(before), SCALE_FLOOR)  # before: every scale at the floor


def test_a_majority_of_liars_is_out_of_scope_but_does_not_crash() -> None:
    mechanism = StatisticsMechanism.for_schema(SCHEMA, 1.0)
    rng = np.random.default_rng(9)
    honest = [_release(mechanism, _site(rng, 80), rng) for _ in range(2)]
    lies = [_lie(1e9, 0.5, 0.25), _lie(1e12, -0.5, 0.25), _lie(0.0, 0.0, 0.0)]
    for releases in ([*lies, *honest], lies, [_lie(-5.0, 0.0, 0.0)] * 3):
        combined = mechanism.combine(releases)
        for name, (low, high) in zip(mechanism.names, mechanism.bounds, strict=True):
            centre, scale = combined.reference[name]
            assert low <= centre <= high and 0 < scale <= (high - low) / 2


class _LyingSitesGrid:
    """Real sites answering through fedpriv's query handler; the replies of the nodes in
    ``lies`` have their statistics replaced by what the test says (the transport only)."""

    def __init__(self, sites: dict[int, dict], lies: dict[int, object]) -> None:
        self.sites = sites
        self.lies = lies

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: list, timeout: float) -> list:
        from flwr.app import Context, RecordDict

        from fedpriv import messages as msg
        from fedpriv.client.handlers import handle_query
        from fedpriv.privacy.statistics import STATS_SUMS

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
            reply = handle_query(message, context)
            if node in self.lies:
                reply.content.config_records[msg.STATISTICS][STATS_SUMS] = self.lies[node]
            replies.append(reply)
        return replies


@pytest.mark.usefixtures("flower_task")
def test_the_server_rejects_or_caps_lying_sites_and_records_who_and_why(
    tmp_path: Path,
) -> None:
    """Six real sites (files, ledgers, fedpriv's handlers, the server's gather step): one
    claims a mean far outside the range, one sends NaN, one a wrong length, one claims 1e9
    patients at the top of every range. The first three are rejected with their reasons in
    statistics.json, the fourth is capped to at most the bound's share, and the centre
    stays near the honest sites' (ages around 40 and 50)."""
    from fedpriv.config import RunConfig
    from fedpriv.server.prepare import _prepare_deployment
    from fedpriv.server.statistics import STATISTICS_JSON, gather_statistics

    schema = tmp_path / "schema.toml"
    schema.write_text(
        '[[feature]]\nname = "a"\nkind = "numeric"\nmin = 0\nmax = 100\n'
        '[[label]]\ncode = "0"\n[[label]]\ncode = "1"\n'
    )
    rng = np.random.default_rng(11)
    names = ["st-mary", "county", "outside", "nan", "short", "huge"]
    sites = {}
    for node, name in enumerate(names, 1):
        data = tmp_path / f"{name}.csv"
        centre = 40 if node % 2 else 50
        rows = [f"{name}-{i},{rng.normal(centre, 6):.2f},{i % 2}" for i in range(300)]
        data.write_text("patient,a,label\n" + "\n".join(rows) + "\n")
        sites[node] = {
            "hospital-name": name,
            "data-path": str(data),
            "patient-column": "patient",
            "schema-path": str(schema),
            "ledger-path": str(tmp_path / f"{name}.sqlite"),
        }
    lies: dict[int, object] = {
        3: [2.0 * 1e6, 1e6 * 5.0, 4.0 * 1e6 * (25.0 - 0.125)],
        4: [float("nan"), 1.0, 1.0],
        5: [1.0, 2.0],
        6: [2.0 * 1e9, 0.5 * 1e9, 4.0 * 1e9 * 0.125],
    }
    grid = _LyingSitesGrid(sites, lies)
    config = RunConfig(
        deployment=True,
        schema=str(schema),
        normalisation="federated",
        accountant="rdp",
        out=str(tmp_path / "runs"),
        run_name="liars",
        model="mlp",
    )
    plan = gather_statistics(grid, _prepare_deployment(config, resume_dir=None))  # type: ignore[arg-type]
    written = json.loads((plan.run_dir.path / STATISTICS_JSON).read_text())
    rejected = written["rejected"]
    assert set(rejected) == {"outside", "nan", "short"}
    assert "outside the public range [0, 100]" in rejected["outside"]
    assert "non-finite" in rejected["nan"] and "expected 3 numbers" in rejected["short"]
    assert written["released"] == 3 and set(written["hospitals"]) == {"st-mary", "county", "huge"}
    huge = written["hospitals"]["huge"]
    bound = influence_bound(3)
    assert huge["capped"] and huge["share"] <= bound
    assert written["combination"]["influence_bound"] == pytest.approx(bound)
    assert written["combination"]["largest_share"] == pytest.approx(huge["share"])
    centre, scale = json.loads(plan.config.feature_statistics)["a"]
    # honest centre ~45 (noise: a few units); the liar pulls towards 100 by at most its share
    assert centre <= 45 + bound * (100 - 45) + 10
    assert centre < 90 and scale > 0
