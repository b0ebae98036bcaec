"""Simulated hospitals on one machine: Flower's in-process simulation engine, its hospitals in
forked worker processes (:mod:`fedpriv.server.workers`), or Ray's actors when they share a GPU."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError, DeviceError, FedprivError
from fedpriv.server import workers
from fedpriv.server.pump import event_driven_pump
from fedpriv.server.run import (
    RoundCallback,
    RunPlan,
    ServeOutcome,
    build_server_app,
    flower_logging,
    prepare_run,
)
from fedpriv.server.rundir import FLOWER_LOG
from fedpriv.server.stopping import ray_did_not_start, run_engine

__all__ = ["SimulationResult", "prepare_simulation", "run_plan", "simulate"]

logger = logging.getLogger(__name__)

#: the GPU memory given to each simulated hospital that shares a GPU by default (a CUDA
#: context and a small model's training; --gpus-per-hospital overrides the share)
WORKER_GPU_BYTES = 2**30

#: Ray gives its node a fixed 30 s to start; a loaded machine can miss that, before anything
#: ran, so the engine is started again (at most this many times in all)
RAY_START_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    config: RunConfig
    rows: list[dict[str, Any]]
    last_round: int
    stopped: str

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}


def _backend_config(config: RunConfig) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    init_args: dict[str, Any] = {
        "num_cpus": cpus,
        "logging_level": "ERROR",
        "log_to_driver": False,
        "include_dashboard": False,
    }
    if config.gpus_per_hospital > 0:
        import torch

        init_args["num_gpus"] = torch.cuda.device_count()
    return {
        "client_resources": {
            "num_cpus": min(config.cpus_per_hospital, cpus),
            "num_gpus": config.gpus_per_hospital,
        },
        "init_args": init_args,
    }


def _backend(plan: RunPlan) -> contextlib.AbstractContextManager[Any]:
    """Forked workers (workers.py) unless Ray is asked for; as many, with as many cores and
    GPU shares each, as Ray's actors would be (:func:`_backend_config`)."""
    config = plan.config
    if not workers.wanted():
        return contextlib.nullcontext()
    per_hospital = _backend_config(config)["client_resources"]["num_cpus"]
    count = _at_once(config)
    try:
        share = config.gpus_per_hospital
        gpus = workers.gpu_places(share, _visible_gpus() if share > 0 else [], count)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    return workers.forked_backend(
        workers=count,
        threads=max(1, int(per_hospital)),
        log=plan.run_dir.file(workers.WORKERS_LOG),
        gpus=gpus,
    )


