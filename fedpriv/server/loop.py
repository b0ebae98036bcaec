"""THE round loop: drives any Message-API strategy through its four hooks.

Flower's ``Strategy.start()`` owns a loop too, but it cannot resume from a checkpoint, skip
hospitals that declined a round, or hand each finished round to the caller; this loop does
all three and nothing else. Every strategy (ours and Flower's stock ones) runs through it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv import messages as msg
from fedpriv.protocols.base import UNUSABLE
from fedpriv.server.exchange import send_and_receive
from fedpriv.server.interop import read_flower_reply
from fedpriv.strategies.fedavg import hospital_name

__all__ = ["RoundOutcome", "run_rounds", "wait_for_hospitals"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """What one round produced, as the server saw it."""

    round: int
    arrays: ArrayRecord
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    hospitals: dict[str, dict[str, Any]]
    declined: dict[str, str]
    failed: dict[str, str]
    seconds: float
    privacy: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: which round's model ``eval_metrics`` describe (secure aggregation evaluates the model
    #: the hospitals trained from while it unmasks; the last round's is evaluated at the end)
    evaluated_round: int = 0
    #: the protocol's refusals, and why a round's aggregate failed (the model then stays)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    aggregate_failure: str = ""
    #: with evaluation carried on training replies, the last round also reports the
    #: carried evaluation of the round before (its own row describes the final model)
    previous_evaluation: dict[str, float] = dataclasses.field(default_factory=dict)


class FederationStopped(Exception):
    """Too few hospitals are left to go on; the run ends cleanly with what it has."""


def wait_for_hospitals(
    grid: Grid, count: int, timeout: float, *, minimum: int | None = None, grace: float = 10.0
) -> int:
    """Block until ``count`` hospitals are connected, or until ``timeout`` passes; once
    ``minimum`` are connected, wait at most ``grace`` more seconds for the others (a
    hospital that dropped out must not hold everyone back). Returns how many connected."""
    started = time.monotonic()
    enough_since: float | None = None
    connected = len(list(grid.get_node_ids()))
    while connected < count and time.monotonic() - started < timeout:
        if minimum is not None and connected >= minimum:
            enough_since = enough_since or time.monotonic()
            if time.monotonic() - enough_since >= grace:
                break
        time.sleep(0.2)
        connected = len(list(grid.get_node_ids()))
    return connected


def _split_replies(
    replies: Iterable[Message], sent: dict[str, int] | None = None
) -> tuple[list[Message], dict[str, str], dict[str, str]]:
    """Successful replies, declines and failures. ``sent`` maps the message ids sent to
    their destination node: an error reply may come from the SuperLink itself (e.g. "node
    unavailable" for a hospital that dropped out), and should name the node it was for; a
    message with no reply at all (the round timed out first) is a failure too."""
    ok: list[Message] = []
    declined: dict[str, str] = {}
    failed: dict[str, str] = {}
    answered: set[str] = set()
    for reply in replies:
        read_flower_reply(reply)  # a stock Flower ClientApp's reply, in fedpriv's form
        answered.add(reply.metadata.reply_to_message_id)
        if reply.has_error():
            node = (sent or {}).get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            who = f"node {node}"
            failed[who] = str(reply.error.reason).strip().splitlines()[-1][:500]
            continue
        status = reply.content.config_records.get(msg.HOSPITAL, ConfigRecord()).get(
            msg.STATUS, msg.STATUS_OK
        )
        if status == msg.STATUS_DECLINED:
            record = reply.content[msg.HOSPITAL]
            declined[hospital_name(reply.content)] = str(record.get(msg.REASON, ""))
        else:
            ok.append(reply)
    for message_id, node in (sent or {}).items():
        if message_id not in answered:
            failed[f"node {node}"] = "no reply before the round timeout (round-timeout)"
    return ok, declined, failed


def _destinations(messages: Iterable[Message]) -> dict[str, int]:
    return {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }


def _privacy_reports(replies: Iterable[Message]) -> dict[str, dict[str, Any]]:
    """Each hospital's reported privacy spend (JSON in its PRIVACY record), by name."""
    reports: dict[str, dict[str, Any]] = {}
    for reply in replies:
        if reply.has_error():
            continue
        record = reply.content.config_records.get(msg.PRIVACY)
        if record is None:
            continue
        try:
            reports[hospital_name(reply.content)] = json.loads(str(record[msg.PRIVACY_JSON]))
        except (KeyError, ValueError):
            logger.warning(
                "ignoring a malformed privacy report from %s", hospital_name(reply.content)
            )
    return reports


def _per_hospital(replies: Iterable[Message], examples_key: str) -> dict[str, dict[str, Any]]:
    """Each hospital's own metrics, snake_case, its example count under ``examples_key``."""
    table: dict[str, dict[str, Any]] = {}
    for reply in replies:
        record = reply.content.metric_records.get(msg.METRICS, MetricRecord())
        values: dict[str, Any] = {k.replace("-", "_"): v for k, v in record.items()}
        count = values.pop("num_examples", None)
        if count is not None:
            values[examples_key] = count
        table[hospital_name(reply.content)] = values
    return table


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    *,
    arrays: ArrayRecord,
    first_round: int,
    last_round: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    min_hospitals: int,
    timeout: float,
    on_round: Callable[[RoundOutcome], None],
    on_stop: Callable[[dict[str, dict[str, Any]]], None] = lambda privacy: None,
) -> ArrayRecord:
    """Rounds ``first_round..last_round``; returns the final global arrays.

    A round whose training replies come from fewer than ``min_hospitals`` hospitals ends
    the run (``on_stop`` gets that round's privacy reports, e.g. of hospitals that declined):
    the last good global model is kept.

    Unless the protocol's evaluation exchange does more than evaluate, a round is one
    exchange: each training reply also carries the hospital's evaluation of the model it
    received (``msg.EVALUATION``), recorded as the previous round's evaluation; the last
    round's model is evaluated in one more exchange (:func:`carries_evaluation` says when).
    Hospitals that ignore the request (e.g. a stock Flower ClientApp) get the separate
    evaluation exchange instead.
    """
    side = getattr(strategy, "aggregator", None)
    # CKKS under one exchange a round: the hospitals check each aggregate when the next
    # round's order brings it (decrypting it to evaluate and train from it); until most of
    # them could use it, the last checked model is kept to fall back on (a resumed run's
    # restored aggregate has not been checked yet: nothing to fall back on)
    verify = carries_evaluation(strategy) and bool(getattr(side, "verified_on_evaluate", False))
    checked: ArrayRecord | None = arrays if first_round == 1 else None
    for server_round in range(first_round, last_round + 1):
        started = time.perf_counter()
        logger.info("[ROUND %d/%d]", server_round, last_round)
        # read once a round, before the round's order: secure aggregation takes one
        # exchange or two depending on how the rounds before it went
        carry = carries_evaluation(strategy)
        deferred = bool(getattr(side, "completes_on_evaluate", False))
        order = ConfigRecord(dict(train_config))
        if carry:
            order[msg.EVALUATE_RECEIVED] = True
        train_messages = list(strategy.configure_train(server_round, arrays, order, grid))
        replies = list(send_and_receive(grid, train_messages, timeout=timeout))
        logger.info(
            "round %d: %d of %d replies after %.1f s",
            server_round,
            len(replies),
            len(train_messages),
            time.perf_counter() - started,
        )
        ok, declined, failed = _split_replies(replies, _destinations(train_messages))
        privacy = _privacy_reports(replies)
        for who, reason in declined.items():
            logger.warning("round %d: %s declined: %s", server_round, who, reason)
        for who, reason in failed.items():
            logger.warning("round %d: %s failed: %s", server_round, who, reason)
        if verify and side is not None:
            unusable = _unusable(replies)
            failure = side.verdict(unusable, len(ok) + len(declined))
            if failure:
                if checked is None:
                    raise FederationStopped(
                        f"round {server_round}: the aggregate restored from the checkpoint "
                        f"is unusable: {failure}"
                    )
                arrays = checked
                _discarded_round(
                    strategy,
                    grid,
                    server_round=server_round,
                    last_round=last_round,
                    arrays=arrays,
                    ok=ok,
                    declined=declined,
                    failed=failed,
                    privacy=privacy,
                    failure=failure,
                    started=started,
                    evaluate_config=evaluate_config,
                    timeout=timeout,
                    on_round=on_round,
                )
                continue
            if unusable:
                logger.warning(
                    "round %d: a minority could not use the aggregate it received: %s",
                    server_round,
                    unusable,
                )
            checked = arrays  # most hospitals decrypted and used it
        if len(ok) < min_hospitals:
            on_stop(privacy)
            detail = "; ".join(f"{k}: {v}" for k, v in {**failed, **declined}.items())
            raise FederationStopped(
                f"round {server_round}: only {len(ok)} hospital(s) trained, fewer than "
                f"min-hospitals={min_hospitals}" + (f" ({detail})" if detail else "")
            )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, ok)
        failure = ""
        if new_arrays is None and not deferred:
            # a protocol that says why (a one-exchange secure-aggregation round someone
            # missed) loses the round, not the run: the model stays
            failure = str(getattr(side, "failure", "") or "")
            if not failure:
                raise FederationStopped(f"round {server_round}: no usable update to aggregate")
            logger.warning("round %d: no aggregate: %s", server_round, failure)
            new_arrays = arrays
        hospitals = _per_hospital(ok, "train_examples")

        carried = _carried_evaluations(replies) if carry else []
        previous: dict[str, float] = {}
        if carried:  # one exchange: the replies evaluated the model they trained from
            assert new_arrays is not None
            eval_ok = carried
            eval_failed: dict[str, str] = {}
            eval_metrics = strategy.aggregate_evaluate(server_round, carried)
            evaluated = server_round - 1
            if server_round == last_round:  # the final model, evaluated once
                previous = {"round": evaluated, **_plain(eval_metrics)}
                final = _final_evaluation(
                    strategy, grid, server_round, new_arrays, evaluate_config, timeout
                )
                final_replies, eval_ok, eval_declined, eval_failed, eval_metrics = final
                evaluated = server_round
                if verify and side is not None:  # the final aggregate is checked here
                    unusable = _unusable(final_replies)
                    failure = side.verdict(unusable, len(eval_ok) + len(eval_declined))
                    if failure:
                        logger.warning("round %d: %s", server_round, failure)
                        new_arrays = arrays  # the model this round trained from stays
                        eval_metrics = strategy.aggregate_evaluate(server_round, carried)
                        evaluated = server_round - 1
                        eval_ok, previous = carried, {}
        else:
            # evaluation: of the new model, or (deferred) of the model the hospitals trained
            # from, while the same exchange carries what the protocol needs to finish the round
            evaluation = ConfigRecord(dict(evaluate_config))
            if deferred and side is not None:
                for key, value in side.evaluate_extra().items():
                    evaluation[key] = value
            eval_messages = list(
                strategy.configure_evaluate(
                    server_round,
                    arrays if deferred or new_arrays is None else new_arrays,
                    evaluation,
                    grid,
                )
            )
            eval_replies = list(send_and_receive(grid, eval_messages, timeout=timeout))
            eval_ok, eval_declined, eval_failed = _split_replies(
                eval_replies, _destinations(eval_messages)
            )
            for who, reason in eval_failed.items():
                logger.warning("round %d: evaluation at %s failed: %s", server_round, who, reason)
            eval_metrics = strategy.aggregate_evaluate(server_round, eval_ok)
            evaluated = server_round - 1 if deferred else server_round
            if side is not None and getattr(side, "verified_on_evaluate", False):
                # the hospitals decrypted the new aggregate: if most cannot use it, drop it
                unusable = _unusable(eval_replies)
                failure = side.verdict(unusable, len(eval_ok) + len(eval_declined))
                if failure:
                    logger.warning("round %d: %s", server_round, failure)
                    new_arrays, eval_metrics = arrays, None  # the global model stays
                elif unusable:
                    logger.warning(
                        "round %d: a minority could not use the aggregate: %s",
                        server_round,
                        unusable,
                    )
            if deferred and side is not None:
                new_arrays = side.complete(_protocol_records(eval_ok))
                if new_arrays is None:
                    failure = side.failure
                    logger.warning("round %d: no aggregate: %s", server_round, failure)
                    new_arrays = arrays  # the global model stays what it was
                if server_round == last_round:  # the final model, evaluated once
                    final = _final_evaluation(
                        strategy, grid, server_round, new_arrays, evaluate_config, timeout
                    )
                    _, eval_ok, _, _, eval_metrics = final
                    evaluated = server_round
        assert new_arrays is not None
        arrays = new_arrays
        for name, entry in _per_hospital(eval_ok, "num_examples").items():
            hospitals.setdefault(name, {}).update(entry)
        on_round(
            RoundOutcome(
                round=server_round,
                arrays=arrays,
                train_metrics=_plain(train_metrics),
                eval_metrics=_plain(eval_metrics),
                hospitals=hospitals,
                declined=declined,
                failed={**failed, **{f"{k} (evaluate)": v for k, v in eval_failed.items()}},
                seconds=time.perf_counter() - started,
                privacy=privacy,
                evaluated_round=evaluated,
                rejected=dict(getattr(side, "rejected", []) or []),
                aggregate_failure=failure,
                previous_evaluation=previous,
            )
        )
    return arrays


