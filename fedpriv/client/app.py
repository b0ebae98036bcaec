"""The hospital's Flower ClientApp (``clientapp`` in pyproject.toml)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpriv import messages as msg
from fedpriv.client.hospital import HospitalData, evaluate_round, local_data, train_round

__all__ = ["app"]

app = ClientApp()


def _hospital_record(data: HospitalData, status: str = msg.STATUS_OK) -> ConfigRecord:
    return ConfigRecord(
        {msg.HOSPITAL_NAME: data.name, msg.HOSPITAL_INDEX: data.index, msg.STATUS: status}
    )


@app.train()
def handle_train(message: Message, context: Context) -> Message:
    order = msg.parse_order(message.content.config_records[msg.CONFIG])
    data = local_data(order.config, context.node_config)
    arrays, stats = train_round(order, data, message.content.array_records[msg.ARRAYS])
    metrics = MetricRecord({"train-loss": stats.loss, msg.NUM_EXAMPLES: data.train_labels.size})
    content = RecordDict(
        {msg.ARRAYS: arrays, msg.METRICS: metrics, msg.HOSPITAL: _hospital_record(data)}
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def handle_evaluate(message: Message, context: Context) -> Message:
    order = msg.parse_order(message.content.config_records[msg.CONFIG])
    data = local_data(order.config, context.node_config)
    stats = evaluate_round(order, data, message.content.array_records[msg.ARRAYS])
    metrics = MetricRecord(
        {
            "eval-loss": stats.loss,
            "eval-accuracy": stats.accuracy,
            msg.NUM_EXAMPLES: stats.num_examples,
        }
    )
    content = RecordDict({msg.METRICS: metrics, msg.HOSPITAL: _hospital_record(data)})
    return Message(content=content, reply_to=message)
