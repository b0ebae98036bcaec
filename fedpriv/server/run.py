"""Serving a prepared run: the hospitals' connection, a protocol's setup, the rounds, and what
each round leaves in the run directory. Shared by ``fedpriv simulate`` and ``flwr run``.

The pieces live by job: :mod:`fedpriv.server.prepare` (before anything starts),
:mod:`fedpriv.server.views` (privacy.json, he.json), this module (the serving).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpriv import messages as msg
from fedpriv.config import RunConfig
from fedpriv.errors import FedprivError
from fedpriv.privacy.he import Layout
from fedpriv.protocols.base import ServerSide, create_protocol
from fedpriv.protocols.checks import Limits
from fedpriv.protocols.ckks import KEYS_DIR, array_to_numpy, server_keys
from fedpriv.server.exchange import send_and_receive
from fedpriv.server.loop import FederationStopped, RoundOutcome, run_rounds, wait_for_hospitals
from fedpriv.server.prepare import (
    CentralEvaluator,
    RunPlan,
    initial_weights,
    prepare_run,
    resolve_model,
    resolve_model_from_hospitals,
)
from fedpriv.server.rundir import FLOWER_LOG, RunDirectory
from fedpriv.server.statistics import gather_statistics, needs_statistics
from fedpriv.server.views import HeLog, PrivacyView
from fedpriv.strategies import create_strategy
from fedpriv.strategies.fedavg import hospital_name

__all__ = [
    "KEYS_DIR",
    "CentralEvaluator",
    "RunPlan",
    "ServeOutcome",
    "build_server_app",
    "flower_logging",
    "initial_weights",
    "make_server_side",
    "prepare_run",
    "resolve_model",
    "resolve_model_from_hospitals",
    "serve",
    "server_keys",
]

logger = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]

#: how long the server waits for the run's hospitals to connect before starting anyway
NODE_WAIT_SECONDS = 300.0
#: seconds between the simulation grid's checks for replies
GRID_PULL_INTERVAL = 0.005


@dataclasses.dataclass
class ServeOutcome:
    """Filled in by :func:`serve` (it runs on Flower's server thread)."""

    last_round: int = 0
    stopped: str = ""
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _to_weights(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: array_to_numpy(v) for k, v in arrays.items()}


def _row(outcome: RoundOutcome, central: dict[str, float], seconds: float) -> dict[str, Any]:
    tm, em = outcome.train_metrics, outcome.eval_metrics
    extra: dict[str, Any] = {}
    if outcome.evaluated_round != outcome.round:
        extra["evaluated_round"] = outcome.evaluated_round  # eval_* describe that round's model
    if outcome.rejected:
        extra["rejected"] = outcome.rejected
    if outcome.aggregate_failure:
        extra["aggregate_failure"] = outcome.aggregate_failure
    if outcome.previous_evaluation:  # the carried evaluation of the round before the last
        extra["previous_evaluation"] = outcome.previous_evaluation
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
        **extra,
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

    config = plan.config
    outcome = outcome if outcome is not None else ServeOutcome()
    first_round = plan.resume.round + 1 if plan.resume is not None else 1
    # a deployment's hospitals say what the model must fit; with normalisation federated
    # they release their feature statistics (once per run): both need them connected
    if not plan.model_name or needs_statistics(plan.config):
        wait_for_hospitals(
            grid,
            config.hospitals,
            NODE_WAIT_SECONDS,
            minimum=min(config.min_hospitals, config.hospitals),
        )
    if not plan.model_name:
        early = None
        if config.protocol == "secagg" and first_round <= config.rounds:
            from fedpriv.protocols.secagg import QUERY_KEYS, keys_query

            # the keys' exchange rides on the schema query: one exchange fewer
            early = (QUERY_KEYS, keys_query(first_round, config.rounds))
        plan = resolve_model_from_hospitals(grid, plan, early=early)
    if hasattr(grid, "pull_interval"):
        # an unwrapped in-memory grid (Flower's default: 0.1 s). A simulation's grid is
        # wrapped (fedpriv.server.stopping.StoppableGrid) and keeps 0.1 s: at 1,000 hospitals
        # a 5 ms poll was slower (BENCHMARKS, "The simulation's poll interval")
        grid.pull_interval = GRID_PULL_INTERVAL
    if needs_statistics(plan.config):
        plan = gather_statistics(grid, plan)
        config = plan.config
    layout = Layout.of(initial_weights(plan.model_name, plan.model_args, config.seed))
    aggregator = make_server_side(
        config, layout=layout, declared=plan.declared, patients=plan.declared_patients
    )
    strategy = create_strategy(config.strategy, config=config, aggregator=aggregator)
    strategy.summary()
    ledger_view = PrivacyView(plan.run_dir, config, aggregator)
    if plan.resume is not None:
        ledger_view.load()
    if plan.resume is not None:
        weights = plan.resume.weights
        logger.info("resuming %s after round %d", plan.run_dir.path, plan.resume.round)
    elif config.he:
        # Under HE the server never holds a plaintext model: the hospitals build the
        # initial one themselves from the seed (an empty record says so).
        weights = {}
    else:
        weights = initial_weights(plan.model_name, plan.model_args, config.seed)
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
    if first_round <= config.rounds:
        aggregator.first, aggregator.last = first_round, config.rounds
        aggregator.setup(
            grid,
            sorted(grid.get_node_ids()),
            lambda kind, contents: _setup_exchange(grid, order, kind, contents, config),
            early=plan.early_answers,
            early_query=plan.early_query,
        )

    def plaintext(arrays: ArrayRecord) -> dict[str, np.ndarray] | None:
        if not aggregator.encrypted:
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
        row["aggregation"] = {
            "protocol": config.protocol,
            **{k: v for k, v in aggregator.stats.items() if isinstance(v, int | float | str)},
        }
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


def make_server_side(
    config: RunConfig,
    *,
    layout: Layout,
    declared: Mapping[str, int],
    patients: Mapping[str, int] | None = None,
) -> ServerSide:
    """The run's protocol, server side, with the limits it checks every claim against."""
    limits = Limits(
        max_examples=config.max_examples, declared=dict(declared), patients=dict(patients or {})
    )
    weight_unit = float(max(declared.values())) if declared else float(config.max_examples)
    side = create_protocol(config.protocol).server(
        config, limits=limits, length=layout.size, weight_unit=weight_unit
    )
    side.stats["parameters"] = layout.size
    return side


def _setup_exchange(
    grid: Grid,
    order: ConfigRecord,
    kind: str,
    contents: Mapping[int, Mapping[str, Any]],
    config: RunConfig,
) -> dict[int, tuple[str, dict[str, Any]]]:
    """One setup exchange of a protocol: ``contents`` per node (JSON-able values go in its
    setup entry, bytes as they are); the answers ``{node: (hospital, record)}``."""
    from fedpriv.protocols.secagg import SETUP

    messages = []
    for node, content in contents.items():
        values: dict[str, Any] = {k: v for k, v in content.items() if isinstance(v, bytes)}
        values[SETUP] = json.dumps({k: v for k, v in content.items() if not isinstance(v, bytes)})
        record = ConfigRecord(values)
        messages.append(
            Message(
                content=RecordDict(
                    {
                        msg.CONFIG: ConfigRecord({**dict(order), msg.QUERY: kind}),
                        msg.PROTOCOL: record,
                    }
                ),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
        )
    answers: dict[int, tuple[str, dict[str, Any]]] = {}
    for reply in send_and_receive(grid, messages, timeout=config.round_timeout):
        if reply.has_error():
            logger.warning(
                "%s: node %s failed: %s",
                kind,
                reply.metadata.src_node_id,
                str(reply.error.reason).strip().splitlines()[-1][:300],
            )
            continue
        answer = reply.content.config_records.get(msg.PROTOCOL)
        if answer is None:
            raise FedprivError(f"{kind}: {hospital_name(reply.content)} sent no answer")
        answers[int(reply.metadata.src_node_id)] = (hospital_name(reply.content), dict(answer))
    return answers


def build_server_app(
    plan: RunPlan,
    *,
    on_round: RoundCallback | None = None,
    outcome: ServeOutcome | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp bound to one prepared run (the in-process simulation uses this); once
    ``stop`` is set, its next call to the grid raises (see fedpriv.server.stopping)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if stop is not None:
            from fedpriv.server.stopping import StoppableGrid

            stoppable = StoppableGrid(grid, stop)
            try:
                serve(stoppable, plan, on_round=on_round, outcome=outcome)
            finally:
                stoppable.close()
            return
        serve(grid, plan, on_round=on_round, outcome=outcome)

    return app


@contextlib.contextmanager
def flower_logging(run_dir: RunDirectory, *, quiet: bool) -> Iterator[Path]:
    """Send Flower's and fedpriv's log records to ``flower.log`` in the run directory.

    With ``quiet`` the terminal gets none of them (the CLI shows its own progress instead);
    without, fedpriv's records also go to Flower's console handler: in a ServerApp process
    that Flower started, what it writes is what ``flwr run --stream`` and ``flwr log`` show
    (a handler only on "fedpriv" would keep them in the file).
    """
    path = run_dir.file(FLOWER_LOG)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flwr_logger = logging.getLogger("flwr")
    ours = logging.getLogger("fedpriv")
    saved = (list(flwr_logger.handlers), ours.propagate, ours.level, flwr_logger.propagate)
    shown = [] if quiet else _flower_console_handlers(flwr_logger)
    for console in shown:
        ours.addHandler(console)
        ours.propagate = False  # a root handler (some libraries add one) would print it twice
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
        for console in shown:
            ours.removeHandler(console)
        handler.close()
        if quiet:
            for existing in saved[0]:
                if existing not in flwr_logger.handlers:
                    flwr_logger.addHandler(existing)
        ours.propagate, ours.level, flwr_logger.propagate = saved[1], saved[2], saved[3]


def _flower_console_handlers(flwr_logger: logging.Logger) -> list[logging.Handler]:
    """The handlers Flower writes its own terminal lines with (its ConsoleHandler)."""
    from flwr.common.logger import ConsoleHandler

    return [h for h in flwr_logger.handlers if isinstance(h, ConsoleHandler)]