def _final_evaluation(
    strategy: Strategy,
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
) -> tuple[list[Message], list[Message], dict[str, str], dict[str, str], MetricRecord | None]:
    """The final model's one evaluation exchange: every reply, the successful ones, the
    declines, the failures, and the aggregated metrics."""
    messages = list(
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid)
    )
    replies = list(send_and_receive(grid, messages, timeout=timeout))
    ok, declined, failed = _split_replies(replies, _destinations(messages))
    return replies, ok, declined, failed, strategy.aggregate_evaluate(server_round, ok)


def carries_evaluation(strategy: Strategy) -> bool:
    """Whether a round's evaluation can ride on the next round's training replies: only with
    fedpriv's own strategies (Flower's stock ones accept exactly one MetricRecord per reply),
    when every hospital trains each round (otherwise some would go unevaluated), and not
    when the protocol's evaluation exchange also finishes the round (secure aggregation's
    unmasking needs the survivors' answers before the next model exists).

    A protocol whose hospitals check each aggregate (CKKS) carries it too: the check rides
    on the next round's training replies, and an aggregate most hospitals cannot use is
    discarded there with the updates trained from it (:func:`_discarded_round`)."""
    side = getattr(strategy, "aggregator", None)
    if side is None or float(getattr(strategy, "fraction_train", 1.0)) < 1.0:
        return False
    return not getattr(side, "completes_on_evaluate", False)


