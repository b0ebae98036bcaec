"""The hospital's side of the feature-statistics release (``normalisation = "federated"``).

Before round 1 the server asks every hospital for its training patients' counts, sums and
squares per numeric feature (:mod:`fedpriv.privacy.statistics`). The hospital loads its own
records (a site's file is checked against the schema first: a missing column is refused with
one line naming it), records the release in its privacy ledger *before* computing it (one
Gaussian mechanism on every patient that is under the cap; the others are left out), adds
the noise itself, and sends only the noisy sums. Once per run: a second request for the same
run is refused, so a retried or resumed run is never charged twice.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpriv import messages as msg
from fedpriv.client.hospital import (
    HospitalData,
    PrivacyState,
    local_data,
    open_ledger,
    privacy_state,
    site_settings,
)
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import DpEvent, statistics_noise
from fedpriv.privacy.ledger import LedgerError
from fedpriv.privacy.statistics import (
    STATISTICS_ROUND,
    STATS_EPSILON,
    STATS_NOISE,
    STATS_SENSITIVITY,
    STATS_SUMS,
    StatisticsMechanism,
)

__all__ = [
    "Release",
    "release_statistics",
    "statistics_reply",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Release:
    """What one hospital released (``sums``), or why it declined."""

    sums: np.ndarray | None
    noise_multiplier: float
    sensitivity: float
    declined: str = ""
    epsilon: float = 0.0
    excluded: int = 0


def statistics_reply(message: Message, context: Context) -> Message:
    """The QUERY handler's answer to :data:`fedpriv.messages.QUERY_STATISTICS`."""
    order = msg.parse_order(dict(message.content.config_records[msg.CONFIG]))
    config = order.config
    data = local_data(config, context.node_config)
    site = site_settings(context.node_config)
    if site is not None and site.require_dp and not config.sample_level_dp:
        release = Release(
            sums=None,
            noise_multiplier=0.0,
            sensitivity=0.0,
            declined=f"{data.name} declines: it takes part only with sample-level DP "
            "(require-dp = true in its site settings)",
        )
    else:
        privacy = (
            privacy_state(config, context.node_config, data.name)
            if config.sample_level_dp
            else None
        )
        release = release_statistics(config, data, privacy=privacy)
    hospital = ConfigRecord(
        {
            msg.HOSPITAL_NAME: data.name,
            msg.HOSPITAL_INDEX: data.index,
            msg.STATUS: msg.STATUS_DECLINED if release.declined else msg.STATUS_OK,
        }
    )
    if release.declined:
        hospital[msg.REASON] = release.declined
    content = RecordDict({msg.HOSPITAL: hospital})
    if release.sums is not None:
        content[msg.STATISTICS] = ConfigRecord(
            {
                STATS_SUMS: [float(v) for v in release.sums],
                STATS_NOISE: release.noise_multiplier,
                STATS_SENSITIVITY: release.sensitivity,
                STATS_EPSILON: release.epsilon,
            }
        )
    return Message(content=content, reply_to=message)


def release_statistics(
    config: RunConfig, data: HospitalData, *, privacy: PrivacyState | None
) -> Release:
    """This hospital's noisy sums (or its reason to decline), recorded in its ledger first
    (``privacy``; None: a run without sample-level DP, which records nothing anywhere)."""
    if data.schema is None or data.train_raw is None:
        raise ConfigError(
            f"{data.name} has no schema: normalisation federated needs the federation's "
            "schema.toml (its public ranges bound each patient's contribution)"
        )
    noise = statistics_noise(config.stats_epsilon, config.delta, config.accountant)
    mechanism = StatisticsMechanism.for_schema(data.schema, noise)
    records = np.ones(data.train_labels.size, dtype=bool)
    units = np.arange(data.train_labels.size)
    epsilon, excluded = 0.0, 0

    def declined(reason: str) -> Release:
        return Release(
            sums=None,
            noise_multiplier=noise,
            sensitivity=mechanism.sensitivity,
            declined=reason,
        )

    if privacy is not None:
        if data.train_records is None or len(data.train_records) != data.train_labels.size:
            raise ConfigError(f"{data.name}: its training records carry no identity to account")
        try:
            ledger = open_ledger(privacy, config, data.train_records)
        except LedgerError as exc:
            return declined(f"{data.name} declines: {exc}")
        if any(
            e.run_id == config.run_name and e.hospital == data.name and e.round == STATISTICS_ROUND
            for e in ledger.events()
        ):
            return declined(
                f"{data.name} already released its feature statistics for run "
                f"'{config.run_name}': a second release would be charged again (start a new run)"
            )
        assert ledger.key is not None
        reservation = ledger.reserve(
            ledger.key.records(data.train_records),
            event=DpEvent(noise, 1.0, 1),
            hospital=data.name,
            dataset_name=data.source or Path(config.dataset).name,
            run_id=config.run_name,
            round_=STATISTICS_ROUND,
            min_patients=config.min_patients,
            budget_epsilon=privacy.budget_epsilon,
        )
        if reservation.declined:
            return declined(reservation.declined)
        records = reservation.records
        _, units = np.unique(reservation.units[records], return_inverse=True)
        epsilon, excluded = reservation.epsilon_after, reservation.excluded
    rng = (
        np.random.default_rng([config.insecure_dp_seed, data.index, 0x57A75])
        if config.insecure_dp_seed >= 0
        else np.random.default_rng(secrets.randbits(128))  # never from --seed: the server knows it
    )
    sums = mechanism.release(data.train_raw[records], units.reshape(-1), rng)
    logger.info(
        "%s released its feature statistics (noise multiplier %.3g, sensitivity %.3g)",
        data.name,
        noise,
        mechanism.sensitivity,
    )
    return Release(
        sums=sums,
        noise_multiplier=noise,
        sensitivity=mechanism.sensitivity,
        epsilon=epsilon,
        excluded=excluded,
    )
