"""Simulated hospitals in worker processes forked from one that has already imported them,
instead of Ray's actors (the simulation's default on a machine without a GPU to share).

Why. Flower's simulation engine runs each hospital's message in a Ray actor. Before round 1
Ray starts its node (a GCS, a raylet, workers: about 5 s on two cores) and every actor
imports Flower, PyTorch, Opacus and fedpriv again (several seconds each, at once). Here one
process (``multiprocessing``'s fork server) starts as soon as a simulation is being prepared
and imports them once, while the server reads and checks the data; each worker is a fork of
it, ready in milliseconds, and keeps running for the whole simulation as an actor does (the
hospital's cached dataset, key contexts). Nothing of the server is inherited: the fork server
is a fresh interpreter that has run no thread and no PyTorch operation.

What it keeps of Ray's contract with Flower's engine (``Backend``): ``num_workers`` messages
at once (one per ``cpus-per-hospital`` cores), the ClientApp's exception as the message's
error reply, a worker that dies (a crash, the kernel's OOM killer) replaced and its message
answered with an error naming how it ended. Workers ignore Ctrl-C (the server stops the run in
order, :mod:`fedpriv.server.stopping`) and write what they print to the run's log
(``workers.log``), never to the terminal.

GPU shares are kept as Ray keeps them: each worker sees only the GPUs its share gives it
(``CUDA_VISIBLE_DEVICES``, read when the worker first touches CUDA, which the fork server
never does), as many workers run at once as the GPUs have shares for, and a hospital with no
share sees no GPU. Ray is used only when ``FEDPRIV_SIMULATION_BACKEND=ray`` asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = [
    "BACKEND_ENV",
    "BACKEND_NAME",
    "WORKERS_LOG",
    "forked_backend",
    "gpu_places",
    "start_early",
    "wanted",
]

logger = logging.getLogger(__name__)

#: "ray" makes the simulation use Ray's actors whatever the machine
BACKEND_ENV = "FEDPRIV_SIMULATION_BACKEND"
#: the name Flower's ``run_simulation`` is given for them: with "ray" it exits when Ray is not
#: installed, which the forked workers do not need (Flower starts its backend the same way)
BACKEND_NAME = "fedpriv-forked"
#: the run directory's file the workers' output goes to
WORKERS_LOG = "workers.log"
#: what the fork server imports once, before any worker is asked for
PRELOAD = ["torch", "opacus", "flwr.clientapp", "fedpriv.client.app", "fedpriv.client.handlers"]
#: the thread pools a worker's libraries size at import (OpenMP, OpenBLAS, MKL)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Flower's engine imports its Ray backend from this module inside ``start_vce``
_RAY_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"
#: how long a worker is given to leave when the simulation ends
_LEAVE_S = 10.0
#: one process start at a time changes multiprocessing's preparation (_without_main)
_START_LOCK = threading.Lock()


def wanted() -> bool:
    """Whether the simulation runs on forked workers (else on Ray, when asked for)."""
    return os.environ.get(BACKEND_ENV, "").strip().lower() != "ray"


def gpu_places(share: float, visible: Sequence[str], workers: int) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker that can run at once, at most ``workers``.

    As Ray places actors: a share under 1 packs ``floor(1 / share)`` workers on each GPU; a
    share over 1 gives a worker ``ceil(share)`` whole GPUs of its own; no share, no GPU (an
    empty string hides them all). Raises ``ValueError`` when not one worker fits."""
    workers = max(1, workers)
    if share <= 0:
        return [""] * workers
    gpus = [str(g).strip() for g in visible if str(g).strip()]
    if share <= 1:
        per_gpu = math.floor(1.0 / share + 1e-9)
        places = [gpus[k % len(gpus)] for k in range(len(gpus) * per_gpu)] if gpus else []
    else:
        whole = math.ceil(share - 1e-9)
        places = [",".join(gpus[k : k + whole]) for k in range(0, len(gpus) - whole + 1, whole)]
    if not places:
        raise ValueError(
            f"--gpus-per-hospital {share:g} needs {math.ceil(share)} GPU(s) for one hospital "
            f"but {len(gpus)} can be used here"
        )
    return places[:workers]


def start_early(threads: float = 1) -> None:
    """Start the fork server and its imports now (they overlap what the caller does next);
    nothing happens if it runs already or this platform cannot fork.

    It imports NumPy and PyTorch with their thread pools sized for one hospital (``threads``
    cores, unless the user's environment sets them), as Ray's actors get them: a worker's
    BLAS sized for the whole machine spins threads the other workers need."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    try:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, str(max(1, int(threads))))
        forkserver.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
    except (OSError, ValueError) as exc:  # the workers are started the slow way then
        logger.info("the workers' fork server did not start early: %s", exc)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _serve(
    conn: Connection, app: bytes, place: Mapping[str, Any], threads: int, gpus: str | None
) -> None:
    """A worker's life: run the ClientApp on each (message, context) it is sent."""
    import cloudpickle

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops the run in order
    # the simulation's environment, not the fork server's (as Ray's workers, started for each
    # simulation, have it); multiprocessing gives the worker the caller's directory and path
    os.environ.clear()
    os.environ.update(place["env"])
    if gpus is not None:  # before anything here touches CUDA, which reads it then
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    log_path = place["log"]
    with contextlib.suppress(OSError):
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    import torch

    torch.set_num_threads(max(1, threads))
    client_app = cloudpickle.loads(app)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        message, context = job
        try:
            reply = client_app(message=message, context=context)
            # pickled before a byte is written: a reply that cannot be is an error reply
            answer = ForkingPickler.dumps(("ok", reply, context))
        except Exception as exc:  # reported as the message's error reply, as Ray does
            answer = ForkingPickler.dumps(("error", f"{type(exc).__name__}: {exc}"))
        conn.send_bytes(answer)


