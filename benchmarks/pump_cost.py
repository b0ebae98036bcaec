"""What handing a round's messages to simulated hospitals costs the server, by pump.

    python benchmarks/pump_cost.py --hospitals 100 1000 3000 --pump fedpriv flower

Flower's real in-memory link state and grid (no Ray, no ClientApp): N hospitals registered
as the simulation registers them, then the server pushes one training message (fedpriv's
6,274-value model) to each. Measured: seconds until every message is on the workers' queue,
and the pump thread's CPU seconds from its start to 2 s after the hand-over (the messages
stay stored while their replies are awaited, as in a real round). ``flower`` is Flower
1.41's ``add_messages_to_queue`` (``get_message_ins`` per node, each scanning every stored
message); ``fedpriv`` is :mod:`fedpriv.server.pump` of the checkout on the path.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.server import pump

PARAMETERS = 6274


def measure(hospitals: int, which: str) -> dict[str, Any]:
    # the set-up run_simulation does for its in-memory link state (Flower's internals)
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    mapping = vce_api._register_nodes(hospitals, factory)
    state: Any = factory.state()
    run = Run.create_empty(run_id=12345)
    run.primary_task_id = 7
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=run.run_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)

    out: queue.Queue[Message] = queue.Queue()
    stop = threading.Event()
    function = vce_api.add_messages_to_queue if which == "flower" else pump._pump
    cpu: dict[str, float] = {}

    def target() -> None:
        started = time.thread_time()
        function(state, out, mapping, stop)
        cpu["seconds"] = time.thread_time() - started

    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(0.3)
    arrays = ArrayRecord({"w": Array(np.zeros(PARAMETERS, dtype=np.float32))})
    messages = [
        Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type=MessageType.TRAIN)
        for node in mapping
    ]
    started = time.perf_counter()
    grid.push_messages(messages)
    pushed = time.perf_counter() - started
    for _ in range(hospitals):
        out.get(timeout=1800)
    handed = time.perf_counter() - started
    time.sleep(2.0)  # replies pending: the stored messages stay in the link state
    stop.set()
    thread.join()
    return {
        "hospitals": hospitals,
        "pump": which,
        "push_seconds": round(pushed, 3),
        "all_on_the_queue_seconds": round(handed, 3),
        "pump_cpu_seconds": round(cpu["seconds"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--pump", nargs="+", choices=("fedpriv", "flower"), default=["fedpriv"])
    args = parser.parse_args()
    for hospitals in args.hospitals:
        for which in args.pump:
            print(json.dumps(measure(hospitals, which)), flush=True)


if __name__ == "__main__":
    main()