def _at_once(config: RunConfig) -> int:
    """How many hospitals train at once: one per ``cpus-per-hospital`` cores, as many as
    Ray's actors would be (:func:`_backend_config`)."""
    resources = _backend_config(config)
    cpus = resources["init_args"]["num_cpus"]
    return max(1, int(cpus // resources["client_resources"]["num_cpus"]))


def _visible_gpus() -> list[str]:
    """The GPUs this process may hand out: those ``CUDA_VISIBLE_DEVICES`` names, else all."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g.strip() for g in named.split(",") if g.strip()]
    import torch

    return [str(k) for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def simulate(
    config: RunConfig,
    *,
    resume: str | Path | None = None,
    on_round: RoundCallback | None = None,
    quiet: bool = True,
) -> SimulationResult:
    """Run a federation of ``config.hospitals`` simulated hospitals; returns what it produced.

    Everything that can be checked (data, split, device, strategy) is checked before the
    simulation engine starts. ``resume`` continues a run directory from its last checkpoint.
    """
    return run_plan(prepare_simulation(config, resume=resume), on_round=on_round, quiet=quiet)


def prepare_simulation(config: RunConfig, *, resume: str | Path | None = None) -> RunPlan:
    """Validate and write the run directory's first files; nothing is started yet."""
    from fedpriv.data.splits import loaded_for

    if workers.wanted():
        workers.start_early(config.cpus_per_hospital)  # its imports overlap the preparation below
    check_backend()
    plan = prepare_run(share_gpu(config), resume_dir=resume, central=True)
    # the copy prepare_run just read and checked (cached): the workers take this one
    plan = dataclasses.replace(plan, loaded=loaded_for(plan.config))
    if plan.config.he:
        plan = dataclasses.replace(plan, decrypt=_harness_decryptor(plan))
    return plan


def _harness_decryptor(plan: RunPlan) -> Any:
    """Under HE the simulation harness plays the hospitals' side to read the global model
    (central test accuracy, model.pt). The server code never gets this function's key."""
    from flwr.app import ArrayRecord

    from fedpriv.privacy.he import (
        PUBLIC_FILE,
        SECRET_FILE,
        HeError,
        Layout,
        load_context,
        write_keys,
    )
    from fedpriv.protocols.ckks import CIPHERTEXT, KEYS_DIR, TOTAL, ciphertext_bytes
    from fedpriv.server.prepare import initial_weights

    config = plan.config
    keys = Path(config.keys) if config.keys else plan.run_dir.path / KEYS_DIR
    if not config.keys and not (keys / SECRET_FILE).exists():
        write_keys(keys)
    secret = load_context(keys / SECRET_FILE, role="hospital")
    public = load_context(keys / PUBLIC_FILE, role="server")
    if secret.fingerprint != public.fingerprint:
        raise HeError(
            f"'{keys / SECRET_FILE}' and '{keys / PUBLIC_FILE}' belong to different key sets "
            f"({secret.fingerprint} vs {public.fingerprint})"
        )
    layout = Layout.of(initial_weights(plan.model_name, plan.model_args, config.seed))

    def decrypt(arrays: ArrayRecord) -> dict[str, Any] | None:
        from fedpriv.privacy.he import decrypt_sum

        try:
            mean = decrypt_sum(
                secret,
                ciphertext_bytes(arrays[CIPHERTEXT]),
                length=layout.size,
                total_examples=int(arrays[TOTAL].numpy()[0]),
            )
        except HeError as exc:
            # the hospitals find it when the next order brings it, and it is discarded then
            logger.warning("the round's aggregate does not decrypt for the central test: %s", exc)
            return None
        return layout.unflatten(mean)

    return decrypt


def _flower_reason(log: Path) -> str:
    """The first line of the last error Flower logged (its exit reason), or where to look."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [k for k, line in enumerate(lines) if " ERROR flwr" in line]
    if errors:
        reason = [ln.strip() for ln in lines[errors[-1] + 1 :] if ln.strip()]
        if reason:
            return reason[0]
    return f"see {log}"


def check_backend() -> None:
    """Ray, when asked for, must be installed: Flower would exit without a word otherwise."""
    import importlib.util

    if not workers.wanted() and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            f"{workers.BACKEND_ENV}=ray asks for Ray, which is not installed here "
            "(pip install 'flwr[simulation]'), or unset it to use fedpriv's own workers"
        )


def share_gpu(config: RunConfig) -> RunConfig:
    """Give simulated hospitals a GPU share when they are to use CUDA but asked for none.

    A worker with no share sees no GPU (as under Ray), so ``--device auto`` on a GPU machine
    would silently train on the CPU. The hospitals that run at once (one per
    ``cpus-per-hospital`` cores, at most one per GiB of the GPU's memory) share a GPU unless
    ``--gpus-per-hospital`` says otherwise.
    """
    import torch

    if config.gpus_per_hospital > 0 and not torch.cuda.is_available():
        raise DeviceError(
            f"--gpus-per-hospital {config.gpus_per_hospital} was asked for but this machine "
            "has no usable CUDA GPU: leave it at 0"
        )
    if config.gpus_per_hospital > 0 or config.device == "cpu" or not torch.cuda.is_available():
        return config
    concurrent = _at_once(config)
    # each worker that trains holds a CUDA context of its own for the run: about 850 MiB on
    # an H200 for the 28x28 CNN (BENCHMARKS.md); a small GPU beside many cores takes fewer
    memory = min(
        torch.cuda.get_device_properties(k).total_memory
        for k in range(max(1, torch.cuda.device_count()))
    )
    per_gpu = max(1, min(concurrent, int(memory // WORKER_GPU_BYTES)))
    if per_gpu < concurrent:
        logger.info(
            "%d hospitals share each GPU at once (%.0f GiB, about 1 GiB a worker), not %d",
            per_gpu,
            memory / 2**30,
            concurrent,
        )
    # rounded down: 1/7 rounded to 0.1429 would fit only 6 a GPU
    return config.replace(gpus_per_hospital=math.floor(1e4 / per_gpu) / 1e4)


def run_plan(
    plan: RunPlan,
    *,
    on_round: RoundCallback | None = None,
    quiet: bool = True,
    client_app: Any = None,
) -> SimulationResult:
    """Serve ``plan`` to simulated hospitals running fedpriv's ClientApp (or ``client_app``,
    e.g. a stock Flower one, to see what fedpriv's server makes of it)."""
    from flwr.simulation import run_simulation

    if client_app is None:
        from fedpriv.client.app import app as client_app

    from fedpriv.data.handoff import shared_datasets

    config = plan.config
    outcome = ServeOutcome()
    with (
        flower_logging(plan.run_dir, quiet=quiet),
        warnings.catch_warnings(),
        event_driven_pump(),
        # the workers take the dataset the server loaded and checked (data/handoff.py)
        shared_datasets(plan.loaded),
        _backend(plan),
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        logger.info("run directory: %s", plan.run_dir.path.resolve())
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            stop = threading.Event()
            server_app = build_server_app(plan, on_round=on_round, outcome=outcome, stop=stop)
            try:
                # in a thread of its own, so an interruption stops it in order (stopping.py)
                run_engine(
                    lambda app=server_app: run_simulation(  # type: ignore[misc]
                        server_app=app,
                        client_app=client_app,
                        num_supernodes=config.hospitals,
                        backend_name=workers.BACKEND_NAME if workers.wanted() else "ray",
                        backend_config=_backend_config(config),
                    ),
                    stop,
                )
                break
            except SystemExit as exc:  # Flower's flwr_exit: its reason went to flower.log
                raise FedprivError(
                    f"the Flower simulation engine stopped (exit {exc.code}): "
                    f"{_flower_reason(plan.run_dir.file(FLOWER_LOG))}"
                ) from None
            except Exception as exc:
                if (
                    attempt == RAY_START_ATTEMPTS
                    or outcome.last_round
                    or not ray_did_not_start(exc)
                ):
                    raise
                logger.warning("Ray did not start in time (attempt %d); starting it again", attempt)
    return SimulationResult(
        run_dir=plan.run_dir.path,
        config=config,
        rows=plan.run_dir.read_metrics(),
        last_round=outcome.last_round,
        stopped=outcome.stopped,
    )
