"""Client-level DP at the server: clipping, noise scale, and adaptive clipping that tracks
its quantile (and Flower's, which does not)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedpriv.protocols.base import Contribution
from fedpriv.protocols.client_dp import (
    ClientLevelDpAggregator,
    clip_update,
    update_noise_multiplier,
)


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in values.items()})


def test_clip_update_bounds_the_norm_and_keeps_short_updates() -> None:
    long = {"a": np.full(4, 3.0), "b": np.full(2, 4.0)}
    clipped, norm = clip_update(long, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 2 * 16))
    assert np.sqrt(sum(np.sum(v**2) for v in clipped.values())) == pytest.approx(1.0)
    short = {"a": np.full(4, 0.1)}
    same, _ = clip_update(short, 1.0)
    np.testing.assert_allclose(same["a"], short["a"])


def test_noiseless_aggregate_is_the_uniform_mean_of_clipped_updates() -> None:
    base = {"w": np.zeros(3)}
    updates = [np.array([3.0, 0.0, 0.0]), np.array([0.0, 0.5, 0.0]), np.array([0.0, 0.0, -2.0])]
    contributions = [
        Contribution(f"h{i}", _record({"w": base["w"] + u}), num_examples=n)
        for i, (u, n) in enumerate(zip(updates, [10, 1000, 50], strict=True))
    ]
    aggregator = ClientLevelDpAggregator(clip_norm=1.0, noise_multiplier=0.0)
    result = aggregator.aggregate(contributions, reference=_record(base))
    assert result is not None
    # clipped to [1,0,0], [0,.5,0], [0,0,-1]; averaged uniformly, not by example counts
    np.testing.assert_allclose(result["w"].numpy(), [1 / 3, 0.5 / 3, -1 / 3], atol=1e-6)


def test_noise_has_standard_deviation_z_s_over_m() -> None:
    d, m, z, s = 20_000, 4, 1.5, 0.5
    contributions = [Contribution(f"h{i}", _record({"w": np.zeros(d)}), 1) for i in range(m)]
    aggregator = ClientLevelDpAggregator(clip_norm=s, noise_multiplier=z)
    result = aggregator.aggregate(contributions, reference=_record({"w": np.zeros(d)}))
    assert result is not None
    assert np.std(result["w"].numpy()) == pytest.approx(z * s / m, rel=0.03)


def _norms_round(aggregator: ClientLevelDpAggregator, norms: np.ndarray) -> None:
    contributions = [
        Contribution(f"h{i}", _record({"w": np.array([n, 0.0])}), 1) for i, n in enumerate(norms)
    ]
    aggregator.aggregate(contributions, reference=_record({"w": np.zeros(2)}))


def test_our_adaptive_clipping_converges_to_the_target_quantile() -> None:
    norms = np.linspace(0.5, 2.0, 11)  # median 1.25
    aggregator = ClientLevelDpAggregator(
        clip_norm=0.05,
        noise_multiplier=0.0,
        adaptive=True,
        target_quantile=0.5,
        clip_lr=0.2,
        count_noise_std=0.5,
    )
    for _ in range(150):
        _norms_round(aggregator, norms)
    tail = np.array(aggregator.clip_history[-50:])
    assert np.median(tail) == pytest.approx(1.25, rel=0.25)


def test_adaptive_noise_split_keeps_the_total_multiplier() -> None:
    z, sigma_b = 1.0, 1.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(ValueError, match="count noise"):
        update_noise_multiplier(1.0, 0.4)


@pytest.mark.usefixtures("flower_task")
def test_flowers_adaptive_clipping_moves_away_from_the_quantile() -> None:
    """Why fedpriv has its own: Flower 1.41 updates the clip norm with the fraction of
    *clipped* updates, so an initial norm below every update shrinks instead of growing.
    If this ever fails, Flower has fixed it and its wrapper can be reconsidered."""
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FlowerFedAvg(),
        noise_multiplier=0.0,
        num_sampled_clients=5,
        initial_clipping_norm=0.1,
        target_clipped_quantile=0.5,
        clip_norm_lr=0.2,
        clipped_count_stddev=0.0,
    )
    base = np.zeros(2, dtype=np.float32)
    for _ in range(20):
        strategy.current_arrays = ArrayRecord({"w": Array(base)})
        replies = [
            Message(
                content=RecordDict(
                    {
                        "arrays": ArrayRecord({"w": Array(np.array([1.0, 0.0], dtype=np.float32))}),
                        "metrics": MetricRecord({"num-examples": 1}),
                        "hospital": ConfigRecord({"name": f"h{i}"}),
                    }
                ),
                dst_node_id=1,
                message_type=MessageType.TRAIN,
            )
            for i in range(5)
        ]
        strategy.aggregate_train(1, replies)
    # every update has norm 1; the 50 % quantile is 1.0, yet the clip norm fell below 0.1
    assert strategy.clipping_norm < 0.1
    ours = ClientLevelDpAggregator(
        clip_norm=0.1,
        noise_multiplier=0.0,
        adaptive=True,
        target_quantile=0.5,
        clip_lr=0.2,
        count_noise_std=1e-9,
    )
    for _ in range(20):
        _norms_round(ours, np.ones(5))
    assert ours.clip_norm > 0.1
