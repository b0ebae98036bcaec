"""An interrupted simulation stops in order, so the next one in the same process runs.

Found under load (issue 14): a test that hit its time limit (pytest-timeout raises in the
main thread) left Flower's worker threads waiting on a Ray that had just been shut down; the
next simulation in that process died with a segmentation fault in Ray's core worker.
Interrupting from the progress callback (as Ctrl-C would, mid-run) makes the test exact.
"""

from __future__ import annotations

import _thread
import signal
import threading
from pathlib import Path

import pytest

import fedpriv
from fedpriv.config import RunConfig

# slow real simulations: `make test-slow` (CI runs it too), not `make test`
pytestmark = pytest.mark.slow

ENGINE_THREADS = ("fedpriv-simulation", "server_th_with_start_checks")


def _engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(ENGINE_THREADS)]


def test_an_interrupted_simulation_stops_before_returning_and_the_next_one_runs(
    tmp_path: Path,
) -> None:
    common = {"dataset": "breast-cancer", "hospitals": 2, "dp": False, "out": str(tmp_path)}
    rounds: list[int] = []

    def interrupt_after_first_round(row: dict[str, object]) -> None:
        rounds.append(int(row["round"]))  # type: ignore[call-overload]
        if len(rounds) == 1:
            _thread.interrupt_main()  # what Ctrl-C (or a signal-raised time limit) does

    # interrupt_main() does nothing where SIGINT is ignored, as it is in a process a
    # non-interactive shell started in the background (it once ran all 200 rounds so):
    # Python's own handler for the interruption, whatever the runner's launcher did
    launched = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            fedpriv.simulate(
                RunConfig.from_mapping({**common, "rounds": 200, "run-name": "cut"}),
                on_round=interrupt_after_first_round,
            )
    finally:
        signal.signal(signal.SIGINT, launched)
    assert 1 <= len(rounds) < 200, "the run was cut short, not finished"
    assert _engine_threads() == [], "no engine thread outlives the call"

    again = fedpriv.simulate(RunConfig.from_mapping({**common, "rounds": 1, "run-name": "next"}))
    assert again.last_round == 1 and again.final["test_accuracy"] > 0.5
