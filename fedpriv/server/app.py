"""The Flower ServerApp that ``flwr run`` loads (``serverapp`` in pyproject.toml).

The run configuration comes from Flower's run config: the defaults in pyproject.toml's
``[tool.flwr.app.config]`` plus any ``--run-config`` overrides.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError, FedprivError
from fedpriv.server.progress import round_logger
from fedpriv.server.run import flower_logging, prepare_run, serve

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(dict(context.run_config))
    if config.he and not config.keys:
        raise ConfigError(
            "he = true needs keys: run `fedpriv keys init --out DIR` once, give the server "
            'DIR/public.ctx and the hospitals DIR/secret.ctx, and set keys = "DIR"'
        )
    # Under HE this server cannot read the model, so it cannot score a central test split.
    plan = prepare_run(
        config,
        resume_dir=config.resume or None,
        central=config.central_eval and not config.he and not config.deployment,
    )
    # quiet=False: our records reach Flower's console handler, which `flwr run --stream`
    # and `flwr log` show the researcher
    with flower_logging(plan.run_dir, quiet=False):
        logger.info("run directory: %s", plan.run_dir.path.resolve())
        outcome = serve(grid, plan, on_round=round_logger(plan.config.rounds))
        logger.info(
            "finished after round %d%s; run directory: %s",
            outcome.last_round,
            f" ({outcome.stopped})" if outcome.stopped else "",
            plan.run_dir.path.resolve(),
        )
        if outcome.rows:
            _write_report(plan.run_dir.path)


def _write_report(run_dir: Path) -> None:
    """``report.html``, as ``fedpriv simulate`` writes it (the report sits above the server
    in the layers, and a ServerApp started by Flower has no CLI to write it)."""
    from fedpriv.report import build_report

    try:
        logger.info("report: %s", build_report(run_dir).resolve())
    except FedprivError as exc:  # the run's files stay; `fedpriv report DIR` can retry
        logger.warning("no report.html: %s", exc)
