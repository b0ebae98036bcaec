"""What `flwr run --stream` shows of a run: the server's log records must reach the output
Flower forwards from a ServerApp process (its stdout, mirrored into the log queue)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from queue import Queue

from flwr.supercore.logger import mirror_output_to_queue, restore_output

from fedpriv.server.progress import round_line, round_logger
from fedpriv.server.run import flower_logging
from fedpriv.server.rundir import RunDirectory


def test_the_servers_records_reach_what_flower_forwards(tmp_path: Path) -> None:
    """Before, only flower.log got them: the stream showed nothing of fedpriv."""
    queue: Queue[str | None] = Queue()
    mirror_output_to_queue(queue)  # what Flower's ServerApp and simulation processes do
    try:
        with flower_logging(RunDirectory(tmp_path), quiet=False):
            logging.getLogger("fedpriv.server.app").info("run directory: %s", tmp_path)
            round_logger(2)(
                {"round": 1, "eval_accuracy": 0.9, "hospitals": {}, "epsilon": {"h": 1.5}}
            )
        logging.getLogger("fedpriv.server.app").info("after the run")
    finally:
        restore_output()
    forwarded = ""
    while not queue.empty():
        forwarded += str(queue.get())
    assert f"run directory: {tmp_path}" in forwarded
    assert "round 1/2: federated accuracy 0.900" in forwarded and "h 1.500" in forwarded
    assert "after the run" not in forwarded, "the handler leaves with the run"
    assert "round 1/2" in (tmp_path / "flower.log").read_text()


def test_quiet_keeps_the_terminal_clean(tmp_path: Path) -> None:
    queue: Queue[str | None] = Queue()
    mirror_output_to_queue(queue)
    try:
        with flower_logging(RunDirectory(tmp_path), quiet=True):
            logging.getLogger("fedpriv.server.app").info("run directory: %s", tmp_path)
    finally:
        restore_output()
    assert queue.empty()
    assert "run directory" in (tmp_path / "flower.log").read_text()


def test_a_round_line_shows_accuracy_epsilons_and_declines() -> None:
    row = json.loads(
        json.dumps(
            {
                "round": 2,
                "eval_accuracy": 0.91234,
                "eval_loss": 0.25,
                "test_accuracy": None,
                "hospitals": {"a": {"train_examples": 5}, "b": {"num_examples": 3}},
                "epsilon": {"a": 1.5, "b": 1.25},
                "epsilon_exact": False,
                "declined": {"b": "b declines the round:\n cap epsilon 2"},
                "failed": {},
                "seconds": 3.14,
            }
        )
    )
    line = round_line(row, 5)
    assert line.startswith("round 2/5: federated accuracy 0.912 (loss 0.250)")
    assert "| 1 trained |" in line and "central test" not in line
    assert "epsilon per hospital (upper bounds): a 1.500, b 1.250" in line
    assert "declined: b: b declines the round: cap epsilon 2" in line and "failed" not in line
    assert line.endswith("| 3.1 s")
