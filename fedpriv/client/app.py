"""The hospital's Flower ClientApp (``clientapp`` in pyproject.toml)."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv import messages as msg
from fedpriv.client.hospital import (
    HospitalData,
    audit_counts,
    evaluate_round,
    he_context,
    local_data,
    privacy_state,
    train_round,
)

__all__ = ["app"]

app = ClientApp()

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


@app.train()
def handle_train(message: Message, context: Context) -> Message:
    order = msg.parse_order(message.content.config_records[msg.CONFIG])
    data = local_data(order.config, context.node_config)
    saved = context.state.config_records.get(STATE_DP)
    accountant_state = json.loads(str(saved[STATE_ACCOUNTANT])) if saved else None
    result = train_round(
        order,
        data,
        message.content.array_records[msg.ARRAYS],
        privacy=privacy_state(order.config, context.node_config, data.name)
        if order.config.sample_level_dp
        else None,
        accountant_state=accountant_state,
        context=he_context(order.config, context.node_config),
    )
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
    metrics = MetricRecord(
        {"train-loss": result.stats.loss, msg.NUM_EXAMPLES: int(data.train_labels.size)}
    )
    if result.privacy is not None:
        metrics["epsilon"] = float(result.privacy["epsilon"])
    for name, seconds in result.he_seconds.items():
        metrics[f"he-{name}-seconds"] = float(seconds)
    content[msg.ARRAYS] = result.arrays
    content[msg.METRICS] = metrics
    content[msg.HOSPITAL] = _hospital_record(data)
    return Message(content=content, reply_to=message)


@app.evaluate()
def handle_evaluate(message: Message, context: Context) -> Message:
    order = msg.parse_order(message.content.config_records[msg.CONFIG])
    data = local_data(order.config, context.node_config)
    stats = evaluate_round(
        order,
        data,
        message.content.array_records[msg.ARRAYS],
        context=he_context(order.config, context.node_config),
    )
    metrics = MetricRecord(
        {
            "eval-loss": stats.loss,
            "eval-accuracy": stats.accuracy,
            msg.NUM_EXAMPLES: stats.num_examples,
        }
    )
    content = RecordDict({msg.METRICS: metrics, msg.HOSPITAL: _hospital_record(data)})
    return Message(content=content, reply_to=message)


@app.query()
def handle_audit(message: Message, context: Context) -> Message:
    """The federated membership-inference audit: aggregate counts only."""
    import numpy as np

    record = message.content.config_records[msg.CONFIG]
    order = msg.parse_order(record)
    thresholds = np.asarray(record[msg.AUDIT_THRESHOLDS], dtype=np.float64)
    data = local_data(order.config, context.node_config)
    counts = audit_counts(
        order,
        data,
        message.content.array_records[msg.ARRAYS],
        thresholds,
        context=he_context(order.config, context.node_config),
    )
    content = RecordDict({msg.METRICS: MetricRecord(counts), msg.HOSPITAL: _hospital_record(data)})
    return Message(content=content, reply_to=message)
