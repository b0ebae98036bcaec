"""The fedpriv message protocol: every key that travels between server and hospitals, named once.

Server -> hospital (train / evaluate): an ArrayRecord under :data:`ARRAYS` (the global model)
and a ConfigRecord under :data:`CONFIG` holding the run configuration (kebab-case keys) plus
the protocol keys below.

Hospital -> server: an ArrayRecord under :data:`ARRAYS` (train only), one MetricRecord under
:data:`METRICS` with :data:`NUM_EXAMPLES`, and a ConfigRecord under :data:`HOSPITAL` that says
who answered and whether it took part.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError

__all__ = [
    "ARRAYS",
    "CONFIG",
    "EARLY_QUERY",
    "EVALUATE_RECEIVED",
    "EVALUATION",
    "HOSPITAL",
    "METRICS",
    "MODE_GRADIENT",
    "MODE_WEIGHTS",
    "NUM_EXAMPLES",
    "STATUS_DECLINED",
    "STATUS_OK",
    "TrainingOrder",
    "parse_order",
]

# record names inside a message's RecordDict
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
HOSPITAL = "hospital"
PRIVACY = "privacy"  # ConfigRecord: the hospital's privacy spend, as JSON under PRIVACY_JSON
PROTOCOL = "protocol"  # ConfigRecord: an aggregation protocol's own content (setup, unmasking)
STATISTICS = "statistics"  # ConfigRecord of a feature-statistics reply (fedpriv.client.statistics)
PRIVACY_JSON = "json"
#: MetricRecord in a training reply: the hospital's evaluation of the model it received
#: (the previous round's aggregate), so a round needs one exchange, not two
EVALUATION = "evaluation"

# MetricRecord key the strategies weight by (Flower's own convention)
NUM_EXAMPLES = "num-examples"

# protocol keys inside the CONFIG record, beside the run configuration
SERVER_ROUND = "server-round"
#: in a training order: evaluate the received model first and reply it under EVALUATION
EVALUATE_RECEIVED = "evaluate-received"
#: in a schema query's PROTOCOL record: the protocol setup query riding on it (its kind)
EARLY_QUERY = "early-query"
MODEL_NAME = "model-name"
MODEL_ARGS = "model-args"
MODE = "update-mode"
MODE_WEIGHTS = "weights"
MODE_GRADIENT = "gradient"
#: set by fedpriv's server: it reads a hospital's decline from its HOSPITAL record; without
#: it (Flower's own ServerApps) a decline is an Error reply, which stock strategies drop
FEDPRIV_SERVER = "fedpriv-server"
AUDIT_THRESHOLDS = "audit-loss-thresholds"
QUERY = "query"  # which query a QUERY message is
QUERY_SCHEMA = "schema"
QUERY_AUDIT = "audit"
#: normalisation federated: each hospital's DP release of feature counts, sums and squares
QUERY_STATISTICS = "feature-statistics"
SCHEMA = "schema"  # ConfigRecord of a schema reply
SCHEMA_SHAPE = "input-shape"
SCHEMA_CLASSES = "num-classes"
SCHEMA_EXAMPLES = "num-examples"  # the training examples a site declares before round 1
SCHEMA_PATIENTS = "num-patients"  # the patients they belong to (absent: one record each)
SCHEMA_LEDGER_DELTA = "ledger-delta"  # the delta a site's ledger composes at (its policy)
SCHEMA_LEDGER_CAP = "ledger-budget-epsilon"
PROTOCOL_KEYS = frozenset(
    {SERVER_ROUND, MODEL_NAME, MODEL_ARGS, MODE, AUDIT_THRESHOLDS, QUERY, FEDPRIV_SERVER}
)

# Error codes of a hospital's Error reply (Flower's own codes are small integers)
ERROR_DECLINED = 7101  # it declined the round (budget, site policy): drop it, as a failure
ERROR_ORDER = 7102  # the server's config record is incomplete or contradicts the node

# MetricRecord keys of a hospital's federated-audit reply (counts only, never scores)
AUDIT_MEMBERS_LE = "members-at-or-below"
AUDIT_NON_MEMBERS_LE = "non-members-at-or-below"
AUDIT_MEMBERS = "members"
AUDIT_NON_MEMBERS = "non-members"

# keys inside the HOSPITAL record of a reply
HOSPITAL_NAME = "name"
HOSPITAL_INDEX = "index"
STATUS = "status"
STATUS_OK = "ok"
STATUS_DECLINED = "declined"
REASON = "reason"


@dataclasses.dataclass(frozen=True)
class TrainingOrder:
    """What the server asks of a hospital this round, parsed once from the CONFIG record."""

    config: RunConfig
    server_round: int
    model_name: str
    model_args: dict[str, Any]
    mode: str
    #: protocol content (keys the run configuration does not have), e.g. secure
    #: aggregation's participants
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the receiving hospital's Flower node id (set by the ClientApp, not the server)
    node: int = 0


def order_record(
    config: RunConfig, *, model_name: str, model_args: Mapping[str, Any], mode: str = MODE_WEIGHTS
) -> dict[str, Any]:
    """The CONFIG record's content for a run (the strategy adds ``server-round``)."""
    record: dict[str, Any] = dict(config.to_mapping())
    record[MODEL_NAME] = model_name
    record[MODEL_ARGS] = json.dumps(dict(model_args), sort_keys=True)
    record[MODE] = mode
    record[FEDPRIV_SERVER] = True
    return record


def parse_order(record: Mapping[str, Any]) -> TrainingOrder:
    """Validate what arrived; a malformed order is a :class:`ConfigError`, not a crash."""
    values = dict(record)
    try:
        model_name = str(values.pop(MODEL_NAME))
        model_args = json.loads(str(values.pop(MODEL_ARGS)))
        server_round = int(values.pop(SERVER_ROUND, 0))
        mode = str(values.pop(MODE, MODE_WEIGHTS))
        values.pop(AUDIT_THRESHOLDS, None)
        values.pop(QUERY, None)
        values.pop(FEDPRIV_SERVER, None)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"malformed training order from the server: {exc}") from None
    if mode not in (MODE_WEIGHTS, MODE_GRADIENT):
        raise ConfigError(f"unknown update mode '{mode}' in the server's order")
    # Flower's stock strategies add keys of their own (e.g. FedProx's 'proximal-mu'), and
    # protocols theirs
    known = {k.replace("_", "-") for k in RunConfig.__dataclass_fields__}
    config = RunConfig.from_mapping({k: v for k, v in values.items() if k in known})
    return TrainingOrder(
        config=config,
        server_round=server_round,
        model_name=model_name,
        model_args=dict(model_args),
        mode=mode,
        extra={k: v for k, v in values.items() if k not in known},
    )
