"""What a hospital does with each message: the ClientApp that runs them in this process.

``fedpriv.client.app`` (the ``clientapp`` in pyproject.toml) runs this app in-process for
simulated hospitals, and for real sites in the site's warm worker (fedpriv.client.warm).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv import messages as msg
from fedpriv.client.carried import evaluation_metrics, wants_evaluation
from fedpriv.client.hospital import (
    HospitalData,
    audit_counts,
    evaluate_round,
    ledger_settings,
    local_data,
    privacy_state,
    protocol_side,
    site_settings,
    train_round,
)
from fedpriv.client.interop import flower_servers_mod, read_order
from fedpriv.errors import FedprivError
from fedpriv.privacy.identity import count_patients
from fedpriv.protocols.base import UNUSABLE, AggregateUnusable
from fedpriv.protocols.secagg import QUERIES as SECAGG_QUERIES
from fedpriv.protocols.secagg import UNMASK

__all__ = ["local_app"]

# the mod turns refused orders (and, to Flower's own ServerApps, declines) into Error replies
local_app = ClientApp(mods=[flower_servers_mod])

# context.state: the run's accountant survives across rounds here (the ledger across runs)
STATE_DP = "fedpriv-dp"
STATE_ACCOUNTANT = "accountant"


def _hospital_record(
    data: HospitalData, status: str = msg.STATUS_OK, reason: str = ""
) -> ConfigRecord:
    record = ConfigRecord(
        {msg.HOSPITAL_NAME: data.name, msg.HOSPITAL_INDEX: data.index, msg.STATUS: status}
    )
    if reason:
        record[msg.REASON] = reason
    return record


def _order(message: Message, context: Context) -> msg.TrainingOrder:
    """The server's order, with this site's own choices applied (its device)."""
    order = read_order(message, context.node_config)  # completed for a stock ServerApp
    order = dataclasses.replace(order, node=int(context.node_id))
    site = site_settings(context.node_config)
    if site is not None and site.device != order.config.device:
        order = dataclasses.replace(order, config=order.config.replace(device=site.device))
    return order


@local_app.train()
def train_and_evaluate(message: Message, context: Context) -> Message:
    """Training, and (when the order asks) first an evaluation of the received model,
    carried on the same reply (fedpriv.client.carried)."""
    order = _order(message, context)
    evaluation = None
    if wants_evaluation(order):
        data = local_data(order.config, context.node_config)
        try:
            evaluation = evaluation_metrics(
                order,
                data,
                message.content.array_records[msg.ARRAYS],
                side=protocol_side(order.config, context.node_config),
            )
        except AggregateUnusable as exc:  # CKKS: the server learns it, nothing is trained
            return _unusable_reply(message, data, exc)
    reply = handle_train(message, context)
    if evaluation is not None and not reply.has_error():
        reply.content[msg.EVALUATION] = evaluation
    return reply


def handle_train(message: Message, context: Context) -> Message:
    order = _order(message, context)
    data = local_data(order.config, context.node_config)
    site = site_settings(context.node_config)
    if site is not None and site.require_dp and not order.config.sample_level_dp:
        reason = (
            f"{data.name} declines the round: it trains only with sample-level DP "
            "(require-dp = true in its site settings)"
        )
        content = RecordDict({msg.HOSPITAL: _hospital_record(data, msg.STATUS_DECLINED, reason)})
        return Message(content=content, reply_to=message)
    saved = context.state.config_records.get(STATE_DP)
    accountant_state = json.loads(str(saved[STATE_ACCOUNTANT])) if saved else None
    try:
        result = train_round(
            order,
            data,
            message.content.array_records[msg.ARRAYS],
            privacy=privacy_state(order.config, context.node_config, data.name)
            if order.config.sample_level_dp
            else None,
            accountant_state=accountant_state,
            side=protocol_side(order.config, context.node_config),
            state=context.state,
        )
    except AggregateUnusable as exc:  # read before any budget is reserved: nothing spent
        return _unusable_reply(message, data, exc)
    if result.accountant_state is not None:
        context.state[STATE_DP] = ConfigRecord(
            {STATE_ACCOUNTANT: json.dumps(result.accountant_state)}
        )
    content = RecordDict()
    if result.privacy is not None:
        content[msg.PRIVACY] = ConfigRecord({msg.PRIVACY_JSON: json.dumps(result.privacy)})
    if result.declined:
        content[msg.HOSPITAL] = _hospital_record(data, msg.STATUS_DECLINED, result.declined)
        return Message(content=content, reply_to=message)
    assert result.arrays is not None and result.stats is not None
    metrics = MetricRecord({"train-loss": result.stats.loss, msg.NUM_EXAMPLES: result.num_examples})
    if result.privacy is not None:
        metrics["epsilon"] = float(result.privacy["epsilon"])
    for name, value in result.figures.items():
        metrics[name] = float(value)
    content[msg.ARRAYS] = result.arrays
    content[msg.METRICS] = metrics
    content[msg.HOSPITAL] = _hospital_record(data)
    return Message(content=content, reply_to=message)


@local_app.evaluate()
def handle_evaluate(message: Message, context: Context) -> Message:
    order = _order(message, context)
    data = local_data(order.config, context.node_config)
    side = protocol_side(order.config, context.node_config)
    try:
        stats, figures = evaluate_round(
            order, data, message.content.array_records[msg.ARRAYS], side=side
        )
    except AggregateUnusable as exc:
        return _unusable_reply(message, data, exc)
    metrics = MetricRecord(
        {
            "eval-loss": stats.loss,
            "eval-accuracy": stats.accuracy,
            msg.NUM_EXAMPLES: stats.num_examples,
        }
    )
    for name, value in figures.items():
        metrics[name] = float(value)
    content = RecordDict({msg.METRICS: metrics, msg.HOSPITAL: _hospital_record(data)})
    unmask = order.extra.get(UNMASK)
    if unmask is not None:  # the round's aggregate needs this hospital's part to finish
        try:
            part = side.unmask(json.loads(str(unmask)), order.node, context.state)
            content[msg.PROTOCOL] = ConfigRecord(part)
        except FedprivError as exc:
            content.config_records[msg.HOSPITAL][msg.REASON] = str(exc)
    return Message(content=content, reply_to=message)


def _unusable_reply(message: Message, data: HospitalData, exc: AggregateUnusable) -> Message:
    """Tell the server this hospital cannot use the aggregate it received (it discards the
    aggregate if most hospitals say so); a training order is then declined, untrained."""
    record = _hospital_record(data, msg.STATUS_DECLINED, f"the new aggregate is unusable: {exc}")
    return Message(
        content=RecordDict(
            {msg.HOSPITAL: record, msg.PROTOCOL: ConfigRecord({UNUSABLE: str(exc)})}
        ),
        reply_to=message,
    )


@local_app.query()
def handle_query(message: Message, context: Context) -> Message:
    """Queries: the data schema (deployments, before round 1) and the federated
    membership-inference audit (aggregate counts only)."""
    record = message.content.config_records[msg.CONFIG]
    if record.get(msg.QUERY) == msg.QUERY_SCHEMA:
        return _schema_reply(message, context)
    if record.get(msg.QUERY) == msg.QUERY_STATISTICS:  # normalisation federated
        from fedpriv.client.statistics import statistics_reply

        return statistics_reply(message, context)
    order = _order(message, context)
    if record.get(msg.QUERY) in SECAGG_QUERIES:  # a protocol's setup step
        data = local_data(order.config, context.node_config)
        answer = protocol_side(order.config, context.node_config).answer(
            order,
            str(record[msg.QUERY]),
            dict(message.content.config_records[msg.PROTOCOL]),
            order.node,
            context.state,
        )
        content = RecordDict(
            {msg.PROTOCOL: ConfigRecord(answer), msg.HOSPITAL: _hospital_record(data)}
        )
        return Message(content=content, reply_to=message)
    thresholds = np.asarray(record[msg.AUDIT_THRESHOLDS], dtype=np.float64)
    data = local_data(order.config, context.node_config)
    counts = audit_counts(
        order,
        data,
        message.content.array_records[msg.ARRAYS],
        thresholds,
        side=protocol_side(order.config, context.node_config),
    )
    content = RecordDict({msg.METRICS: MetricRecord(counts), msg.HOSPITAL: _hospital_record(data)})
    return Message(content=content, reply_to=message)


def _schema_reply(message: Message, context: Context) -> Message:
    """What the model must fit (feature shape, classes): no record, no statistic of one."""
    from fedpriv.config import RunConfig

    record = message.content.config_records[msg.CONFIG]
    known = {k.replace("_", "-") for k in RunConfig.__dataclass_fields__}
    config = RunConfig.from_mapping({k: v for k, v in record.items() if k in known})
    data = local_data(config, context.node_config)
    labels = np.concatenate([data.train_labels, data.held_out_labels])
    schema = ConfigRecord(
        {
            msg.SCHEMA_SHAPE: [int(d) for d in data.train_features.shape[1:]],
            # the federation's schema fixes the classes; a site may hold only some of them
            msg.SCHEMA_CLASSES: data.num_classes or int(labels.max()) + 1,
            # what it will claim at most: the server refuses larger claims
            msg.SCHEMA_EXAMPLES: int(data.train_labels.size),
        }
    )
    if data.train_records is not None:
        # how many patients those records belong to (distributed noise sizes the shares by
        # both): a count, disclosed like the record count (fedpriv.privacy.distributed_noise)
        schema[msg.SCHEMA_PATIENTS] = count_patients(data.train_records)
    settings = ledger_settings(config, context.node_config, data.name)
    if settings is not None:  # the site's privacy policy, so a run it refuses never starts
        schema[msg.SCHEMA_LEDGER_DELTA] = settings.delta
        schema[msg.SCHEMA_LEDGER_CAP] = settings.budget_epsilon
    content = RecordDict({msg.SCHEMA: schema, msg.HOSPITAL: _hospital_record(data)})
    early = message.content.config_records.get(msg.PROTOCOL)
    if early is not None and msg.EARLY_QUERY in early:  # a protocol's setup query rides on it
        query = dict(early)
        answer = protocol_side(config, context.node_config).answer(
            None, str(query.pop(msg.EARLY_QUERY)), query, int(context.node_id), context.state
        )
        content[msg.PROTOCOL] = ConfigRecord(answer)
    return Message(content=content, reply_to=message)