class _Worker:
    def __init__(self, process: Any, conn: Connection, gpus: str | None) -> None:
        self.process = process
        self.conn = conn
        self.gpus = gpus  # a worker that dies is replaced on the same GPUs


def _backend_class(settings: Mapping[str, Any]) -> type:
    from flwr.clientapp.client_app import ClientApp, ClientAppException
    from flwr.server.superlink.fleet.vce.backend import Backend

    class ForkedBackend(Backend):
        """Flower's simulation backend interface on forked worker processes."""

        def __init__(self, backend_config: Any) -> None:
            self._gpus: list[str | None] = list(settings["gpus"] or [])
            self._count = len(self._gpus) or max(1, int(settings["workers"]))
            self._threads = max(1, int(settings["threads"]))
            self._place = {
                "env": dict(os.environ),
                "log": str(settings["log"]),
            }
            self._context = multiprocessing.get_context("forkserver")
            self._idle: queue.Queue[_Worker] = queue.Queue()
            self._all: list[_Worker] = []
            self._app = b""
            self._lock = threading.Lock()

        def build(self, app_fn: Callable[[], ClientApp]) -> None:
            import cloudpickle

            started = time.perf_counter()
            start_early(self._threads)  # if nobody did: the fork server, sized as above
            self._app = cloudpickle.dumps(app_fn())
            for k in range(self._count):
                self._idle.put(self._start(self._gpus[k] if self._gpus else None))
            logger.info(
                "hospital workers ready: %d forked processes in %.1f s",
                self._count,
                time.perf_counter() - started,
            )

        def _start(self, gpus: str | None) -> _Worker:
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=_serve,
                args=(theirs, self._app, self._place, self._threads, gpus),
                daemon=True,
                name="fedpriv-hospital-worker",
            )
            with _without_main():
                process.start()
            theirs.close()
            worker = _Worker(process, ours, gpus)
            with self._lock:
                self._all.append(worker)
            return worker

        @property
        def num_workers(self) -> int:
            return self._count

        def is_worker_idle(self) -> bool:
            return not self._idle.empty()

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            worker = self._idle.get()
            try:
                worker.conn.send((message, context))
                answer = worker.conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                worker.process.join(timeout=_LEAVE_S)
                code = worker.process.exitcode
                with self._lock:
                    self._all.remove(worker)
                worker = self._start(worker.gpus)
                how = f"signal {-code}" if code is not None and code < 0 else f"exit {code}"
                raise ClientAppException(f"the hospital's worker process ended ({how})") from None
            finally:
                self._idle.put(worker)
            if answer[0] == "error":
                raise ClientAppException(answer[1])
            _, reply, updated = answer
            return reply, updated

        def terminate(self) -> None:
            with self._lock:
                workers = list(self._all)
                self._all.clear()
            for worker in workers:
                with contextlib.suppress(OSError, BrokenPipeError):
                    worker.conn.send(None)
            for worker in workers:
                worker.process.join(timeout=_LEAVE_S)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(timeout=_LEAVE_S)
                worker.conn.close()

    return ForkedBackend


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """Start a process without the caller's ``__main__``: multiprocessing would import the
    script that called :func:`fedpriv.simulate` again in each worker (and an unguarded one
    would run again there); the workers need nothing of it."""
    from multiprocessing import spawn

    with _START_LOCK:
        original = spawn.get_preparation_data

        def preparation(name: str) -> dict[str, Any]:
            data = original(name)
            data.pop("init_main_from_name", None)
            data.pop("init_main_from_path", None)
            return data

        spawn.get_preparation_data = preparation
        try:
            yield
        finally:
            spawn.get_preparation_data = original


@contextlib.contextmanager
def forked_backend(
    *,
    workers: int,
    threads: int,
    log: os.PathLike[str] | str,
    gpus: Sequence[str] | None = None,
) -> Iterator[None]:
    """Within the block, Flower's simulation engine uses forked workers instead of Ray:
    its ``start_vce`` imports ``RayBackend`` from :data:`_RAY_MODULE` when it starts, and
    finds this module's class there (Ray itself is never imported). ``gpus``, if given, is
    each worker's ``CUDA_VISIBLE_DEVICES`` (:func:`gpu_places`) and sets their number."""
    settings = {
        "gpus": list(gpus) if gpus is not None else None,
        "workers": workers,
        "threads": threads,
        "log": os.fspath(log),
    }
    stand_in = types.ModuleType(_RAY_MODULE)
    stand_in.RayBackend = _backend_class(settings)  # type: ignore[attr-defined]
    saved = sys.modules.get(_RAY_MODULE)
    sys.modules[_RAY_MODULE] = stand_in
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(_RAY_MODULE, None)
        else:
            sys.modules[_RAY_MODULE] = saved
