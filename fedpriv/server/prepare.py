"""Preparing a run, before any process starts: settings checked, data split, run directory
created (or reopened to resume), model resolved (from the data, or from a deployment's
hospitals' schemas)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.data import Dataset, FederatedSplit, split_for
from fedpriv.errors import ConfigError
from fedpriv.models import build, default_model, initial_state, replace_batchnorm
from fedpriv.privacy.dp import batchnorm_layers
from fedpriv.server.exchange import send_and_receive
from fedpriv.server.rundir import Checkpoint, RunDirectory, new_run_name
from fedpriv.strategies.fedavg import hospital_name
from fedpriv.training import evaluate, make_loader, resolve_device, set_weights

__all__ = [
    "CentralEvaluator",
    "RunPlan",
    "initial_weights",
    "prepare_run",
    "resolve_model",
    "resolve_model_from_hospitals",
    "with_feature_statistics",
]

logger = logging.getLogger(__name__)

CentralEvaluator = Callable[[dict[str, np.ndarray]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything the server needs, resolved and validated before any process starts."""

    config: RunConfig
    model_name: str
    model_args: dict[str, Any]
    run_dir: RunDirectory
    central: CentralEvaluator | None
    resume: Checkpoint | None = None
    notices: tuple[str, ...] = ()
    #: the simulation harness's way to read an encrypted global model (it holds the
    #: hospitals' key); None for a real server, which never can
    decrypt: Callable[[ArrayRecord], dict[str, np.ndarray] | None] | None = None
    #: the training examples each hospital declared before round 1 (from the simulation's
    #: split, or a deployment's schema replies): a larger claim is refused
    declared: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the patients those examples belong to, as each hospital declared them (a hospital
    #: missing here holds one record per patient): distributed noise sizes its shares by both
    declared_patients: dict[str, int] = dataclasses.field(default_factory=dict)
    #: a simulation's dataset as the server loaded it, by load key: what its workers take
    #: instead of reading the file again (fedpriv.data.handoff)
    loaded: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict)
    #: a protocol's first setup query sent with a deployment's schema query (its content),
    #: and the hospitals' answers ``{node: (hospital, record)}``: one exchange fewer
    early_query: dict[str, Any] | None = None
    early_answers: dict[int, tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)


def resolve_model(config: RunConfig, dataset: Dataset) -> tuple[str, dict[str, Any]]:
    return default_model(
        kind=dataset.kind,
        input_shape=tuple(dataset.features.shape[1:]),
        num_classes=dataset.num_classes,
        name=config.model,
        width=config.model_width,
        dp=config.sample_level_dp,
        activation=config.model_activation,
    )


def _check_run(config: RunConfig) -> None:
    _check_strategy(config)
    resolve_device(config.device)
    if config.sample_level_dp and config.epsilon > config.budget_epsilon:
        raise ConfigError(
            f"--epsilon {config.epsilon:g} is more than the hospitals' budget cap "
            f"--budget-epsilon {config.budget_epsilon:g}: the run could not finish"
        )


def _check_strategy(config: RunConfig) -> None:
    """What strategy, aggregation and client-level DP allow together (simulation and
    deployment)."""
    from fedpriv.protocols.base import create_protocol
    from fedpriv.strategies import available_strategies, is_stock

    if config.strategy not in available_strategies():
        raise ConfigError(
            f"unknown strategy '{config.strategy}': use one of {', '.join(available_strategies())}"
        )
    create_protocol(config.protocol)
    if config.client_level_dp and is_stock(config.strategy):
        raise ConfigError(
            f"--dp-level {config.dp_level} clips hospitals' updates inside fedpriv's own "
            f"aggregation; Flower's '{config.strategy}' does its own: use fedavg or fedsgd"
        )
    if config.aggregation != "plain" and is_stock(config.strategy):
        raise ConfigError(
            f"--aggregation {config.aggregation} needs fedpriv's own aggregation; Flower's "
            f"'{config.strategy}' averages plaintext itself: use fedavg or fedsgd"
        )
    if config.he and config.client_level_dp:
        raise ConfigError(
            f"--dp-level {config.dp_level} clips each hospital's update at the server, which "
            "cannot see updates under CKKS: use --aggregation secagg (the hospitals clip and "
            "add the noise) or --dp-level sample with --he"
        )
    if (
        config.aggregation == "secagg"
        and config.secagg_threshold > 0
        and (config.secagg_threshold > config.hospitals)
    ):
        raise ConfigError(
            f"--secagg-threshold {config.secagg_threshold} is more than the "
            f"{config.hospitals} hospitals: no round could ever be unmasked"
        )


