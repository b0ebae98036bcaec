"""A deployment never starts a run a site's ledger would refuse: the hospitals tell the
server their ledger's delta with their data schema, before round 1."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedpriv.client.handlers import handle_query
from fedpriv.client.site import check_site
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.server.prepare import _prepare_deployment, resolve_model_from_hospitals


class InProcessGrid:
    """The transport only: each message goes straight to fedpriv's ClientApp handler of the
    site it is addressed to (real node configs, real ledgers)."""

    def __init__(self, sites: dict[int, dict]) -> None:
        self.sites = sites

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.sites[node],
                state=RecordDict(),
                run_config={},
            )
            replies.append(handle_query(message, context))
        return replies


def _site(tmp_path: Path, name: str, delta: float) -> dict:
    data = tmp_path / f"{name}.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 5},{i % 2}\n" for i in range(40)))
    site = {
        "hospital-name": name,
        "data-path": str(data),
        "ledger-path": str(tmp_path / f"{name}.sqlite"),
        "budget-delta": delta,
    }
    check_site(site)  # as IT does before starting the SuperNode: creates the ledger
    return site


@pytest.mark.usefixtures("flower_task")
def test_a_run_with_a_larger_delta_than_a_sites_ledger_is_refused_before_round_1(
    tmp_path: Path,
) -> None:
    grid = InProcessGrid({1: _site(tmp_path, "st-mary", 1e-5), 2: _site(tmp_path, "county", 1e-6)})
    config = RunConfig(deployment=True, delta=1e-5, out=str(tmp_path / "runs"), run_name="r")
    plan = _prepare_deployment(config, resume_dir=None)
    with pytest.raises(ConfigError, match=r"county's privacy ledger is fixed at.*1e-06"):
        resolve_model_from_hospitals(grid, plan)  # type: ignore[arg-type]
    ok = _prepare_deployment(config.replace(delta=1e-6, run_name="ok"), resume_dir=None)
    resolved = resolve_model_from_hospitals(grid, ok)  # type: ignore[arg-type]
    assert resolved.model_name == "mlp"


SCHEMA = """
name = "three-classes"
[[feature]]
name = "a"
kind = "numeric"
min = 0
max = 100
[[feature]]
name = "b"
kind = "numeric"
min = 0
max = 10
[[label]]
code = "0"
[[label]]
code = "1"
[[label]]
code = "2"
"""


@pytest.mark.usefixtures("flower_task")
def test_the_models_classes_come_from_the_schema_not_the_highest_label_a_site_holds(
    tmp_path: Path,
) -> None:
    """Both sites hold codes 0 and 1 only; the federation's schema lists three. Before, each
    site reported its highest label + 1 and the model got two outputs: a record of class 2
    (at a site that joins later, or in the next file) had no output to train."""
    from fedpriv.data import load_schema

    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA)
    sites = {}
    for node, name in ((1, "st-mary"), (2, "county")):
        site = _site(tmp_path, name, 1e-5)
        site["schema-path"] = str(schema)
        sites[node] = site
    config = RunConfig(
        deployment=True,
        schema=str(schema),
        out=str(tmp_path / "runs"),
        run_name="classes",
    )
    plan = _prepare_deployment(config, resume_dir=None)
    assert plan.config.schema_digest == load_schema(schema).digest
    resolved = resolve_model_from_hospitals(InProcessGrid(sites), plan)  # type: ignore[arg-type]
    assert resolved.model_args["num_classes"] == 3
    # without a schema, a site still reports the classes its labels show
    bare = {1: _site(tmp_path, "bare", 1e-5)}
    plain = _prepare_deployment(config.replace(schema="", run_name="bare"), resume_dir=None)
    found = resolve_model_from_hospitals(InProcessGrid(bare), plain)  # type: ignore[arg-type]
    assert found.model_args["num_classes"] == 2
