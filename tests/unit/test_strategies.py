"""Aggregation math against numpy, and FedSGD against one full-batch FedAvg step."""

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

from fedpriv import messages as msg
from fedpriv.client.hospital import local_data, train_round
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.protocols.base import Contribution
from fedpriv.protocols.checks import Limits
from fedpriv.protocols.plain import PlainServer
from fedpriv.server.run import initial_weights
from fedpriv.strategies import FedAvg, FedSGD, create_strategy


def _reply(arrays: dict[str, np.ndarray], n: int, name: str, **metrics: float) -> Message:
    content = RecordDict(
        {
            msg.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            msg.METRICS: MetricRecord({msg.NUM_EXAMPLES: n, **metrics}),
            msg.HOSPITAL: ConfigRecord({msg.HOSPITAL_NAME: name}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_plain_aggregator_is_the_example_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    counts = [10, 30, 60]
    updates = [
        {
            "w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=3).astype(np.float32),
        }
        for _ in counts
    ]
    contributions = [
        Contribution(
            hospital=f"h{i}",
            arrays=ArrayRecord({k: Array(v) for k, v in u.items()}),
            num_examples=n,
        )
        for i, (u, n) in enumerate(zip(updates, counts, strict=True))
    ]
    reference = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in updates[0].items()})
    result = PlainServer(limits=Limits()).aggregate(contributions, reference=reference)
    assert result is not None
    for key in ("w", "b"):
        expected = np.average(np.stack([u[key] for u in updates]), axis=0, weights=counts)
        got = result[key].numpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_plain_aggregator_drops_a_malformed_update() -> None:
    good = {"w": np.ones((2, 2), dtype=np.float32)}
    bad_shape = {"w": np.ones((3, 2), dtype=np.float32)}
    poisoned = {"w": np.full((2, 2), np.nan, dtype=np.float32)}
    contributions = [
        Contribution("a", ArrayRecord({k: Array(v) for k, v in good.items()}), 5),
        Contribution("b", ArrayRecord({k: Array(v) for k, v in bad_shape.items()}), 5),
        Contribution("c", ArrayRecord({k: Array(v) for k, v in poisoned.items()}), 5),
    ]
    reference = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})
    server = PlainServer(limits=Limits())
    result = server.aggregate(contributions, reference=reference)
    assert result is not None
    np.testing.assert_array_equal(result["w"].numpy(), good["w"])
    assert [name for name, _ in server.rejected] == ["b", "c"]


@pytest.mark.usefixtures("flower_task")
def test_fedavg_aggregate_train_weights_models_and_metrics() -> None:
    strategy = FedAvg(aggregator=PlainServer(limits=Limits()))
    strategy._current = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    replies = [
        _reply({"w": np.array([0.0, 0.0], dtype=np.float32)}, 1, "a", **{"train-loss": 1.0}),
        _reply({"w": np.array([4.0, 8.0], dtype=np.float32)}, 3, "b", **{"train-loss": 3.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 6.0])
    assert metrics["train-loss"] == pytest.approx(2.5)
    assert metrics[msg.NUM_EXAMPLES] == 4


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("dataset", ["breast-cancer", "digits"])
def test_fedsgd_round_equals_fedavg_with_one_full_batch_step(dataset: str) -> None:
    lr = 0.3
    config = RunConfig(
        dataset=dataset,
        hospitals=3,
        local_epochs=1,
        batch_size=100_000,
        lr=lr,
        server_lr=lr,
        dp=False,
    )
    base = RunConfig(dataset=dataset)
    from fedpriv.data import split_for
    from fedpriv.server.run import resolve_model

    data, _ = split_for(base)
    model_name, model_args = resolve_model(base, data)
    weights = initial_weights(model_name, model_args, seed=0)
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})

    def replies(mode: str) -> list[Message]:
        out = []
        for index in range(3):
            hospital = local_data(config, {"partition-id": index})
            record = msg.order_record(
                config, model_name=model_name, model_args=model_args, mode=mode
            )
            record[msg.SERVER_ROUND] = 1
            order = msg.parse_order(record)
            update = train_round(order, hospital, arrays).arrays
            assert update is not None
            out.append(
                _reply(
                    {k: v.numpy() for k, v in update.items()},
                    int(hospital.train_labels.size),
                    hospital.name,
                )
            )
        return out

    fedavg = FedAvg(aggregator=PlainServer(limits=Limits()))
    fedsgd = FedSGD(aggregator=PlainServer(limits=Limits(), server_lr=lr), server_lr=lr)
    fedavg._current = arrays
    avg_arrays, _ = fedavg.aggregate_train(1, replies(msg.MODE_WEIGHTS))
    fedsgd._current = arrays  # what configure_train records before the round
    sgd_arrays, _ = fedsgd.aggregate_train(1, replies(msg.MODE_GRADIENT))
    assert avg_arrays is not None and sgd_arrays is not None
    moved = 0.0
    for key in weights:
        np.testing.assert_allclose(sgd_arrays[key].numpy(), avg_arrays[key].numpy(), atol=2e-6)
        moved += float(np.abs(avg_arrays[key].numpy() - weights[key]).sum())
    assert moved > 1e-3, "the step must actually move the model"


def test_stock_and_unknown_strategies() -> None:
    config = RunConfig()
    for name in ("fedprox", "fedadam", "fedyogi", "fedavgm", "fedavg", "fedsgd"):
        assert (
            create_strategy(name, config=config, aggregator=PlainServer(limits=Limits()))
            is not None
        )
    with pytest.raises(ConfigError, match="unknown strategy 'fedfoo'"):
        create_strategy("fedfoo", config=config, aggregator=PlainServer(limits=Limits()))
