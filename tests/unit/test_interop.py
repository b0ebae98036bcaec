"""Interop with Flower's own apps, piece by piece (the real simulations are in
tests/integration/test_flower_interop.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedpriv import messages as msg
from fedpriv.client.interop import (
    OrderError,
    flower_servers_mod,
    from_fedpriv_server,
    infer_model,
    read_order,
)
from fedpriv.config import RunConfig
from fedpriv.models import build
from fedpriv.server.interop import read_flower_reply

pytestmark = pytest.mark.usefixtures("flower_task")

SIMULATED = {"partition-id": 1, "num-partitions": 3}


def _state(name: str, **args: Any) -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(build(name, **args).state_dict())


def _message(config: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


@pytest.mark.parametrize(
    ("name", "args", "shape"),
    [
        ("mlp", {"in_features": 30, "num_classes": 2}, (30,)),
        ("mlp", {"in_features": 30, "num_classes": 3, "hidden": 16}, (30,)),
        ("cnn", {"in_channels": 1, "num_classes": 10, "width": 8}, (1, 8, 8)),
    ],
)
def test_the_model_is_read_from_the_arrays(
    name: str, args: dict[str, Any], shape: tuple[int, ...]
) -> None:
    assert infer_model(_state(name, **args), shape) == (name, args)


def test_arrays_of_no_registered_model_match_nothing() -> None:
    assert infer_model(ArrayRecord({"w": Array(np.zeros((3, 3)))}), (30,)) is None
    # a CNN's arrays do not fit tabular inputs
    assert infer_model(_state("cnn", in_channels=1, num_classes=10), (30,)) is None


def test_a_stock_order_without_hospitals_is_refused_naming_the_key() -> None:
    with pytest.raises(OrderError, match=r"no 'hospitals'.*hospitals=3"):
        read_order(_message({"dp": False}, _state("mlp", in_features=30, num_classes=2)), SIMULATED)
    with pytest.raises(OrderError, match="hospitals=5 but Flower simulates 3"):
        read_order(_message({"hospitals": 5}), SIMULATED)
    with pytest.raises(OrderError, match="names 'model-name' but not 'model-args'"):
        read_order(_message({"hospitals": 3, "model-name": "mlp"}), SIMULATED)


def test_a_stock_order_is_completed_from_the_arrays() -> None:
    order = read_order(
        _message(
            {"hospitals": 3, "dp": False, "server-round": 2, "proximal-mu": 0.1},
            _state("mlp", in_features=30, num_classes=2),
        ),
        SIMULATED,
    )
    assert (order.model_name, order.model_args) == ("mlp", {"in_features": 30, "num_classes": 2})
    assert order.server_round == 2 and order.config.hospitals == 3 and not order.config.dp


def test_an_activation_in_the_stock_config_completes_the_model_read_from_the_arrays() -> None:
    """An activation has no parameters, so the arrays cannot tell it: the server's config
    can (model-activation); without it the model is the architecture's own (ReLU)."""
    config = {"hospitals": 3, "dp": False, "model-activation": "elu"}
    order = read_order(_message(config, _state("mlp", in_features=30, num_classes=2)), SIMULATED)
    assert order.model_args == {"in_features": 30, "num_classes": 2, "activation": "elu"}


def test_fedprivs_own_order_is_marked_and_read_as_before() -> None:
    record = msg.order_record(RunConfig(hospitals=3), model_name="mlp", model_args={"x": 1})
    message = _message(record)
    assert from_fedpriv_server(message)
    assert not from_fedpriv_server(_message({"hospitals": 3}))
    order = read_order(message, SIMULATED)
    assert order.model_args == {"x": 1} and msg.FEDPRIV_SERVER not in order.extra
    # the same partition check: 5 hospitals' split on 3 simulated SuperNodes is refused
    five = msg.order_record(RunConfig(hospitals=5), model_name="mlp", model_args={})
    with pytest.raises(OrderError, match="hospitals=5 but Flower simulates 3"):
        read_order(_message(five), SIMULATED)


def _declining(message: Message, context: Context) -> Message:
    record = ConfigRecord(
        {msg.HOSPITAL_NAME: "hospital-1", msg.STATUS: msg.STATUS_DECLINED, msg.REASON: "cap"}
    )
    return Message(content=RecordDict({msg.HOSPITAL: record}), reply_to=message)


def _refusing(message: Message, context: Context) -> Message:
    raise OrderError("the server's config has no 'hospitals'")


def test_declines_and_refusals_are_error_replies_to_a_stock_server() -> None:
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    stock = _message({"hospitals": 3})
    declined = flower_servers_mod(stock, context, _declining)
    assert declined.has_error() and declined.error.code == msg.ERROR_DECLINED
    assert declined.error.reason == "fedpriv: hospital-1 declined: cap"
    refused = flower_servers_mod(stock, context, _refusing)
    assert refused.has_error() and refused.error.code == msg.ERROR_ORDER
    assert "'hospitals'" in refused.error.reason
    # fedpriv's own server reads the decline record (with the privacy report)
    ours = _message(msg.order_record(RunConfig(), model_name="mlp", model_args={}))
    assert not flower_servers_mod(ours, context, _declining).has_error()


def _reply(message_type: str, content: RecordDict, node: int = 42) -> Message:
    sent = Message(content=RecordDict(), message_type=message_type, dst_node_id=node)
    return Message(content=content, reply_to=sent)


def test_a_quickstart_reply_is_read_with_fedprivs_names() -> None:
    evaluated = read_flower_reply(
        _reply(
            MessageType.EVALUATE,
            RecordDict(
                {"results": MetricRecord({"eval_acc": 0.75, "eval_loss": 0.5, "num_examples": 8})}
            ),
        )
    )
    metrics = evaluated.content.metric_records[msg.METRICS]
    assert dict(metrics) == {"eval-accuracy": 0.75, "eval-loss": 0.5, "num-examples": 8}
    assert evaluated.content[msg.HOSPITAL][msg.HOSPITAL_NAME] == "node-42"
    trained = read_flower_reply(
        _reply(
            MessageType.TRAIN,
            RecordDict(
                {
                    "model": ArrayRecord({"w": Array(np.ones(2))}),
                    "metrics": MetricRecord({"loss": 0.3, "accuracy": 0.9, "num-examples": 8}),
                }
            ),
            node=43,
        )
    )
    assert msg.ARRAYS in trained.content.array_records
    assert dict(trained.content[msg.METRICS]) == {
        "train-loss": 0.3,
        "train-accuracy": 0.9,
        "num-examples": 8,
    }
    assert trained.content[msg.HOSPITAL][msg.HOSPITAL_NAME] == "node-43"


def test_a_metric_sent_under_both_names_keeps_the_canonical_one() -> None:
    reply = read_flower_reply(
        _reply(
            MessageType.EVALUATE,
            RecordDict({"metrics": MetricRecord({"accuracy": 0.1, "eval-accuracy": 0.9})}),
        )
    )
    assert dict(reply.content[msg.METRICS]) == {"accuracy": 0.1, "eval-accuracy": 0.9}


def test_fedprivs_own_reply_passes_unchanged() -> None:
    record = ConfigRecord({msg.HOSPITAL_NAME: "hospital-0"})
    content = RecordDict({msg.HOSPITAL: record, msg.METRICS: MetricRecord({"loss": 1.0})})
    reply = read_flower_reply(_reply(MessageType.EVALUATE, content))
    assert dict(reply.content[msg.METRICS]) == {"loss": 1.0}
