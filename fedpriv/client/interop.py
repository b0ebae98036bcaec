"""fedpriv's hospitals under Flower's own ServerApps (``flwr.serverapp.strategy.FedAvg``,
``FedAdam``, ... driving ``fedpriv.client.app``).

fedpriv's server sends the whole run configuration, the model's name and arguments, and a
marker (:data:`fedpriv.messages.FEDPRIV_SERVER`). A stock ServerApp sends only what its
author put in the train and evaluate config. Here that order is completed or refused:

- the model comes from the message: the ArrayRecord's names and shapes are matched against
  fedpriv's registered models built for this hospital's data (or the config names it with
  ``model-name`` and ``model-args``);
- a simulated hospital needs ``hospitals``, the number of partitions its dataset is split
  into, equal to Flower's ``num-partitions``: a default would train on the wrong split;
- what cannot be completed is an Error reply that names the missing keys, and a decline
  (budget, site policy) is an Error reply too: stock strategies drop error replies and
  average the rest, where a reply without arrays would make them give up the round.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError

__all__ = [
    "OrderError",
    "flower_servers_mod",
    "from_fedpriv_server",
    "infer_model",
    "read_order",
]

#: node_config keys Flower's simulation engine sets for each virtual SuperNode
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: run-config keys a stock ServerApp must send a simulated hospital
HOSPITALS = "hospitals"


class OrderError(ConfigError):
    """The server's order cannot be carried out as sent; the reply says what to send."""


def from_fedpriv_server(message: Message) -> bool:
    record = message.content.config_records.get(msg.CONFIG)
    return record is not None and bool(record.get(msg.FEDPRIV_SERVER, False))


def read_order(message: Message, node_config: Mapping[str, Any]) -> msg.TrainingOrder:
    """The order in ``message``, completed for a stock server (see the module's text)."""
    record = message.content.config_records.get(msg.CONFIG)
    if record is None:
        raise OrderError(
            f"fedpriv's ClientApp found no ConfigRecord '{msg.CONFIG}' in the message (records: "
            f"{sorted(message.content.keys())}): send the run's settings there (a stock "
            "strategy's configrecord_key must be 'config')"
        )
    values = dict(record)
    _check_partitions(values, node_config)
    if from_fedpriv_server(message):
        return msg.parse_order(record)
    missing = [k for k in (msg.MODEL_NAME, msg.MODEL_ARGS) if k not in values]
    if len(missing) == 1:
        (given,) = {msg.MODEL_NAME, msg.MODEL_ARGS} - set(missing)
        raise OrderError(
            f"the server's config names '{given}' but not '{missing[0]}': send both, or "
            "neither (the model is then read from the arrays)"
        )
    if missing:
        values[msg.MODEL_NAME], args = _model_from_arrays(message, values, node_config)
        values[msg.MODEL_ARGS] = json.dumps(args, sort_keys=True)
    return msg.parse_order(values)


def _check_partitions(values: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """A simulated hospital's partition must come from the split the run means."""
    if PARTITION_ID not in node_config:
        return  # a real site trains on its own file, whatever the count
    partitions = node_config.get(NUM_PARTITIONS)
    if HOSPITALS not in values:
        hint = f" (here: {HOSPITALS}={partitions}, Flower's num-partitions)" if partitions else ""
        raise OrderError(
            f"the server's config has no '{HOSPITALS}': a simulated hospital needs the number "
            f"of partitions its dataset is split into{hint}; add it to the train and evaluate "
            "config (fedpriv's default would split differently)"
        )
    if partitions is not None and int(values[HOSPITALS]) != int(partitions):
        raise OrderError(
            f"the server's config says {HOSPITALS}={values[HOSPITALS]} but Flower simulates "
            f"{partitions} SuperNodes (num-partitions): set {HOSPITALS}={partitions}"
        )


def _model_from_arrays(
    message: Message, values: Mapping[str, Any], node_config: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    from fedpriv.client.hospital import local_data

    arrays = message.content.array_records.get(msg.ARRAYS)
    if arrays is None or not len(arrays):
        raise OrderError(
            f"the server's config has no '{msg.MODEL_NAME}'/'{msg.MODEL_ARGS}' and the message "
            f"carries no ArrayRecord '{msg.ARRAYS}' to read the model from: send either"
        )
    known = {k.replace("_", "-") for k in RunConfig.__dataclass_fields__}
    config = RunConfig.from_mapping({k: v for k, v in values.items() if k in known})
    data = local_data(config, node_config)
    shape = tuple(int(d) for d in data.train_features.shape[1:])
    found = infer_model(arrays, shape)
    if found is None:
        names = ", ".join(f"{k} {tuple(a.shape)}" for k, a in list(arrays.items())[:6])
        raise OrderError(
            f"the arrays ({names}{', ...' if len(arrays) > 6 else ''}) match none of fedpriv's "
            f"models for this hospital's data (input shape {shape}): set '{msg.MODEL_NAME}' "
            f"and '{msg.MODEL_ARGS}' (JSON) in the config, e.g. model-name='mlp' "
            f'model-args=\'{{"in_features": {_product(shape)}, "num_classes": 2}}\', and send '
            "that model's state_dict"
        )
    name, args = found
    if config.model_activation:  # not in the arrays (no parameters): only the config says it
        args = {**args, "activation": config.model_activation}
    return name, args


def infer_model(
    arrays: ArrayRecord, input_shape: tuple[int, ...]
) -> tuple[str, dict[str, Any]] | None:
    """The registered model (and arguments) whose state_dict has exactly these names and
    shapes for inputs of ``input_shape``; None if none does. The class count and the width
    are searched among the arrays' own dimensions."""
    from fedpriv.models import available_models

    wanted = {k: tuple(int(d) for d in a.shape) for k, a in arrays.items()}
    dims = sorted({d for shape in wanted.values() for d in shape})
    for name in available_models():
        first = _built(name, input_shape, dims[0] if dims else 2, 0)
        if first is None or set(first[1]) != set(wanted):
            continue  # other layer names: no argument of this model will match
        for classes, width in itertools.product(dims, (0, *dims)):
            built = _built(name, input_shape, classes, width)
            if built is not None and built[1] == wanted:
                return name, built[0]
    return None


def _built(
    name: str, input_shape: tuple[int, ...], classes: int, width: int
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]] | None:
    """A model's arguments and its state_dict's shapes, or None if it cannot be built so."""
    from fedpriv.models import build, default_model

    try:
        _, args = default_model(
            kind="image" if len(input_shape) == 3 else "table",
            input_shape=input_shape,
            num_classes=classes,
            name=name,
            width=width,
        )
        model = build(name, **args)
    except (ConfigError, TypeError, ValueError, RuntimeError):
        return None
    return args, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def flower_servers_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: orders that cannot be carried out, and declines to a stock server,
    become Error replies (a clean reason, no traceback)."""
    try:
        reply = call_next(message, context)
    except OrderError as exc:
        return Message(Error(code=msg.ERROR_ORDER, reason=f"fedpriv: {exc}"), reply_to=message)
    if reply.has_error() or from_fedpriv_server(message):
        return reply
    hospital = reply.content.config_records.get(msg.HOSPITAL, ConfigRecord())
    if hospital.get(msg.STATUS) == msg.STATUS_DECLINED:
        who = str(hospital.get(msg.HOSPITAL_NAME, "the hospital"))
        reason = str(hospital.get(msg.REASON, "")) or f"{who} declined"
        return Message(
            Error(code=msg.ERROR_DECLINED, reason=f"fedpriv: {who} declined: {reason}"),
            reply_to=message,
        )
    return reply


def _product(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