def _check_model(
    config: RunConfig, model_name: str, model_args: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """DP-SGD cannot use BatchNorm: refuse it by name, or replace it with --fix-model."""
    notices: list[str] = []
    if not config.sample_level_dp:
        return model_args, notices
    layers = batchnorm_layers(build(model_name, **model_args))
    if not layers:
        return model_args, notices
    if not config.fix_model:
        name, kind = layers[0]
        raise ConfigError(
            f"model '{model_name}' has a {kind} layer '{name}', which DP-SGD cannot use "
            "(it mixes records within a batch): use GroupNorm, or pass --fix-model to replace it"
        )
    fixed = {**model_args, "replace_batchnorm": True}
    replaced = replace_batchnorm(build(model_name, **model_args))
    notices.append("--fix-model replaced " + "; ".join(replaced))
    return fixed, notices


def _check_dp(config: RunConfig, dataset: Dataset, split: FederatedSplit) -> list[str]:
    """What can fail about DP fails now, before anything starts: a delta too large for the
    smallest hospital, or one the simulated hospitals' existing ledger does not allow."""
    notices: list[str] = []
    if not config.dp:
        notices.append(
            "DP is OFF (--no-dp): the hospitals' records are unprotected and the model can "
            "leak them"
        )
        return notices
    if not config.sample_level_dp:
        return notices
    if config.insecure_dp_seed >= 0:
        notices.append(
            f"insecure-dp-seed={config.insecure_dp_seed}: DP noise and sampling are reproducible "
            "by anyone who knows it, which voids the privacy guarantee against them (tests and "
            "benchmarks only)"
        )

    # Each hospital calibrates its own noise; here only what can fail is checked.
    def patients(h: Any) -> int:
        ids = dataset.source.patient_ids
        return int(h.train.size if ids is None else len({str(ids[i]) for i in h.train}))

    smallest = min(split.hospitals, key=patients)
    if config.delta >= 1.0 / patients(smallest):
        raise ConfigError(
            f"delta {config.delta:g} must be below 1/n = {1.0 / patients(smallest):.3g} for "
            f"{smallest.name} with {patients(smallest)} patients in training: lower --delta"
        )
    notices += _check_ledger(config, dataset)
    return notices


def _check_ledger(config: RunConfig, dataset: Dataset) -> list[str]:
    """An existing ledger's fixed cap and delta bind every run on it: refuse now."""
    from fedpriv.privacy.identity import identity_mode
    from fedpriv.privacy.ledger import Ledger, LedgerError, LedgerSettings, simulated_ledger_path

    path = simulated_ledger_path(config)
    if not config.ledger_dir or not path.exists():
        return []
    try:
        ledger = Ledger.open(path, writable=False, need_key=False)
        return ledger.check_request(
            LedgerSettings(
                budget_epsilon=config.budget_epsilon,
                delta=config.delta,
                accountant=config.accountant,
                identity=identity_mode(dataset.source),
            )
        )
    except LedgerError as exc:
        raise ConfigError(str(exc)) from None


def prepare_run(
    config: RunConfig,
    *,
    resume_dir: str | Path | None = None,
    central: bool = True,
) -> RunPlan:
    """Validate, split the data, create (or reopen) the run directory; start nothing yet."""
    if config.deployment:
        return _prepare_deployment(config, resume_dir=resume_dir)
    if resume_dir is not None:
        run_dir, config, model_name, model_args = _reopen(resume_dir, config)
        _check_run(config)
        dataset, split = split_for(config)
        if split.dumps() != run_dir.read_partitions().dumps():
            raise ConfigError(
                f"the data no longer splits as recorded in {run_dir.path}/partitions.json: "
                "was the dataset file changed?"
            )
        checkpoint = _restart(run_dir, config, model_name, model_args)
        notices = _check_dp(config, dataset, split)
    else:
        _check_run(config)
        dataset, split = split_for(config)
        config = config.replace(schema_digest=dataset.schema.digest if dataset.schema else "")
        model_name, model_args = resolve_model(config, dataset)
        model_args, notices = _check_model(config, model_name, model_args)
        notices += _normalisation_notices(dataset)
        notices += _check_dp(config, dataset, split)
        config, run_dir = _new_run_directory(config)
        run_dir.write_config(config, model_name=model_name, model_args=model_args)
        run_dir.write_partitions(split)
        checkpoint = None
    evaluator = (
        _central_evaluator(config, dataset, split, model_name, model_args) if central else None
    )
    declared, patients = _simulated_declarations(
        dataset, split, count_patients=config.aggregation == "secagg"
    )
    return RunPlan(
        config=config,
        model_name=model_name,
        model_args=model_args,
        run_dir=run_dir,
        central=evaluator,
        resume=checkpoint,
        notices=tuple(notices),
        declared=declared,
        declared_patients=patients,
    )


def _simulated_declarations(
    dataset: Dataset, split: FederatedSplit, *, count_patients: bool
) -> tuple[dict[str, int], dict[str, int]]:
    """What each simulated hospital would declare before round 1, as a real site does: its
    training records (canaries included: they train like any record) and, where the run
    uses them (``count_patients``: secure aggregation's range, distributed noise), their
    patients; counting them reads every training record (about 1 s of start-up at 1,000
    hospitals of a 200,000-row file), so a run that has no use for them skips it."""
    from fedpriv.privacy import identity

    declared, patients = {}, {}
    for k, hospital in enumerate(split.hospitals):
        canaries = np.asarray([c.index for c in split.canaries_of(k)], dtype=np.int64)
        trained = np.concatenate([np.asarray(hospital.train, dtype=np.int64), canaries])
        declared[hospital.name] = int(trained.size)
        if count_patients:
            patients[hospital.name] = identity.count_patients(dataset.source.take(trained))
    return declared, patients


def _normalisation_notices(dataset: Dataset) -> list[str]:
    if dataset.schema is not None or dataset.kind == "image":
        return []
    return [
        f"'{dataset.name}' has no schema: its features are standardised with statistics of the "
        "whole file, which mixes every hospital's records into each hospital's inputs (and "
        "real sites would each scale differently); give --schema (draft one with `fedpriv "
        "schema init`)"
    ]


def _reopen(
    resume_dir: str | Path, config: RunConfig
) -> tuple[RunDirectory, RunConfig, str, dict[str, Any]]:
    """A run directory to resume, and its recorded configuration (asked-for more rounds
    extend it); nothing in it is changed yet."""
    run_dir = RunDirectory.open(resume_dir)
    saved, model_name, model_args = run_dir.read_config()
    return run_dir, saved.replace(rounds=max(config.rounds, saved.rounds)), model_name, model_args


def _restart(
    run_dir: RunDirectory, config: RunConfig, model_name: str, model_args: dict[str, Any]
) -> Checkpoint | None:
    """Once the resumed run is checked: its last checkpoint, metrics trimmed to it, the
    (extended) configuration recorded."""
    checkpoint = run_dir.load_checkpoint()
    run_dir.keep_metrics_through(checkpoint.round if checkpoint else 0)
    run_dir.write_config(config, model_name=model_name, model_args=model_args)
    return checkpoint


def _new_run_directory(config: RunConfig) -> tuple[RunConfig, RunDirectory]:
    """Create the run directory; record absolute paths (hospitals' and the server's
    processes may run in other working directories)."""
    name = config.run_name or new_run_name()
    run_dir = RunDirectory.create(Path(config.out) / name)
    config = config.replace(
        run_name=name,
        out=str(Path(config.out).resolve()),
        ledger_dir=str(Path(config.ledger_dir).resolve()) if config.ledger_dir else "",
        keys=str(Path(config.keys).resolve()) if config.keys else "",
        schema=str(Path(config.schema).resolve()) if config.schema else "",
    )
    return config, run_dir


def _prepare_deployment(config: RunConfig, *, resume_dir: str | Path | None) -> RunPlan:
    """A real federation: the server holds no data, so no split, no central test, and the
    model is resolved from the hospitals' schemas once they connect."""
    _check_strategy(config)
    notices = _check_dp_settings(config)
    if resume_dir is None:
        config, more = _deployment_schema(config)
        notices += more
    if resume_dir is not None:
        run_dir, config, model_name, model_args = _reopen(resume_dir, config)
        declared, patients = run_dir.read_declarations()
        checkpoint = _restart(run_dir, config, model_name, model_args)
        return RunPlan(
            config=config,
            model_name=model_name,
            model_args=model_args,
            run_dir=run_dir,
            central=None,
            resume=checkpoint,
            notices=tuple(notices),
            declared=declared,
            declared_patients=patients,
        )
    config, run_dir = _new_run_directory(config)
    run_dir.write_config(config, model_name="", model_args={})
    return RunPlan(
        config=config,
        model_name="",
        model_args={},
        run_dir=run_dir,
        central=None,
        notices=tuple(notices),
    )


def _deployment_schema(config: RunConfig) -> tuple[RunConfig, list[str]]:
    """The run config carries the schema's digest to the sites: each refuses to train when
    its own schema differs, so every site's features mean the same."""
    from fedpriv.data import load_schema

    if config.schema:
        digest = load_schema(config.schema).digest
        if config.schema_digest and config.schema_digest != digest:
            raise ConfigError(
                f"schema-digest {config.schema_digest[:12]} is not the digest of "
                f"'{config.schema}' ({digest[:12]}): drop schema-digest, it is set from the file"
            )
        return config.replace(schema_digest=digest), []
    if config.schema_digest:
        return config, []
    if config.normalisation in ("schema", "federated"):
        raise ConfigError(
            f"normalisation = {config.normalisation} needs the federation's schema: set "
            "schema = path to its schema.toml (each site sets schema-path to its copy)"
        )
    return config, [
        "no schema: each site standardises its features with its own file's mean and standard "
        "deviation, so a feature's value means something different at each site; set schema"
    ]


def _check_dp_settings(config: RunConfig) -> list[str]:
    if not config.dp:
        return [
            "DP is OFF: hospitals that require DP (the default) will decline every round, the "
            "others' records are unprotected"
        ]
    return []


def resolve_model_from_hospitals(
    grid: Grid, plan: RunPlan, *, early: tuple[str, dict[str, Any]] | None = None
) -> RunPlan:
    """Ask every connected hospital for its data schema; all must agree on the features.
    ``early``: a protocol's setup query (its kind and content) the hospitals answer in the
    same reply (secure aggregation's keys: one exchange fewer before round 1)."""
    content = RecordDict(
        {msg.CONFIG: ConfigRecord({**plan.config.to_mapping(), msg.QUERY: msg.QUERY_SCHEMA})}
    )
    if early is not None:
        from fedpriv.protocols.secagg import SETUP

        kind, query = early
        content[msg.PROTOCOL] = ConfigRecord({SETUP: json.dumps(query), msg.EARLY_QUERY: kind})
    answers: dict[int, tuple[str, dict[str, Any]]] = {}
    messages = [
        Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
        for node in sorted(grid.get_node_ids())
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    deltas: dict[str, float] = {}
    declared: dict[str, int] = {}
    patients: dict[str, int] = {}
    classes = 0
    errors = []
    for reply in send_and_receive(grid, messages, timeout=plan.config.round_timeout):
        if reply.has_error():
            errors.append(str(reply.error.reason).strip().splitlines()[-1][:300])
            continue
        record = reply.content.config_records[msg.SCHEMA]
        name = hospital_name(reply.content)
        if early is not None and msg.PROTOCOL in reply.content.config_records:
            answer = dict(reply.content.config_records[msg.PROTOCOL])
            answers[int(reply.metadata.src_node_id)] = (name, answer)
        shapes[name] = tuple(int(d) for d in record[msg.SCHEMA_SHAPE])  # type: ignore[union-attr]
        classes = max(classes, int(record[msg.SCHEMA_CLASSES]))  # type: ignore[arg-type]
        if msg.SCHEMA_EXAMPLES in record:
            size = _declared_size(name, record)
            if size is not None:
                declared[name] = size[0]
                if msg.SCHEMA_PATIENTS in record:
                    patients[name] = size[1]
        if msg.SCHEMA_LEDGER_DELTA in record:
            deltas[name] = float(record[msg.SCHEMA_LEDGER_DELTA])  # type: ignore[arg-type]
    for error in errors:
        logger.warning("a hospital could not describe its data: %s", error)
    if not shapes:
        raise ConfigError(
            "no hospital could describe its data: " + ("; ".join(errors) or "none connected")
        )
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"the hospitals' data have different feature shapes: {shapes}")
    refusing = {h: d for h, d in deltas.items() if plan.config.delta > d}
    if refusing:
        name, delta = min(refusing.items(), key=lambda item: item[1])
        raise ConfigError(
            f"delta {plan.config.delta:g} is larger than the delta {delta:g} that {name}'s "
            f"privacy ledger is fixed at: every run is composed at a ledger's delta; set "
            f"delta = {delta:g} or smaller"
        )
    shape = next(iter(shapes.values()))
    kind = "image" if len(shape) == 3 else "tabular"
    model_name, model_args = default_model(
        kind=kind,
        input_shape=shape,
        num_classes=classes,
        name=plan.config.model,
        width=plan.config.model_width,
        dp=plan.config.sample_level_dp,
        activation=plan.config.model_activation,
    )
    build(model_name, **model_args)
    plan.run_dir.write_config(plan.config, model_name=model_name, model_args=model_args)
    plan.run_dir.write_declarations(declared, patients)
    logger.info("model %s %s from %d hospitals' schemas", model_name, model_args, len(shapes))
    return dataclasses.replace(
        plan,
        model_name=model_name,
        model_args=model_args,
        declared=declared,
        declared_patients=patients,
        early_query=early[1] if early is not None else None,
        early_answers=answers,
    )


def _declared_size(hospital: str, record: Any) -> tuple[int, int] | None:
    """A schema reply's declared training records and patients (one per record when it
    declares none), or None, said in the log, when they cannot be a hospital's: that
    hospital then has no say in the run's limits and its claims are capped by max-examples,
    as for one that declared nothing."""
    from fedpriv.privacy.distributed_noise import usable_size

    examples = record[msg.SCHEMA_EXAMPLES]
    size = usable_size(examples, record.get(msg.SCHEMA_PATIENTS, examples))
    if size is None:
        logger.warning(
            "%s declared %r training records of %r patients, which cannot be (whole numbers, "
            "at most one patient per record): it has no say in the run's limits",
            hospital,
            examples,
            record.get(msg.SCHEMA_PATIENTS, "(undeclared)"),
        )
    return size


def with_feature_statistics(plan: RunPlan, statistics: str) -> RunPlan:
    """The plan once the hospitals' feature statistics are combined (normalisation
    federated): the run configuration carries them to every hospital and into config.json;
    the simulation's central test split is normalised by them too."""
    from fedpriv.data import dataset_for

    config = plan.config.replace(feature_statistics=statistics)
    plan.run_dir.write_config(config, model_name=plan.model_name, model_args=plan.model_args)
    central = plan.central
    if central is not None:
        central = _central_evaluator(
            config,
            dataset_for(config),
            plan.run_dir.read_partitions(),
            plan.model_name,
            plan.model_args,
        )
    return dataclasses.replace(plan, config=config, central=central)


def _central_evaluator(
    config: RunConfig,
    dataset: Dataset,
    split: FederatedSplit,
    model_name: str,
    model_args: dict[str, Any],
) -> CentralEvaluator:
    """Accuracy on the central test split: the simulation harness only, never a hospital."""
    features = dataset.features[split.test]
    labels = dataset.labels[split.test]

    def evaluate_weights(weights: dict[str, np.ndarray]) -> dict[str, float]:
        model = build(model_name, **model_args)
        set_weights(model, weights)
        loader = make_loader(features, labels, batch_size=1024, shuffle=False)
        stats = evaluate(
            model, loader, criterion=torch.nn.CrossEntropyLoss(), device=torch.device("cpu")
        )
        return {"test_loss": stats.loss, "test_accuracy": stats.accuracy}

    return evaluate_weights


def initial_weights(
    model_name: str, model_args: dict[str, Any], seed: int
) -> dict[str, np.ndarray]:
    return initial_state(model_name, seed, **model_args)