def _discarded_round(
    strategy: Strategy,
    grid: Grid,
    *,
    server_round: int,
    last_round: int,
    arrays: ArrayRecord,
    ok: list[Message],
    declined: dict[str, str],
    failed: dict[str, str],
    privacy: dict[str, dict[str, Any]],
    failure: str,
    started: float,
    evaluate_config: ConfigRecord,
    timeout: float,
    on_round: Callable[[RoundOutcome], None],
) -> None:
    """Most hospitals could not use the aggregate this round's order brought (the previous
    round's): it is discarded, and so are the updates the others trained from it; the last
    checked model (``arrays``) stays. The round's DP spend at the hospitals that trained
    stays on their ledgers (the planned number of rounds is not exceeded: nothing is
    retrained). The last round's model is evaluated once, as after any last round."""
    reason = (
        f"round {server_round - 1}'s aggregate is discarded: {failure}; "
        f"the {len(ok)} update(s) of round {server_round} trained from it are discarded too"
    )
    logger.warning("round %d: %s", server_round, reason)
    eval_metrics: MetricRecord | None = None
    eval_ok: list[Message] = []
    eval_failed: dict[str, str] = {}
    evaluated = server_round - 1
    if server_round == last_round:
        final = _final_evaluation(strategy, grid, server_round, arrays, evaluate_config, timeout)
        _, eval_ok, _, eval_failed, eval_metrics = final
        evaluated = server_round
    hospitals = _per_hospital(ok, "train_examples")
    for name, entry in _per_hospital(eval_ok, "num_examples").items():
        hospitals.setdefault(name, {}).update(entry)
    on_round(
        RoundOutcome(
            round=server_round,
            arrays=arrays,
            train_metrics={},
            eval_metrics=_plain(eval_metrics),
            hospitals=hospitals,
            declined=declined,
            failed={**failed, **{f"{k} (evaluate)": v for k, v in eval_failed.items()}},
            seconds=time.perf_counter() - started,
            privacy=privacy,
            evaluated_round=evaluated,
            rejected={},
            aggregate_failure=reason,
        )
    )


