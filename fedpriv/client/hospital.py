"""What a hospital does with the server's orders: train or evaluate on its own records only.

Under sample-level DP (the default) a round is: plan the noise for the whole run from this
hospital's size; check the ledger and record the round's DP event *before* training (or
decline if it would pass the cap); train with Opacus DP-SGD, continuing the run's accountant.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedpriv import messages as msg
from fedpriv.client.site import DATA_PATH, SiteSettings
from fedpriv.config import RunConfig
from fedpriv.data import split_for
from fedpriv.data.datasets import RecordSource, file_version
from fedpriv.data.schema import Schema, check_schema_digest
from fedpriv.errors import ConfigError, FedprivError
from fedpriv.models import build
from fedpriv.privacy.distributed_noise import NoiseSplit, sum_scale
from fedpriv.privacy.dp import (
    DpPlan,
    PoissonUnits,
    make_private,
    plan_for_run,
    reseed_from_os,
    resolve_grad_sample_mode,
)
from fedpriv.privacy.identity import identity_mode
from fedpriv.privacy.ledger import (
    Ledger,
    LedgerError,
    LedgerSettings,
    Reservation,
    simulated_ledger_path,
)
from fedpriv.privacy.update_norm import dp_sgd_update_bound
from fedpriv.protocols.base import HospitalSide, Update, create_protocol
from fedpriv.protocols.plain import PlainHospital
from fedpriv.training import (
    EvalStats,
    TrainStats,
    evaluate,
    get_weights,
    make_loader,
    resolve_device,
    set_weights,
    train,
)

__all__ = [
    "DATA_PATH",
    "HospitalData",
    "PrivacyState",
    "RoundResult",
    "evaluate_round",
    "local_data",
    "plan_for",
    "train_round",
]

logger = logging.getLogger(__name__)

# node_config keys: Flower's simulation engine sets partition-id for each virtual SuperNode;
# a real site sets the others in its node config (deploy/site.example.toml)
PARTITION_ID = "partition-id"
LEDGER_PATH = "ledger-path"
BUDGET_EPSILON = "budget-epsilon"


@dataclasses.dataclass(frozen=True, eq=False)
class HospitalData:
    name: str
    index: int
    train_features: np.ndarray
    train_labels: np.ndarray
    held_out_features: np.ndarray
    held_out_labels: np.ndarray
    #: where the records come from, as the ledger shows it (a file name or a dataset name)
    source: str = ""
    #: the training records as they are in the file (what identifies their patients)
    train_records: RecordSource | None = None
    #: the classes the model must have: the schema's label list when there is one (a site
    #: may hold only some of its codes); 0: the highest label it holds, plus one
    num_classes: int = 0
    #: the federation's schema and the training records' raw values in its order (what
    #: the feature-statistics release bounds and sums); None without a schema
    schema: Schema | None = None
    train_raw: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PrivacyState:
    """Where this hospital keeps its privacy ledger, and the settings a new ledger gets."""

    ledger_path: Path
    budget_epsilon: float
    delta: float = 1e-5


@dataclasses.dataclass(frozen=True)
class RoundResult:
    arrays: ArrayRecord | None
    stats: TrainStats | None
    declined: str = ""
    privacy: dict[str, Any] | None = None
    accountant_state: dict[str, Any] | None = None
    #: the protocol's figures to report as metrics (e.g. he-encrypt-seconds)
    figures: dict[str, float] = dataclasses.field(default_factory=dict)
    #: the records this round trained on (patients left out for budget are not counted)
    num_examples: int = 0


def _simulated_split(config: RunConfig) -> Any:
    return _split_cached(config, file_version(config.dataset))


@functools.lru_cache(maxsize=4)
def _split_cached(config: RunConfig, version: tuple[int, int]) -> Any:
    return split_for(config)


@functools.lru_cache(maxsize=4)
def _site_data(
    path: str,
    label_column: str,
    patient_column: str,
    name: str,
    seed: int,
    held_out_fraction: float,
    version: tuple[int, int],
    schema: Schema | None = None,
    statistics: str = "",
) -> HospitalData:
    """``version``: the file's size and time, so a file changed on disk is read again.
    ``schema``: the site's copy of the federation's (None: standardised per file);
    ``statistics``: the run's federated centre and scale per feature (normalisation
    federated), applied over the schema."""
    from fedpriv.data import load_dataset
    from fedpriv.data.datasets import with_feature_statistics
    from fedpriv.errors import DataError

    try:
        dataset = load_dataset(
            path, label_column=label_column, patient_column=patient_column, schema=schema
        )
        dataset = with_feature_statistics(dataset, statistics)
    except DataError as exc:
        raise ConfigError(f"node config: 'data-path': {exc}") from None
    if len(dataset) < 2:
        raise ConfigError(f"node config: 'data-path' holds {len(dataset)} record(s), need >= 2")
    index = zlib.crc32(name.encode()) % 10_000
    held_mask = held_out_by_patient(dataset.source, seed, held_out_fraction)
    held, train = np.flatnonzero(held_mask), np.flatnonzero(~held_mask)
    return HospitalData(
        name=name,
        index=index,
        train_features=dataset.features[train],
        train_labels=dataset.labels[train],
        held_out_features=dataset.features[held],
        held_out_labels=dataset.labels[held],
        source=Path(path).name,
        train_records=dataset.source.take(train),
        num_classes=schema.num_classes if schema is not None else 0,
        schema=dataset.schema,
        train_raw=None if dataset.raw_features is None else dataset.raw_features[train],
    )


def held_out_by_patient(source: RecordSource, seed: int, fraction: float) -> np.ndarray:
    """Which records a site holds out: whole patients, each by a hash of the run's seed and
    its identity, so appending, removing or reordering records moves no one else (and all of
    a patient's records fall on the same side)."""
    material: list[bytes] = (
        [str(p).strip().encode() for p in source.patient_ids]
        if source.patient_ids is not None
        else source.row_material()
    )
    salt = seed.to_bytes(8, "little", signed=True)
    draws = np.array(
        [
            int.from_bytes(hashlib.sha256(salt + m).digest()[:8], "little") / 2.0**64
            for m in material
        ]
    )
    held = draws < fraction
    if not held.any() or held.all():  # both sides need a patient: the extreme draw flips
        flip = draws == (draws.min() if not held.any() else draws.max())
        held = held ^ flip
    return held


def site_settings(node_config: Mapping[str, Any]) -> SiteSettings | None:
    """A real site's settings, or None for a simulated hospital."""
    if DATA_PATH not in node_config:
        return None
    return SiteSettings.from_node_config(node_config)


def local_data(config: RunConfig, node_config: Mapping[str, Any]) -> HospitalData:
    """This hospital's records: a real site's own file (node config ``data-path``), split
    into training and held-out records by the run's seed; or, in simulation, its partition
    of the shared dataset. Under normalisation federated, before the run's feature
    statistics exist (the schema query, the release itself), the features are the
    schema's mapping; nothing trains or evaluates on them (:func:`require_statistics`)."""
    site = site_settings(node_config)
    if site is not None:
        schema = site.load_schema()
        # the run's schema digest: this site's features must mean what everyone's do
        check_schema_digest(config.schema_digest, schema, who=f"site '{site.hospital_name}'")
        if schema is None and config.normalisation in ("schema", "federated"):
            raise ConfigError(
                f"node config: 'schema-path' is missing and the run normalises by "
                f"{config.normalisation}: set it to the federation's schema.toml"
            )
        if schema is None:
            logger.warning(
                "site '%s' has no schema-path: its features are standardised with its own "
                "file's statistics, so they mean something different at each site",
                site.hospital_name,
            )
        return _site_data(
            str(site.data_path),
            site.label_column,
            site.patient_column,
            site.hospital_name,
            config.seed,
            config.held_out_fraction,
            file_version(str(site.data_path)),
            schema,
            config.feature_statistics if config.normalisation == "federated" else "",
        )
    if PARTITION_ID not in node_config:
        raise ConfigError(
            "node config: neither 'data-path' (a real site) nor 'partition-id' (a simulated "
            "hospital) is set: see deploy/site.example.toml"
        )
    index = int(node_config[PARTITION_ID])
    dataset, split = _simulated_split(config)
    if not 0 <= index < len(split.hospitals):
        raise ConfigError(
            f"partition-id {index} is outside the run's {len(split.hospitals)} hospitals"
        )
    part = split.hospitals[index]
    # planted canaries train like any record (and are accounted like any), never evaluated
    planted = split.canaries_of(index)
    canary_index = np.asarray([c.index for c in planted], dtype=np.int64)
    canary_labels = np.asarray([c.label for c in planted], dtype=np.int64)
    return HospitalData(
        name=part.name,
        index=index,
        train_features=np.concatenate(
            [dataset.features[part.train], dataset.features[canary_index]]
        ),
        train_labels=np.concatenate([dataset.labels[part.train], canary_labels]),
        held_out_features=dataset.features[part.held_out],
        held_out_labels=dataset.labels[part.held_out],
        source=Path(config.dataset).name,
        train_records=RecordSource.concatenate(
            [dataset.source.take(part.train), dataset.source.take(canary_index)]
        ),
        schema=dataset.schema,
        train_raw=None
        if dataset.raw_features is None
        else np.concatenate([dataset.raw_features[part.train], dataset.raw_features[canary_index]]),
    )


def require_statistics(config: RunConfig) -> None:
    """Refuse to train or evaluate under normalisation federated without the run's feature
    statistics: the inputs would not be the ones every other hospital uses."""
    if config.normalisation == "federated" and not config.feature_statistics:
        raise ConfigError(
            "the run normalises by federated statistics but the server's order carries none "
            "(feature-statistics): the server gathers them before round 1"
        )


def privacy_state(config: RunConfig, node_config: Mapping[str, Any], hospital: str) -> PrivacyState:
    """The ledger and its settings: a real site's own node config wins over the run's.

    Simulated hospitals share one ledger (:func:`simulated_ledger_path`): they carve up one
    dataset, so a record that another partition moves to another hospital keeps its history.
    """
    site = site_settings(node_config)
    if site is not None:
        if site.ledger_path is None:
            raise ConfigError(
                "node config: 'ledger-path' is missing: this hospital cannot account DP "
                "without its privacy ledger"
            )
        return PrivacyState(
            ledger_path=site.ledger_path,
            budget_epsilon=site.budget_epsilon,
            delta=site.budget_delta,
        )
    if LEDGER_PATH in node_config:
        path = Path(str(node_config[LEDGER_PATH])).expanduser()
    else:
        path = simulated_ledger_path(config)
    if BUDGET_EPSILON in node_config:
        budget = float(node_config[BUDGET_EPSILON])
    elif PARTITION_ID in node_config:  # a simulated hospital takes the run's setting
        budget = config.budget_epsilon
    else:
        budget = RunConfig().budget_epsilon
    return PrivacyState(ledger_path=path, budget_epsilon=budget, delta=config.delta)


def protocol_side(config: RunConfig, node_config: Mapping[str, Any]) -> HospitalSide:
    """This hospital's side of the run's aggregation protocol (its keys, for CKKS)."""
    return create_protocol(config.protocol).hospital(config, node_config)


def _seed(order: msg.TrainingOrder, data: HospitalData) -> int:
    return (order.config.seed * 1_000_003 + order.server_round * 1_009 + data.index) % 2**31


def plan_for(order: msg.TrainingOrder, patients: int) -> DpPlan:
    """Calibrate the run's noise for a hospital with ``patients`` patients in training."""
    return plan_for_run(order.config, patients, one_step_per_round=order.mode == msg.MODE_GRADIENT)


def train_round(
    order: msg.TrainingOrder,
    data: HospitalData,
    arrays: ArrayRecord,
    *,
    privacy: PrivacyState | None = None,
    accountant_state: dict[str, Any] | None = None,
    side: HospitalSide | None = None,
    state: Any = None,
) -> RoundResult:
    """One round of local training; what the hospital sends is the protocol's encoding of
    its update (``side``; plaintext by default): its weights or gradient, a ciphertext, a
    masked vector. ``state`` is Flower's context.state (a protocol's secrets live there)."""
    config = order.config
    require_statistics(config)
    device = resolve_device(config.device)
    side = side if side is not None else PlainHospital()
    current = side.read(order, arrays)
    model = build(order.model_name, **order.model_args)
    set_weights(model, current.weights)
    before = get_weights(model)

    def reply(
        stats: TrainStats, examples: int, norm_bound: float = 0.0, **extra: Any
    ) -> RoundResult:
        update = Update(
            before=before,
            after=get_weights(model),
            num_examples=examples,
            gradient=gradient_mode,
            server_lr=config.server_lr,
            norm_bound=norm_bound,
        )
        try:
            record, figures = side.encode(order, update, state)
        except FedprivError as exc:  # e.g. an update outside secure aggregation's range
            return RoundResult(arrays=None, stats=None, declined=f"{data.name}: {exc}", **extra)
        return RoundResult(
            arrays=record,
            stats=stats,
            figures={**current.figures, **figures},
            num_examples=examples,
            **extra,
        )

    criterion = torch.nn.CrossEntropyLoss()
    gradient_mode = order.mode == msg.MODE_GRADIENT
    lr = 1.0 if gradient_mode else config.lr
    momentum = 0.0 if gradient_mode else config.momentum
    proximal_mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if not config.sample_level_dp:
        torch.manual_seed(_seed(order, data))
        batch = max(1, data.train_labels.size) if gradient_mode else config.batch_size
        plain_loader = make_loader(
            data.train_features,
            data.train_labels,
            batch_size=batch,
            shuffle=not gradient_mode,
            seed=_seed(order, data),
        )
        stats = train(
            model,
            plain_loader,
            optimizer=optimizer,
            criterion=criterion,
            epochs=1 if gradient_mode else config.local_epochs,
            device=device,
            proximal_mu=proximal_mu,
        )
        return reply(stats, int(data.train_labels.size))

    if privacy is None:
        raise ConfigError("sample-level DP needs a privacy ledger")
    records = data.train_records
    if records is None or len(records) != data.train_labels.size:
        raise ConfigError(f"{data.name}: its training records carry no identity to account")
    try:
        ledger = open_ledger(privacy, config, records)
    except LedgerError as exc:
        return RoundResult(arrays=None, stats=None, declined=f"{data.name} declines: {exc}")
    assert ledger.key is not None
    keyed = ledger.key.records(records)
    patients = int(np.unique(keyed.keys).size)
    try:  # distributed noise: the assumption it rests on goes into the ledger's run plan
        split = side.noise_split(order, state)
    except FedprivError as exc:
        return RoundResult(arrays=None, stats=None, declined=f"{data.name} declines: {exc}")
    plan = ledger.plan(
        run_id=config.run_name,
        hospital=data.name,
        request=_plan_request(order, patients, split),
        make=functools.partial(plan_for, order, patients),
    )
    reservation = ledger.reserve(
        keyed,
        event=plan.round_event(),
        hospital=data.name,
        dataset_name=data.source or Path(config.dataset).name,
        run_id=config.run_name,
        round_=order.server_round,
        min_patients=config.min_patients,
        budget_epsilon=privacy.budget_epsilon,
        # the exact epsilon for the record at the run's end; the fast bound meanwhile
        exact=order.server_round >= config.rounds,
    )
    if reservation.declined:
        return RoundResult(
            arrays=None,
            stats=None,
            declined=reservation.declined,
            privacy=_privacy_report(data, plan, ledger, reservation, "declined"),
            accountant_state=accountant_state,
        )
    # Sampling and noise must not follow --seed (the server knows it).
    if config.insecure_dp_seed >= 0:
        torch.manual_seed(
            (config.insecure_dp_seed * 1_000_003 + order.server_round * 1_009 + data.index) % 2**63
        )
    else:
        reseed_from_os()
    mode = resolve_grad_sample_mode(model, config.grad_sample_mode, proximal=proximal_mu > 0)
    trained = reservation.records
    _, units = np.unique(reservation.units[trained], return_inverse=True)
    loader = PoissonUnits(
        data.train_features[trained],
        data.train_labels[trained],
        units.reshape(-1),
        sample_rate=plan.sample_rate,
        steps=round(1.0 / plan.sample_rate),
    )
    added = plan.noise_multiplier
    if split is not None:
        # the recorded event (above) is the full noise, which the honest shares in the
        # secure sum add up to; this hospital adds its share (after recording: a decline
        # here can only over-count)
        try:
            added = split.added(
                plan,
                sum_scale(
                    examples=int(trained.sum()),
                    units=loader.num_units,
                    sample_rate=plan.sample_rate,
                ),
                values=sum(int(v.size) for v in before.values()) + 1,  # and the weight
            )
        except FedprivError as exc:
            return RoundResult(arrays=None, stats=None, declined=f"{data.name} declines: {exc}")
    private = make_private(
        model=model,
        optimizer=optimizer,
        loader=loader,
        criterion=criterion,
        plan=plan,
        grad_sample_mode=mode,
        accountant_state=accountant_state,
        noise_multiplier=added,
    )
    steps_before = private.steps_taken()
    try:
        stats = train(
            private.model,
            private.loader,
            optimizer=private.optimizer,
            criterion=private.criterion,
            epochs=1 if gradient_mode else config.local_epochs,
            device=device,
            proximal_mu=proximal_mu,
            max_steps=plan.steps_per_round,
        )
    finally:
        private.close()
    taken = private.steps_taken() - steps_before
    if taken != plan.steps_per_round:
        # The ledger holds what was planned; the accountant what happened. They must agree.
        raise RuntimeError(
            f"{data.name} took {taken} DP-SGD steps but recorded {plan.steps_per_round}"
        )
    # what this round's DP-SGD can produce at most (w.h.p.): secure aggregation tells an
    # honest update beyond its range (clipped, recorded) from a broken one (refused)
    bound = dp_sgd_update_bound(
        lr=lr,
        momentum=momentum,
        max_grad_norm=plan.max_grad_norm,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        units=loader.num_units,
        parameters=sum(int(v.size) for v in before.values()),
        scale=config.server_lr if gradient_mode else 1.0,
    )
    return reply(
        stats,
        int(trained.sum()),
        norm_bound=bound.total,
        privacy=_privacy_report(
            data,
            plan,
            ledger,
            reservation,
            "trained",
            mode=private.mode,
            run_steps=private.steps_taken(),
            patient_level=loader.grouped,
            distributed=None if split is None else split.report(plan, added, config),
        ),
        accountant_state=private.accountant_state(),
    )


def ledger_settings(
    config: RunConfig, node_config: Mapping[str, Any], hospital: str
) -> LedgerSettings | None:
    """The fixed settings of this hospital's ledger if it exists (else what it would get)."""
    if not config.sample_level_dp:
        return None
    privacy = privacy_state(config, node_config, hospital)
    if privacy.ledger_path.exists():
        return Ledger.open(privacy.ledger_path, writable=False, need_key=False).settings
    return LedgerSettings(budget_epsilon=privacy.budget_epsilon, delta=privacy.delta)


def open_ledger(privacy: PrivacyState, config: RunConfig, records: RecordSource) -> Ledger:
    """This hospital's ledger, created with its settings if there is none; refused (with
    the reason) if the run asks for what the ledger's fixed settings do not allow."""
    settings = LedgerSettings(
        budget_epsilon=privacy.budget_epsilon,
        delta=privacy.delta,
        accountant=config.accountant,
        identity=identity_mode(records),
    )
    ledger = Ledger.open(privacy.ledger_path, create=settings)
    for notice in ledger.check_request(dataclasses.replace(settings, delta=config.delta)):
        logger.info("%s", notice)
    return ledger


def _plan_request(
    order: msg.TrainingOrder, patients: int, split: NoiseSplit | None = None
) -> dict[str, Any]:
    config = order.config
    return {
        "patients": patients,
        "batch-size": config.batch_size,
        "local-epochs": config.local_epochs,
        "rounds": config.rounds,
        "one-step": order.mode == msg.MODE_GRADIENT,
        "epsilon": config.epsilon,
        "delta": config.delta,
        "accountant": config.accountant,
        "max-grad-norm": config.max_grad_norm,
        "noise-multiplier": config.noise_multiplier,
        # the statistics release shares the run's epsilon (normalisation federated)
        **({"stats-epsilon": config.stats_epsilon} if config.normalisation == "federated" else {}),
        # distributed noise: the epsilon recorded holds under this assumption only
        **({"distributed-noise": split.record()} if split is not None else {}),
    }


def _privacy_report(
    data: HospitalData,
    plan: DpPlan,
    ledger: Ledger,
    reservation: Reservation,
    status: str,
    *,
    mode: str = "",
    run_steps: int | None = None,
    patient_level: bool = False,
    distributed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """This hospital's spend, per patient: the largest epsilon of any of its patients, the
    patients left out for budget, and the merged events of the most spent patient, so anyone
    can recompute the figure.

    ``run_steps`` is what this run's accountant (carried in Flower's context.state) has
    seen: it must equal the steps the ledger holds for the run. ``distributed``: under
    distributed noise, the assumption the epsilon rests on and the epsilon without it.
    """
    report: dict[str, Any] = {
        "hospital": data.name,
        "status": status,
        "unit": "patient",
        "epsilon": reservation.epsilon_after,
        "epsilon_exact": reservation.exact,
        "epsilon_before": reservation.epsilon_before,
        "delta": reservation.delta,
        "accountant": reservation.accountant,
        "budget_epsilon": reservation.budget_epsilon,
        "patients": reservation.patients,
        "excluded_for_budget": reservation.excluded,
        "patient_level_sampling": patient_level,
        "identity": ledger.settings.identity,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "max_grad_norm": plan.max_grad_norm,
        "steps_per_round": plan.steps_per_round,
        "planned_epsilon": plan.planned_epsilon,
        "target_epsilon": plan.target_epsilon,
        "grad_sample_mode": mode,
        "run_accountant_steps": run_steps,
        "events": [
            {"noise_multiplier": sigma, "sample_rate": q, "steps": steps}
            for sigma, q, steps in reservation.history
        ],
    }
    if distributed is not None:
        # the lifetime figure if the collusion assumption fails, every recorded run composed
        fallback = ledger.fallback_epsilon()
        if fallback is not None:
            distributed = {
                **distributed,
                "fallback_epsilon": fallback[0],
                "fallback_epsilon_exact": fallback[1],
            }
        report["distributed_noise"] = distributed
    return report


def audit_counts(
    order: msg.TrainingOrder,
    data: HospitalData,
    arrays: ArrayRecord,
    thresholds: np.ndarray,
    *,
    side: HospitalSide | None = None,
) -> dict[str, Any]:
    """The federated LOSS audit at this hospital: counts of its members and non-members
    whose loss under the final model is at or below each threshold. Scores stay here."""
    from fedpriv.privacy.audit.federated import loss_counts
    from fedpriv.training import per_example_losses

    require_statistics(order.config)
    model = _model(order, (side or PlainHospital()).read(order, arrays).weights)
    device = torch.device("cpu")
    members = data.train_labels.size - len(_planted(order, data))
    member_losses, _ = per_example_losses(
        model, data.train_features[:members], data.train_labels[:members], device=device
    )
    held_losses, _ = per_example_losses(
        model, data.held_out_features, data.held_out_labels, device=device
    )
    members_le, non_members_le = loss_counts(member_losses, held_losses, thresholds)
    return {
        msg.AUDIT_MEMBERS_LE: members_le,
        msg.AUDIT_NON_MEMBERS_LE: non_members_le,
        msg.AUDIT_MEMBERS: int(members),
        msg.AUDIT_NON_MEMBERS: int(held_losses.size),
    }


def _planted(order: msg.TrainingOrder, data: HospitalData) -> list[Any]:
    """Canaries planted at this hospital (simulation only); they sit at the end of train."""
    if order.config.canaries == 0:
        return []
    _, split = _simulated_split(order.config)
    return list(split.canaries_of(data.index))


def evaluate_round(
    order: msg.TrainingOrder,
    data: HospitalData,
    arrays: ArrayRecord,
    *,
    side: HospitalSide | None = None,
) -> tuple[EvalStats, dict[str, float]]:
    """The global model on this hospital's held-out records (decrypted first under CKKS),
    and the protocol's figures (this is where a round's aggregate is decrypted; the next
    round's training finds it already decrypted)."""
    require_statistics(order.config)
    device = resolve_device(order.config.device)
    current = (side or PlainHospital()).read(order, arrays)
    loader = make_loader(
        data.held_out_features, data.held_out_labels, batch_size=1024, shuffle=False
    )
    stats = evaluate(
        _model(order, current.weights),
        loader,
        criterion=torch.nn.CrossEntropyLoss(),
        device=device,
    )
    return stats, current.figures


def _model(order: msg.TrainingOrder, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build(order.model_name, **order.model_args)
    set_weights(model, weights)
    return model
