"""The server's side of the federated membership-inference audit (deployments).

After the last round every hospital scores its own members and non-members with the final
model and returns counts at fixed loss thresholds; this adds them up. See
:mod:`fedpriv.privacy.audit.federated` for what the counts mean.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpriv import messages as msg
from fedpriv.privacy.audit.federated import LOSS_THRESHOLDS, combine_counts
from fedpriv.server.exchange import send_and_receive
from fedpriv.strategies.fedavg import hospital_name

__all__ = ["federated_audit"]

logger = logging.getLogger(__name__)


def federated_audit(
    grid: Grid, arrays: ArrayRecord, order: ConfigRecord, *, timeout: float
) -> dict[str, Any]:
    config = ConfigRecord(dict(order))
    config[msg.AUDIT_THRESHOLDS] = [float(t) for t in LOSS_THRESHOLDS]
    content = RecordDict({msg.ARRAYS: arrays, msg.CONFIG: config})
    messages = [
        Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
        for node in sorted(grid.get_node_ids())
    ]
    replies = list(send_and_receive(grid, messages, timeout=timeout))
    per_hospital: dict[str, Any] = {}
    members_le = np.zeros(LOSS_THRESHOLDS.size, dtype=np.int64)
    non_members_le = np.zeros(LOSS_THRESHOLDS.size, dtype=np.int64)
    members = non_members = 0
    failed: dict[str, str] = {}
    for reply in replies:
        if reply.has_error():
            failed[f"node {reply.metadata.src_node_id}"] = str(reply.error.reason)[-300:]
            continue
        record = reply.content.metric_records[msg.METRICS]
        m_le = np.asarray(record[msg.AUDIT_MEMBERS_LE], dtype=np.int64)
        n_le = np.asarray(record[msg.AUDIT_NON_MEMBERS_LE], dtype=np.int64)
        m, n = int(record[msg.AUDIT_MEMBERS]), int(record[msg.AUDIT_NON_MEMBERS])  # type: ignore[arg-type]
        if m_le.size != LOSS_THRESHOLDS.size or n_le.size != LOSS_THRESHOLDS.size:
            failed[hospital_name(reply.content)] = "counts for a different threshold grid"
            continue
        name = hospital_name(reply.content)
        per_hospital[name] = combine_counts(m_le, n_le, m, n)
        per_hospital[name].pop("roc", None)
        members_le += m_le
        non_members_le += n_le
        members += m
        non_members += n
    for who, reason in failed.items():
        logger.warning("federated audit: %s gave no counts: %s", who, reason)
    result = combine_counts(members_le, non_members_le, members, non_members)
    result["per_hospital"] = per_hospital
    result["failed"] = failed
    result["attack"] = "loss"
    result["method"] = (
        "each hospital counted its members and non-members at or below fixed loss thresholds; "
        "only the counts left the hospitals"
    )
    return result