def _carried_evaluations(replies: Iterable[Message]) -> list[Message]:
    """The evaluations the training replies carried, as evaluation replies look (the
    hospital's record and its metrics), for the strategy's ``aggregate_evaluate``."""
    out: list[Message] = []
    for reply in replies:
        if reply.has_error() or msg.EVALUATION not in reply.content.metric_records:
            continue
        content = RecordDict({msg.METRICS: reply.content.metric_records[msg.EVALUATION]})
        if msg.HOSPITAL in reply.content.config_records:
            content[msg.HOSPITAL] = reply.content.config_records[msg.HOSPITAL]
        out.append(
            Message(
                content=content,
                dst_node_id=int(reply.metadata.src_node_id),
                message_type=MessageType.EVALUATE,
            )
        )
    return out


def _protocol_records(replies: Iterable[Message]) -> dict[int, dict[str, Any]]:
    """Each evaluation reply's protocol record (e.g. unmasking shares), by node."""
    out: dict[int, dict[str, Any]] = {}
    for reply in replies:
        record = reply.content.config_records.get(msg.PROTOCOL)
        if record is not None:
            out[int(reply.metadata.src_node_id)] = dict(record)
    return out


def _unusable(replies: Iterable[Message]) -> dict[str, str]:
    """Hospitals that reported the new aggregate unusable, and why."""
    out: dict[str, str] = {}
    for reply in replies:
        if reply.has_error():
            continue
        record = reply.content.config_records.get(msg.PROTOCOL)
        if record is not None and UNUSABLE in record:
            out[hospital_name(reply.content)] = str(record[UNUSABLE])[:300]
    return out


def _plain(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k.replace("-", "_"): float(v) for k, v in record.items() if isinstance(v, int | float)}
