"""Preparing a run and serving it: shared by ``fedpriv simulate`` and ``flwr run``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.data import Dataset, FederatedSplit, split_for
from fedpriv.errors import ConfigError
from fedpriv.models import build, default_model, initial_state, replace_batchnorm
from fedpriv.privacy.dp import DpEvent, batchnorm_layers, compose_epsilon
from fedpriv.privacy.he import PUBLIC_FILE, Layout, load_context
from fedpriv.server.loop import FederationStopped, RoundOutcome, run_rounds, wait_for_hospitals
from fedpriv.server.rundir import FLOWER_LOG, Checkpoint, RunDirectory, new_run_name
from fedpriv.strategies import Aggregator, PlainAggregator, create_strategy
from fedpriv.strategies.ckks import CIPHERTEXT, CkksAggregator, array_to_numpy
from fedpriv.strategies.client_dp import ClientLevelDpAggregator
from fedpriv.strategies.fedavg import hospital_name
from fedpriv.training import evaluate, make_loader, resolve_device, set_weights

__all__ = [
    "RunPlan",
    "ServeOutcome",
    "build_server_app",
    "flower_logging",
    "initial_weights",
    "prepare_run",
    "serve",
]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
CentralEvaluator = Callable[[dict[str, np.ndarray]], dict[str, float]]

#: where a simulation keeps its CKKS key files unless --keys says otherwise
KEYS_DIR = "keys"
#: how long the server waits for the run's hospitals to connect before starting anyway
NODE_WAIT_SECONDS = 300.0
#: seconds between the simulation grid's checks for replies
GRID_PULL_INTERVAL = 0.005


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
    decrypt: Callable[[ArrayRecord], dict[str, np.ndarray]] | None = None


@dataclasses.dataclass
class ServeOutcome:
    """Filled in by :func:`serve` (it runs on Flower's server thread)."""

    last_round: int = 0
    stopped: str = ""
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def resolve_model(config: RunConfig, dataset: Dataset) -> tuple[str, dict[str, Any]]:
    return default_model(
        kind=dataset.kind,
        input_shape=tuple(dataset.features.shape[1:]),
        num_classes=dataset.num_classes,
        name=config.model,
        width=config.model_width,
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
    """What strategy, HE and client-level DP allow together (simulation and deployment)."""
    from fedpriv.strategies import available_strategies, is_stock

    if config.strategy not in available_strategies():
        raise ConfigError(
            f"unknown strategy '{config.strategy}': use one of {', '.join(available_strategies())}"
        )
    if config.client_level_dp and is_stock(config.strategy):
        raise ConfigError(
            f"--dp-level {config.dp_level} clips hospitals' updates inside fedpriv's own "
            f"aggregation; Flower's '{config.strategy}' does its own: use fedavg or fedsgd"
        )
    if config.he and is_stock(config.strategy):
        raise ConfigError(
            f"--he needs the server to only add ciphertexts; Flower's '{config.strategy}' "
            "averages plaintext itself: use fedavg or fedsgd"
        )
    if config.he and config.client_level_dp:
        raise ConfigError(
            f"--dp-level {config.dp_level} clips each hospital's update at the server, which "
            "cannot see updates under --he: use --dp-level sample with --he"
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
        model_name, model_args = resolve_model(config, dataset)
        model_args, notices = _check_model(config, model_name, model_args)
        notices += _check_dp(config, dataset, split)
        config, run_dir = _new_run_directory(config)
        run_dir.write_config(config, model_name=model_name, model_args=model_args)
        run_dir.write_partitions(split)
        checkpoint = None
    evaluator = (
        _central_evaluator(config, dataset, split, model_name, model_args) if central else None
    )
    return RunPlan(
        config=config,
        model_name=model_name,
        model_args=model_args,
        run_dir=run_dir,
        central=evaluator,
        resume=checkpoint,
        notices=tuple(notices),
    )


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
    )
    return config, run_dir


def _prepare_deployment(config: RunConfig, *, resume_dir: str | Path | None) -> RunPlan:
    """A real federation: the server holds no data, so no split, no central test, and the
    model is resolved from the hospitals' schemas once they connect."""
    _check_strategy(config)
    notices = _check_dp_settings(config)
    if resume_dir is not None:
        run_dir, config, model_name, model_args = _reopen(resume_dir, config)
        checkpoint = _restart(run_dir, config, model_name, model_args)
        return RunPlan(
            config=config,
            model_name=model_name,
            model_args=model_args,
            run_dir=run_dir,
            central=None,
            resume=checkpoint,
            notices=tuple(notices),
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


def _check_dp_settings(config: RunConfig) -> list[str]:
    if not config.dp:
        return [
            "DP is OFF: hospitals that require DP (the default) will decline every round, the "
            "others' records are unprotected"
        ]
    return []


def resolve_model_from_hospitals(grid: Grid, plan: RunPlan) -> RunPlan:
    """Ask every connected hospital for its data schema; all must agree on the features."""
    content = RecordDict(
        {msg.CONFIG: ConfigRecord({**plan.config.to_mapping(), msg.QUERY: msg.QUERY_SCHEMA})}
    )
    messages = [
        Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
        for node in sorted(grid.get_node_ids())
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    deltas: dict[str, float] = {}
    classes = 0
    errors = []
    for reply in grid.send_and_receive(messages, timeout=plan.config.round_timeout):
        if reply.has_error():
            errors.append(str(reply.error.reason).strip().splitlines()[-1][:300])
            continue
        record = reply.content.config_records[msg.SCHEMA]
        shape = tuple(int(d) for d in record[msg.SCHEMA_SHAPE])  # type: ignore[union-attr]
        shapes[hospital_name(reply.content)] = shape
        classes = max(classes, int(record[msg.SCHEMA_CLASSES]))  # type: ignore[arg-type]
        if msg.SCHEMA_LEDGER_DELTA in record:
            deltas[hospital_name(reply.content)] = float(record[msg.SCHEMA_LEDGER_DELTA])  # type: ignore[arg-type]
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
    )
    build(model_name, **model_args)
    plan.run_dir.write_config(plan.config, model_name=model_name, model_args=model_args)
    logger.info("model %s %s from %d hospitals' schemas", model_name, model_args, len(shapes))
    return dataclasses.replace(plan, model_name=model_name, model_args=model_args)


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


def _to_weights(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: array_to_numpy(v) for k, v in arrays.items()}


def _row(outcome: RoundOutcome, central: dict[str, float], seconds: float) -> dict[str, Any]:
    tm, em = outcome.train_metrics, outcome.eval_metrics
    return {
        "round": outcome.round,
        "train_loss": _num(tm.get("train_loss")),
        "eval_loss": _num(em.get("eval_loss")),
        "eval_accuracy": _num(em.get("eval_accuracy")),
        "test_loss": _num(central.get("test_loss")),
        "test_accuracy": _num(central.get("test_accuracy")),
        "seconds": round(seconds, 4),
        "hospitals": outcome.hospitals,
        "declined": outcome.declined,
        "failed": outcome.failed,
    }


def _trained(hospitals: dict[str, dict[str, Any]]) -> set[str]:
    """Who sent an update this round (their training metrics carry an example count)."""
    return {name for name, entry in hospitals.items() if "train_examples" in entry}


def _num(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def serve(
    grid: Grid,
    plan: RunPlan,
    *,
    on_round: RoundCallback | None = None,
    outcome: ServeOutcome | None = None,
) -> ServeOutcome:
    """Run the planned rounds on ``grid``: metrics, a checkpoint each round, the final model."""
    import time

    config = plan.config
    outcome = outcome if outcome is not None else ServeOutcome()
    if not plan.model_name:  # a deployment: the hospitals say what the model must fit
        wait_for_hospitals(
            grid,
            config.hospitals,
            NODE_WAIT_SECONDS,
            minimum=min(config.min_hospitals, config.hospitals),
        )
        plan = resolve_model_from_hospitals(grid, plan)
    if hasattr(grid, "pull_interval"):
        # Flower's in-memory grid (simulation) polls for replies every 0.1 s by default
        # (its documented constructor argument); at ~0.1 s of training per round that
        # polling alone would double the round time.
        grid.pull_interval = GRID_PULL_INTERVAL
    layout = Layout.of(initial_weights(plan.model_name, plan.model_args, config.seed))
    aggregator = make_aggregator(config, layout=layout)
    strategy = create_strategy(config.strategy, config=config, aggregator=aggregator)
    strategy.summary()
    ledger_view = PrivacyView(plan.run_dir, config, aggregator)
    if plan.resume is not None:
        ledger_view.load()
    if plan.resume is not None:
        weights = plan.resume.weights
        first_round = plan.resume.round + 1
        logger.info("resuming %s after round %d", plan.run_dir.path, plan.resume.round)
    elif config.he:
        # Under HE the server never holds a plaintext model: the hospitals build the
        # initial one themselves from the seed (an empty record says so).
        weights = {}
        first_round = 1
    else:
        weights = initial_weights(plan.model_name, plan.model_args, config.seed)
        first_round = 1
    outcome.last_round = first_round - 1
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()})
    he_log = HeLog(plan.run_dir, aggregator, layout) if config.he else None
    if he_log is not None:
        he_log.rounds = [r for r in he_log.rounds if r["round"] < first_round]
    order = ConfigRecord(
        msg.order_record(config, model_name=plan.model_name, model_args=plan.model_args)
    )
    connected = wait_for_hospitals(
        grid,
        config.hospitals,
        NODE_WAIT_SECONDS,
        minimum=min(config.min_hospitals, config.hospitals),
    )
    if connected < config.hospitals:
        logger.warning(
            "only %d of %d hospitals connected; starting without the others",
            connected,
            config.hospitals,
        )

    def plaintext(arrays: ArrayRecord) -> dict[str, np.ndarray] | None:
        if not config.he:
            return _to_weights(arrays)
        return plan.decrypt(arrays) if plan.decrypt is not None else None

    def finish_round(result: RoundOutcome) -> None:
        started = time.perf_counter()
        stored = _to_weights(result.arrays)  # ciphertexts under HE
        round_weights = plaintext(result.arrays)
        central = plan.central(round_weights) if plan.central and round_weights else {}
        if he_log is not None:
            he_log.record(result)
        ledger_view.update(
            result.privacy, rounds_done=result.round, trained=_trained(result.hospitals)
        )
        row = _row(result, central, result.seconds + time.perf_counter() - started)
        row["epsilon"] = ledger_view.epsilons()
        if row["epsilon"]:
            # an upper bound (RDP) during the run; the exact epsilon once a hospital computed it
            row["epsilon_exact"] = ledger_view.all_exact()
        if ledger_view.unaccounted:
            row["unaccounted"] = sorted(ledger_view.unaccounted)
        if config.client_level_dp:
            row["client_epsilon"] = ledger_view.client_level()["epsilon"]
        plan.run_dir.append_metrics(row)
        plan.run_dir.save_checkpoint(result.round, stored, {"strategy": config.strategy})
        outcome.last_round = result.round
        outcome.rows.append(row)
        if on_round is not None:
            on_round(row)

    final = arrays
    if first_round <= config.rounds:
        try:
            final = run_rounds(
                strategy,
                grid,
                arrays=arrays,
                first_round=first_round,
                last_round=config.rounds,
                train_config=order,
                evaluate_config=order,
                min_hospitals=min(config.min_hospitals, config.hospitals),
                timeout=config.round_timeout,
                on_round=finish_round,
                on_stop=lambda reports: ledger_view.update(reports, rounds_done=None),
            )
        except FederationStopped as stop:
            outcome.stopped = str(stop)
            logger.warning("run stopped early: %s", stop)
            checkpoint = plan.run_dir.load_checkpoint()
            if checkpoint is not None:
                final = ArrayRecord(
                    {k: Array(np.asarray(v)) for k, v in checkpoint.weights.items()}
                )
    if config.audit and outcome.last_round > 0 and len(final):
        from fedpriv.server.audit import federated_audit

        audit = federated_audit(grid, final, order, timeout=config.round_timeout)
        plan.run_dir.write_json("federated_audit.json", audit)
        logger.info(
            "federated LOSS audit: AUC %.3f over %d hospitals",
            audit["auc"],
            len(audit["per_hospital"]),
        )
    final_weights = plaintext(final) if len(final) else None
    if final_weights is not None:
        plan.run_dir.save_model(final_weights)
    elif len(final):
        # a real server under HE: keep the encrypted model; hospitals decrypt it themselves
        plan.run_dir.save_encrypted_model(_to_weights(final))
    return outcome


def server_keys(config: RunConfig) -> Path:
    """Where the server's public context lives: --keys DIR, or the run's keys/."""
    base = Path(config.keys) if config.keys else Path(config.out) / config.run_name / KEYS_DIR
    return base / PUBLIC_FILE


def make_aggregator(config: RunConfig, *, layout: Layout) -> Aggregator:
    if config.he:
        context = load_context(server_keys(config), role="server")
        return CkksAggregator(context=context, length=layout.size)
    if config.client_level_dp:
        return ClientLevelDpAggregator(
            clip_norm=config.client_clip_norm,
            noise_multiplier=config.client_noise_multiplier,
            adaptive=config.client_adaptive_clip,
            target_quantile=config.client_target_quantile,
            clip_lr=config.client_clip_lr,
            count_noise_std=config.client_count_noise,
        )
    return PlainAggregator()


class PrivacyView:
    """What the server knows of privacy: each hospital's latest report, who trained without
    reporting any accounting, and its own client-level accountant. Written to
    ``privacy.json`` after every round."""

    def __init__(self, run_dir: RunDirectory, config: RunConfig, aggregator: Aggregator) -> None:
        self.run_dir = run_dir
        self.config = config
        self.aggregator = aggregator
        self.hospitals: dict[str, dict[str, Any]] = {}
        #: hospitals that trained under sample-level DP without a privacy report: round
        self.unaccounted: dict[str, int] = {}
        self.client_rounds = 0

    def load(self) -> None:
        """On resume: start from what the run recorded so far."""
        saved = self.run_dir.read_privacy()
        self.hospitals = dict(saved.get("hospitals", {}))
        self.unaccounted = {str(k): int(v) for k, v in saved.get("unaccounted", {}).items()}
        self.client_rounds = int(saved.get("client_level", {}).get("rounds", 0))

    def update(
        self,
        reports: dict[str, dict[str, Any]],
        *,
        rounds_done: int | None,
        trained: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.hospitals.update(reports)
        if self.config.sample_level_dp:
            for name in sorted(trained):
                report = reports.get(name)
                if report is None or report.get("status") != "trained":
                    # it sent an update but no account of its DP: no epsilon can be claimed
                    self.unaccounted.setdefault(name, rounds_done or 0)
                    logger.warning(
                        "round %s: %s trained without reporting DP accounting: the run makes "
                        "no DP claim for it",
                        rounds_done,
                        name,
                    )
        if rounds_done is not None and self.config.client_level_dp:
            self.client_rounds += 1
        self.run_dir.write_privacy(self.document())

    def all_exact(self) -> bool:
        return all(
            bool(self.hospitals[name].get("epsilon_exact", True)) for name in self.epsilons()
        )

    def epsilons(self) -> dict[str, float]:
        return {
            name: float(r["epsilon"])
            for name, r in sorted(self.hospitals.items())
            if name not in self.unaccounted and "epsilon" in r
        }

    def client_level(self) -> dict[str, Any]:
        config = self.config
        sample_rate = min(
            1.0, max(1, round(config.hospitals * config.fraction_train)) / config.hospitals
        )
        event = DpEvent(config.client_noise_multiplier, sample_rate, self.client_rounds)
        epsilon = (
            compose_epsilon([event], delta=config.delta, accountant=config.accountant)
            if config.client_noise_multiplier > 0
            else float("inf")
        )
        return {
            "epsilon": epsilon,
            "delta": config.delta,
            "accountant": config.accountant,
            "noise_multiplier": config.client_noise_multiplier,
            "clip_norm": getattr(self.aggregator, "clip_norm", config.client_clip_norm),
            "adaptive_clip": config.client_adaptive_clip,
            "sample_rate": sample_rate,
            "rounds": self.client_rounds,
            "events": [
                {
                    "noise_multiplier": event.noise_multiplier,
                    "sample_rate": sample_rate,
                    "steps": self.client_rounds,
                }
            ],
            "unit": "one hospital (all its records)",
        }

    def document(self) -> dict[str, Any]:
        config = self.config
        claim = config.sample_level_dp and not self.unaccounted
        doc: dict[str, Any] = {
            "dp": config.dp and not self.unaccounted,
            "dp_level": config.dp_level if config.dp else "none",
            "dp_claim": claim,
            "unit": "one patient (all of their records) of one hospital",
            "hospitals": dict(sorted(self.hospitals.items())),
        }
        if self.unaccounted:
            doc["unaccounted"] = dict(sorted(self.unaccounted.items()))
            doc["no_claim_reason"] = (
                "hospitals trained without reporting DP accounting: "
                + ", ".join(sorted(self.unaccounted))
            )
        epsilons = self.epsilons()
        if claim and epsilons:
            # disjoint hospitals: the federation's per-patient guarantee is the maximum
            doc["max_epsilon"] = max(epsilons.values())
            doc["max_epsilon_exact"] = self.all_exact()
            doc["delta"] = max(
                float(self.hospitals[name].get("delta", config.delta)) for name in epsilons
            )
        if config.client_level_dp:
            doc["client_level"] = self.client_level()
        return doc


class HeLog:
    """``he.json``: per round, bytes up and down, bytes per parameter, time spent in HE."""

    def __init__(self, run_dir: RunDirectory, aggregator: Aggregator, layout: Layout) -> None:
        self.run_dir = run_dir
        self.aggregator = aggregator
        self.layout = layout
        self.rounds: list[dict[str, Any]] = []
        self.last_aggregate = 0  # what this round's trainers downloaded
        path = run_dir.file("he.json")
        if path.is_file():  # resuming: keep the rounds already recorded
            self.rounds = list(json.loads(path.read_text()).get("rounds", []))

    def record(self, result: RoundOutcome) -> None:
        aggregator = self.aggregator
        assert isinstance(aggregator, CkksAggregator)
        trained = [h for h in result.hospitals.values() if "train_examples" in h]
        uploads = aggregator.bytes_in
        aggregate = len(result.arrays[CIPHERTEXT].data) if CIPHERTEXT in result.arrays else 0
        evaluated = sum(1 for h in result.hospitals.values() if "num_examples" in h)
        encrypt = [float(h.get("he_encrypt_seconds", 0.0)) for h in trained]
        # a hospital decrypts each aggregate once, when it evaluates it (its evaluation
        # figure replaces its training reply's, which found the model already decrypted)
        decrypt = [
            float(h["he_decrypt_seconds"])
            for h in result.hospitals.values()
            if "he_decrypt_seconds" in h
        ]
        entry = {
            "round": result.round,
            "parameters": self.layout.size,
            "hospitals": len(trained),
            "bytes_up": uploads,
            "bytes_up_per_param": uploads / max(1, len(trained)) / self.layout.size,
            "plaintext_bytes_per_param": 4,
            # down: last round's aggregate to this round's trainers, this one's to evaluators
            "bytes_down": self.last_aggregate * len(trained) + aggregate * evaluated,
            "server_aggregate_seconds": aggregator.seconds,
            "client_encrypt_seconds_mean": sum(encrypt) / len(encrypt) if encrypt else 0.0,
            "client_decrypt_seconds_mean": sum(decrypt) / len(decrypt) if decrypt else 0.0,
            "rejected": [{"hospital": h, "reason": r} for h, r in aggregator.rejected],
        }
        self.rounds.append(entry)
        self.last_aggregate = aggregate
        self.run_dir.write_json("he.json", {"rounds": self.rounds})


def build_server_app(
    plan: RunPlan, *, on_round: RoundCallback | None = None, outcome: ServeOutcome | None = None
) -> ServerApp:
    """A ServerApp bound to one prepared run (the in-process simulation uses this)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, plan, on_round=on_round, outcome=outcome)

    return app


@contextlib.contextmanager
def flower_logging(run_dir: RunDirectory, *, quiet: bool) -> Iterator[Path]:
    """Send Flower's and fedpriv's log records to ``flower.log`` in the run directory.

    With ``quiet`` the terminal gets none of them (the CLI shows its own progress instead).
    """
    path = run_dir.file(FLOWER_LOG)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flwr_logger = logging.getLogger("flwr")
    ours = logging.getLogger("fedpriv")
    saved = (list(flwr_logger.handlers), ours.propagate, ours.level, flwr_logger.propagate)
    if quiet:
        for existing in list(flwr_logger.handlers):
            flwr_logger.removeHandler(existing)
        # Opacus configures the root logger on import; nothing may reach the terminal
        ours.propagate = False
        flwr_logger.propagate = False
    flwr_logger.addHandler(handler)
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        yield path
    finally:
        flwr_logger.removeHandler(handler)
        ours.removeHandler(handler)
        handler.close()
        if quiet:
            for existing in saved[0]:
                if existing not in flwr_logger.handlers:
                    flwr_logger.addHandler(existing)
        ours.propagate, ours.level, flwr_logger.propagate = saved[1], saved[2], saved[3]
