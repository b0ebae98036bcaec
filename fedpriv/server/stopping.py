"""Stop an in-process simulation in order, whatever interrupts it.

Flower 1.41's simulation engine runs the ServerApp in one thread and the hospitals' messages
in a pool of threads that wait on its backend (Ray's ``ray.get``, or a forked worker's pipe,
:mod:`fedpriv.server.workers`). What follows was found with Ray. If the thread that called
``run_simulation`` is interrupted (Ctrl-C, a test's time limit raised by a signal), Flower's
clean-up shuts Ray down at once while those threads still wait on it, and leaves the
ServerApp thread waiting for replies that never come. The next Ray call in that process then
touches a freed core worker: a segmentation fault (seen in the test suite on a loaded
machine, issue 14; reproduced by interrupting a CKKS simulation and starting another).

:func:`run_engine` runs the engine in a thread of its own, so an interruption lands here
instead; it then asks the ServerApp to stop (:class:`StoppableGrid` raises
:class:`SimulationStopped` at its next call to the grid), which lets Flower end the run
its normal way (workers finish their message, then Ray shuts down), and waits for that.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedpriv.errors import FedprivError
from fedpriv.server.arrivals import ArrivalPulls

__all__ = ["SimulationStopped", "StoppableGrid", "ray_did_not_start", "run_engine"]

logger = logging.getLogger(__name__)

#: how often a waiting ServerApp looks at the stop flag (Flower's in-memory grid pulls
#: replies every 0.1 s itself)
PULL_INTERVAL = 0.05
#: how long an interrupted simulation is given to stop in order before the interruption
#: is passed on anyway (Flower's workers finish the message they are on: one local round)
STOP_GRACE = 300.0

_leftover: list[threading.Thread] = []


class SimulationStopped(FedprivError):
    """The simulation was asked to stop (its caller was interrupted)."""


class StoppableGrid(Grid):
    """A grid that forwards every call to ``grid`` until ``stop`` is set, then raises
    :class:`SimulationStopped`; its ``send_and_receive`` looks at ``stop`` while it waits."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid = grid
        self._stop = stop
        # Flower's in-memory grid: pull only the replies that have arrived (arrivals.py)
        self._pulls = ArrivalPulls(grid)

    def _check(self) -> None:
        if self._stop.is_set():
            raise SimulationStopped("the simulation was interrupted; stopping the server")

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self._pulls.pull(message_ids)

    def close(self) -> None:
        self._pulls.close()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting:
                self._stop.wait(PULL_INTERVAL)
        return replies


def _wait_for_leftovers(grace: float) -> None:
    """A simulation must not start Ray while an earlier one's threads still use it."""
    deadline = time.monotonic() + grace
    for thread in list(_leftover):
        while thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if thread.is_alive():
            raise FedprivError(
                "an earlier simulation in this process is still stopping (its threads still "
                "use Ray); starting another now could crash the process: try again later"
            )
        _leftover.remove(thread)


def run_engine(
    run: Callable[[], None], stop: threading.Event, *, grace: float = STOP_GRACE
) -> None:
    """Run ``run`` (which calls ``run_simulation``) in a thread; on any interruption of the
    caller, set ``stop`` and wait up to ``grace`` seconds for the engine to end in order,
    then re-raise the interruption. The engine's own exceptions are re-raised here."""
    _wait_for_leftovers(grace)
    failure: list[BaseException] = []
    # an Event, not Thread.join: a join interrupted by a signal's exception can leave the
    # thread looking alive (or finished) to later joins in CPython 3.11
    done = threading.Event()

    def target() -> None:
        try:
            run()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)
        finally:
            done.set()

    engine = threading.Thread(target=target, name="fedpriv-simulation", daemon=True)
    interrupted = threading.Event()
    restore = _note_interruptions(interrupted, stop)
    engine.start()
    try:
        while not done.wait(0.2):
            pass
    except BaseException:
        stop.set()
        logger.warning("simulation interrupted: asking the server to stop, then waiting")
        if not done.wait(grace):
            _leftover.append(engine)
        raise
    finally:
        # Flower does not wait for its ServerApp thread when the engine fails (e.g. Ray did
        # not start): a server still waiting for hospitals stops at its next grid call
        stop.set()
        restore()
    if interrupted.is_set():
        # Ctrl-C whose KeyboardInterrupt was swallowed where it landed in this thread (a
        # finaliser run by the garbage collector ignores exceptions): the server was told
        # to stop all the same, and the caller is told it was interrupted
        raise KeyboardInterrupt
    if failure:
        raise failure[0]


def _note_interruptions(interrupted: threading.Event, stop: threading.Event) -> Callable[[], None]:
    """In the main thread, wrap the SIGINT handler so that Ctrl-C also sets ``interrupted``
    and ``stop`` before the usual KeyboardInterrupt; returns what puts the handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored or the OS default: Python raises nothing either
        return lambda: None

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.set()
        stop.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, on_interrupt)

    def restore() -> None:
        if signal.getsignal(signal.SIGINT) is on_interrupt:
            signal.signal(signal.SIGINT, previous)

    return restore


def ray_did_not_start(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is Ray's node failing to start in time: Ray
    gives its raylet a fixed 30 s to register, which a heavily loaded machine can miss.
    Nothing has run then (no hospital trained), so starting again is safe."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "timed out during startup" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False
