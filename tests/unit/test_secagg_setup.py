"""Secure aggregation's set-up in a deployment: the key exchange rides on the schema query
(one exchange fewer before round 1), and falls back to its own exchange when the early
answers do not cover the hospitals that set up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedpriv import messages as msg
from fedpriv.client.handlers import handle_query
from fedpriv.config import RunConfig
from fedpriv.privacy.he import Layout
from fedpriv.protocols.secagg import QUERY_KEYS, SecAggServer, _State, keys_query
from fedpriv.server.prepare import (
    RunPlan,
    _prepare_deployment,
    initial_weights,
    resolve_model_from_hospitals,
)
from fedpriv.server.run import _setup_exchange, make_server_side


class Sites:
    """fedpriv's real query handler at each site, each with its own lasting state (as a
    SuperNode keeps a run's context); counts the queries by kind."""

    def __init__(self, sites: dict[int, dict]) -> None:
        self.sites = sites
        self.states = {node: RecordDict() for node in sites}
        self.queries: Counter[str] = Counter()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.queries[str(message.content.config_records[msg.CONFIG][msg.QUERY])] += 1
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.sites[node],
                state=self.states[node],
                run_config={},
            )
            reply = handle_query(message, context)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _sites(tmp_path: Path) -> dict[int, dict]:
    sites = {}
    for node, name in ((11, "st-mary"), (22, "county"), (33, "university")):
        data = tmp_path / f"{name}.csv"
        data.write_text("a,b,label\n" + "".join(f"{i},{i % 5},{i % 2}\n" for i in range(40)))
        sites[node] = {"hospital-name": name, "data-path": str(data)}
    return sites


def _set_up(grid: Sites, plan: RunPlan, nodes: list[int]) -> SecAggServer:
    config = plan.config
    layout = Layout.of(initial_weights(plan.model_name, plan.model_args, config.seed))
    side = make_server_side(config, layout=layout, declared=plan.declared)
    assert isinstance(side, SecAggServer)
    side.first, side.last = 1, config.rounds
    order = msg.order_record(config, model_name=plan.model_name, model_args=plan.model_args)
    side.setup(
        grid,
        nodes,
        lambda kind, contents: _setup_exchange(grid, order, kind, contents, config),  # type: ignore[arg-type]
        early=plan.early_answers,
        early_query=plan.early_query,
    )
    return side


def _schemas(tmp_path: Path, name: str) -> tuple[Sites, RunPlan, dict]:
    """Three sites, and the plan after their schema query carried the keys query."""
    config = RunConfig(
        deployment=True,
        aggregation="secagg",
        secagg_threshold=2,
        dp=False,
        rounds=3,
        out=str(tmp_path / "runs"),
        run_name=name,
    )
    grid = Sites(_sites(tmp_path))
    plan = _prepare_deployment(config, resume_dir=None)
    query = keys_query(1, config.rounds)
    plan = resolve_model_from_hospitals(grid, plan, early=(QUERY_KEYS, query))  # type: ignore[arg-type]
    return grid, plan, query


@pytest.mark.usefixtures("flower_task")
def test_the_keys_ride_on_the_schema_query(tmp_path: Path) -> None:
    grid, plan, query = _schemas(tmp_path, "early")
    assert sorted(plan.early_answers) == [11, 22, 33]
    side = _set_up(grid, plan, [11, 22, 33])
    # one schema query, no key exchange of its own, then the shares and their delivery
    assert grid.queries == Counter({msg.QUERY_SCHEMA: 3, "secagg-shares": 3, "secagg-deliver": 3})
    assert side.nonce.hex() == query["nonce"]
    for node in grid.sites:  # every hospital holds verified shares from the others
        state = _State.load(grid.states[node])
        assert state is not None and state.ready and state.nonce == side.nonce


@pytest.mark.usefixtures("flower_task")
def test_the_key_exchange_runs_when_the_early_answers_are_short(tmp_path: Path) -> None:
    grid, plan, query = _schemas(tmp_path, "late")
    del plan.early_answers[33]  # as if it had connected after the schema query
    side = _set_up(grid, plan, [11, 22, 33])
    assert grid.queries[QUERY_KEYS] == 3 and side.nonce.hex() != query["nonce"]
    for node in grid.sites:
        state = _State.load(grid.states[node])
        assert state is not None and state.ready and state.nonce == side.nonce
