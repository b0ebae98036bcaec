"""The server's side of the feature-statistics release (``normalisation = "federated"``).

Before round 1 (once per run: a resumed run finds the result in its config.json) the server
asks every connected hospital for its noisy counts, sums and squares
(:mod:`fedpriv.client.statistics`), adds them up, turns them into a centre and scale per
numeric feature (:mod:`fedpriv.privacy.statistics`), and puts them in the run configuration
that every training order carries, so every hospital normalises identically. The run
directory keeps them (config.json) and how they were obtained (statistics.json).

A minority of hospitals may lie. A release that is malformed (wrong length, not finite) or
implausible (a count below none, a mean outside the public range or a variance no value
within it can have, each by more than the release's own noise explains:
:meth:`~fedpriv.privacy.statistics.StatisticsMechanism.implausible`) is rejected, logged and
recorded in statistics.json (``rejected``: who, why); the others go on. No accepted release
weighs more than :data:`~fedpriv.privacy.statistics.WEIGHT_CAP` times the median count, so
one liar among ``k`` accepted hospitals takes at most
:func:`~fedpriv.privacy.statistics.influence_bound` ``= cap / (cap + ceil(k/2) - 1)`` of the
weight, and moves any centre away from the honest hospitals' own weighted mean by at most
that fraction of the feature's public range (plus what six standard deviations of one
release's noise move the pooled sums); statistics.json records each hospital's actual share.
All of this is post-processing of releases that were already DP: it costs no privacy, and
what a hospital releases is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.data.schema import Schema, builtin_schema, load_schema
from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import statistics_event, statistics_noise
from fedpriv.privacy.statistics import (
    COUNT_WEIGHT,
    PLAUSIBLE_Z,
    SCALE_FLOOR,
    SQUARE_WEIGHT,
    STATS_EPSILON,
    STATS_NOISE,
    STATS_SUMS,
    WEIGHT_CAP,
    StatisticsMechanism,
    influence_bound,
)
from fedpriv.server.exchange import send_and_receive
from fedpriv.server.prepare import RunPlan, with_feature_statistics
from fedpriv.strategies.fedavg import hospital_name

__all__ = ["STATISTICS_JSON", "gather_statistics", "needs_statistics"]

logger = logging.getLogger(__name__)

STATISTICS_JSON = "statistics.json"


def needs_statistics(config: RunConfig) -> bool:
    return config.normalisation == "federated" and not config.feature_statistics


def run_schema(config: RunConfig) -> Schema:
    """The schema the server combines by: the run's file, or an embedded dataset's own."""
    schema = load_schema(config.schema) if config.schema else builtin_schema(config.dataset)
    if schema is None:
        raise ConfigError(
            "normalisation federated needs the federation's schema: set schema = path to its "
            "schema.toml"
        )
    if config.schema_digest and schema.digest != config.schema_digest:
        raise ConfigError(
            f"the server's schema {schema.digest[:12]} is not the run's {config.schema_digest[:12]}"
        )
    return schema


def _number(value: object) -> float | None:
    """A figure a hospital reported about itself (recorded, never combined); None if not one."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def gather_statistics(grid: Grid, plan: RunPlan) -> RunPlan:
    """Ask every connected hospital for its release; the plan with the combined centre and
    scale per feature (config.json rewritten), or ConfigError when no hospital released."""
    config = plan.config
    mechanism = StatisticsMechanism.for_schema(
        run_schema(config), statistics_noise(config.stats_epsilon, config.delta, config.accountant)
    )
    order = msg.order_record(config, model_name=plan.model_name, model_args=plan.model_args)
    content = RecordDict({msg.CONFIG: ConfigRecord({**order, msg.QUERY: msg.QUERY_STATISTICS})})
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes
    ]
    releases: list[np.ndarray] = []
    released: list[str] = []  # who sent each of releases
    hospitals: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    rejected: dict[str, str] = {}
    for reply in send_and_receive(grid, messages, timeout=config.round_timeout):
        if reply.has_error():
            node = str(reply.metadata.src_node_id)
            failed[node] = str(reply.error.reason).strip().splitlines()[-1][:300]
            continue
        name = hospital_name(reply.content)
        if name in hospitals or name in failed or name in rejected:  # a name is self-declared
            name = f"{name} (node {reply.metadata.src_node_id})"
        status = reply.content.config_records.get(msg.HOSPITAL)
        if status is not None and status.get(msg.STATUS) == msg.STATUS_DECLINED:
            hospitals[name] = {"status": "declined", "reason": str(status.get(msg.REASON, ""))}
            continue
        record = reply.content.config_records.get(msg.STATISTICS)
        if record is None:
            failed[name] = "sent no statistics"
            continue
        try:
            vector = mechanism.check(record.get(STATS_SUMS), who=name)  # type: ignore[arg-type]
        except ConfigError as exc:
            rejected[name] = str(exc)
            continue
        reason = mechanism.implausible(vector)
        if reason:
            rejected[name] = f"{name}'s release is implausible: {reason}"
            continue
        releases.append(vector)
        released.append(name)
        hospitals[name] = {
            "status": "released",
            "noise_multiplier": _number(record.get(STATS_NOISE)),
            "epsilon_after": _number(record.get(STATS_EPSILON)),
        }
    for who, reason in sorted(failed.items()):
        logger.warning("feature statistics: %s failed: %s", who, reason)
    for who, reason in sorted(rejected.items()):
        logger.warning("feature statistics: rejected %s: %s", who, reason)
    for _, entry in sorted(hospitals.items()):
        if entry["status"] == "declined":
            logger.warning("feature statistics: %s", entry["reason"])
    if not releases:
        reasons = [e["reason"] for e in hospitals.values() if "reason" in e]
        reasons += list(failed.values()) + list(rejected.values())
        raise ConfigError(
            "no hospital released its feature statistics: "
            + ("; ".join(reasons) or "none answered")
        )
    combined = mechanism.combine(releases)
    for k, name in enumerate(released):
        hospitals[name]["share"] = combined.shares[k]
        hospitals[name]["capped"] = k in combined.capped
    plan = with_feature_statistics(plan, combined.dumps())
    event = statistics_event(config)
    plan.run_dir.write_json(
        STATISTICS_JSON,
        {
            "normalisation": "federated",
            "hospitals": dict(sorted(hospitals.items())),
            "failed": dict(sorted(failed.items())),
            "rejected": dict(sorted(rejected.items())),
            "released": len(releases),
            "noisy_patients": combined.patients,
            "floored": list(combined.floored),
            "features": {n: {"centre": c, "scale": s} for n, (c, s) in combined.reference.items()},
            "combination": {
                "weight_cap": WEIGHT_CAP,
                "plausible_z": PLAUSIBLE_Z,
                "largest_share": max(combined.shares),
                "influence_bound": influence_bound(len(releases)),
            },
            "mechanism": {
                "kind": "Gaussian, added at each hospital",
                "noise_multiplier": mechanism.noise_multiplier,
                "sensitivity": mechanism.sensitivity,
                "sigma": mechanism.sigma,
                "count_weight": COUNT_WEIGHT,
                "square_weight": SQUARE_WEIGHT,
                "scale_floor": SCALE_FLOOR,
                "epsilon_alone": config.stats_epsilon,
                "delta": config.delta,
                "ledger_event": None if event is None else dataclasses.asdict(event),
            },
        },
    )
    logger.info(
        "feature statistics from %d hospitals (%d rejected; noise multiplier %.3g, epsilon "
        "%.3g alone); %d feature(s) at the scale floor",
        len(releases),
        len(rejected),
        mechanism.noise_multiplier,
        config.stats_epsilon,
        len(combined.floored),
    )
    return plan
