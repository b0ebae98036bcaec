"""Replies from Flower's own ClientApps (a quickstart-style app under fedpriv's server),
read the way fedpriv's hospitals' are.

A Flower ClientApp replies with one ArrayRecord and one MetricRecord under keys of its
choosing (usually ``arrays`` and ``metrics``), a weight under ``num-examples``, and metric
names of its own (``eval_acc``, ``accuracy``, ``loss``, ...). It sends no hospital record,
so fedpriv names it after its Flower node: ``node-<id>``, the same every round.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord

from fedpriv import messages as msg

__all__ = ["EVALUATE_ALIASES", "TRAIN_ALIASES", "node_hospital_name", "read_flower_reply"]

#: metric names Flower apps commonly report, and what fedpriv calls them
EVALUATE_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        (
            "accuracy",
            "acc",
            "eval_acc",
            "eval-acc",
            "eval_accuracy",
            "val_accuracy",
            "val_acc",
            "test_acc",
            "test_accuracy",
        ),
        "eval-accuracy",
    ),
    **dict.fromkeys(("loss", "eval_loss", "val_loss", "test_loss"), "eval-loss"),
}
TRAIN_ALIASES: dict[str, str] = {
    **dict.fromkeys(("loss", "train_loss", "training_loss"), "train-loss"),
    **dict.fromkeys(("accuracy", "acc", "train_acc", "train_accuracy"), "train-accuracy"),
}
#: the weight, as some apps spell it
EXAMPLES_ALIASES = ("num_examples",)


def node_hospital_name(node_id: int) -> str:
    """The name of a hospital that did not say its own: its Flower node id, stable for as
    long as its SuperNode runs."""
    return f"node-{node_id}"


def read_flower_reply(reply: Message) -> Message:
    """Put a stock ClientApp's reply into fedpriv's form, in place; fedpriv's own replies
    pass unchanged. Returns ``reply``."""
    if reply.has_error():
        return reply
    content = reply.content
    if msg.HOSPITAL in content.config_records:
        return reply  # one of fedpriv's hospitals
    content[msg.HOSPITAL] = ConfigRecord(
        {msg.HOSPITAL_NAME: node_hospital_name(int(reply.metadata.src_node_id))}
    )
    arrays = content.array_records
    if msg.ARRAYS not in arrays and len(arrays) == 1:
        (key,) = arrays.keys()
        content[msg.ARRAYS] = content.pop(key)
    metrics = content.metric_records
    if msg.METRICS not in metrics and len(metrics) == 1:
        (key,) = metrics.keys()
        content[msg.METRICS] = content.pop(key)
    record = content.metric_records.get(msg.METRICS)
    if record is not None:
        aliases = TRAIN_ALIASES if reply.metadata.message_type == MessageType.TRAIN else {}
        if reply.metadata.message_type == MessageType.EVALUATE:
            aliases = EVALUATE_ALIASES
        content[msg.METRICS] = _renamed(record, aliases)
    return reply


def _renamed(record: MetricRecord, aliases: dict[str, str]) -> MetricRecord:
    """Each aliased metric under fedpriv's name, unless the app also sent that name (then the
    alias keeps its own)."""
    out = MetricRecord()
    sent = set(record.keys())
    for key, value in record.items():
        target = aliases.get(key)
        if key in EXAMPLES_ALIASES:
            target = msg.NUM_EXAMPLES
        if target is not None and target not in sent and target not in out:
            out[target] = value
        else:
            out[key] = value
    return out
