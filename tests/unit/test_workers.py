"""The simulation's forked workers (fedpriv.server.workers) keep the contract Flower's engine
has with its Ray backend: real worker processes, run through the backend class Flower's
``start_vce`` would import, with a real Flower ClientApp."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException

from fedpriv.server import workers

pytestmark = pytest.mark.skipif(
    "forkserver" not in __import__("multiprocessing").get_all_start_methods(),
    reason="this platform has no fork server",
)

app = ClientApp()


@app.train()
def _train(message: Message, context: Context) -> Message:
    hold = float(message.content["order"]["hold"])  # type: ignore[arg-type]
    time.sleep(hold)
    seen = int(context.state["seen"]["n"]) if "seen" in context.state else 0  # type: ignore[arg-type]
    context.state["seen"] = ConfigRecord({"n": seen + 1})
    print("a line the terminal must not get")
    import threadpoolctl
    import torch

    pools = [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]
    reply = ConfigRecord(
        {
            "pid": os.getpid(),
            "env": os.environ.get("FEDPRIV_TEST_WORKERS", ""),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
            "seen": seen,
            "threads": max([torch.get_num_threads(), *pools]),
        }
    )
    return Message(RecordDict({"reply": reply}), reply_to=message)


@app.query()
def _query(message: Message, context: Context) -> Message:
    raise ValueError("the hospital's file is unreadable")


@app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    if "unpicklable" in message.content["order"]:
        context.state["bad"] = ConfigRecord({"n": 1})
        context.run_config = {"lock": threading.Lock()}  # type: ignore[dict-item]
        return Message(RecordDict(), reply_to=message)
    os._exit(7)


def _message(kind: str, hold: float = 0.0) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(RecordDict({"order": ConfigRecord({"hold": hold})}), metadata=metadata)


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FEDPRIV_TEST_WORKERS", "set after the fork server started")
    with workers.forked_backend(workers=2, threads=1, log=tmp_path / "workers.log"):
        cls = sys.modules[workers._RAY_MODULE].RayBackend
        made = cls({})
    made.build(lambda: app)
    yield made
    made.terminate()


def test_messages_run_in_worker_processes_that_keep_their_state(
    backend: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert backend.num_workers == 2 and backend.is_worker_idle()
    replies: list[tuple[Message, Context]] = []

    def send() -> None:
        replies.append(backend.process_message(_message("train", hold=1.0), _context()))

    started = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    pids = {int(reply.content["reply"]["pid"]) for reply, _ in replies}  # type: ignore[arg-type]
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, not this process
    assert time.monotonic() - started < 60
    for reply, context in replies:
        assert reply.content["reply"]["env"] == "set after the fork server started"
        assert context.state["seen"]["n"] == 1  # the context the ClientApp updated comes back
    # what a worker prints goes to the run's workers.log, not to the terminal
    assert "a line the terminal must not get" not in capfd.readouterr().out
    assert "a line the terminal must not get" in (tmp_path / "workers.log").read_text()


def test_an_exception_is_the_messages_error_and_the_worker_stays(backend: Any) -> None:
    with pytest.raises(ClientAppException, match="ValueError: the hospital's file is unread"):
        backend.process_message(_message("query"), _context())
    reply, _ = backend.process_message(_message("train"), _context())
    assert int(reply.content["reply"]["seen"]) == 0  # type: ignore[arg-type]


def test_a_reply_that_cannot_be_sent_back_is_an_error_and_the_worker_stays(backend: Any) -> None:
    message = _message("evaluate")
    message.content["order"]["unpicklable"] = 1
    with pytest.raises(ClientAppException, match="TypeError: cannot pickle"):
        backend.process_message(message, _context())
    reply, _ = backend.process_message(_message("train"), _context())
    assert int(reply.content["reply"]["seen"]) == 0  # type: ignore[arg-type]


def test_a_worker_that_dies_is_replaced(backend: Any) -> None:
    with pytest.raises(ClientAppException, match="worker process ended \\(exit 7\\)"):
        backend.process_message(_message("evaluate"), _context())
    assert backend.num_workers == 2
    pids = set()
    for _ in range(4):
        reply, _ = backend.process_message(_message("train"), _context())
        pids.add(int(reply.content["reply"]["pid"]))  # type: ignore[arg-type]
    assert pids and os.getpid() not in pids


def test_terminate_ends_every_worker(tmp_path: Path) -> None:
    with workers.forked_backend(workers=2, threads=1, log=tmp_path / "w.log"):
        made = sys.modules[workers._RAY_MODULE].RayBackend({})
    made.build(lambda: app)
    processes = [worker.process for worker in made._all]
    assert all(process.is_alive() for process in processes)
    made.terminate()
    assert not any(process.is_alive() for process in processes)


def test_flowers_ray_module_is_restored_after_the_block(tmp_path: Path) -> None:
    before = sys.modules.get(workers._RAY_MODULE)
    with workers.forked_backend(workers=1, threads=1, log=tmp_path / "w.log"):
        assert sys.modules[workers._RAY_MODULE] is not before
    assert sys.modules.get(workers._RAY_MODULE) is before


def test_ray_is_used_only_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers.BACKEND_ENV, raising=False)
    assert workers.wanted()
    monkeypatch.setenv(workers.BACKEND_ENV, "ray")
    assert not workers.wanted()


def test_gpu_shares_are_placed_as_rays_actors_are() -> None:
    # a share under 1 packs floor(1/share) workers on each GPU, spread over the GPUs
    assert workers.gpu_places(0.25, ["0", "1"], 16) == ["0", "1"] * 4
    assert workers.gpu_places(0.3, ["0"], 16) == ["0"] * 3
    assert workers.gpu_places(0.2, ["0"], 2) == ["0", "0"]  # the cores allow only two
    assert workers.gpu_places(1.0, ["2", "5"], 8) == ["2", "5"]  # the user's own choice of GPUs
    # over 1: whole GPUs of its own; a leftover GPU stays unused
    assert workers.gpu_places(2.0, ["0", "1", "2", "3", "4"], 8) == ["0,1", "2,3"]
    assert workers.gpu_places(1.5, ["0", "1", "2"], 8) == ["0,1"]
    # no share: every worker sees no GPU, as Ray's workers without one
    assert workers.gpu_places(0.0, ["0"], 3) == ["", "", ""]
    with pytest.raises(ValueError, match="needs 2 GPU\\(s\\) for one hospital but 1 can"):
        workers.gpu_places(2.0, ["0"], 4)
    with pytest.raises(ValueError, match="but 0 can be used"):
        workers.gpu_places(0.5, [], 4)


def test_each_worker_sees_only_its_gpus_also_when_replaced(tmp_path: Path) -> None:
    """CUDA_VISIBLE_DEVICES is set in the worker before anything there touches CUDA; the
    number of places sets the number of workers; a dead worker's successor gets its GPUs."""
    with workers.forked_backend(workers=8, threads=1, log=tmp_path / "w.log", gpus=["3", "7"]):
        made = sys.modules[workers._RAY_MODULE].RayBackend({})
    made.build(lambda: app)
    try:
        assert made.num_workers == 2

        def gpus_seen_by_two_messages_at_once() -> list[str]:
            seen: list[str] = []

            def send() -> None:
                reply, _ = made.process_message(_message("train", hold=1.0), _context())
                seen.append(str(reply.content["reply"]["gpus"]))

            threads = [threading.Thread(target=send) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            return sorted(seen)

        assert gpus_seen_by_two_messages_at_once() == ["3", "7"]
        for _ in range(2):  # both die, one after the other; their successors keep the GPUs
            with pytest.raises(ClientAppException, match="exit 7"):
                made.process_message(_message("evaluate"), _context())
        assert gpus_seen_by_two_messages_at_once() == ["3", "7"]
    finally:
        made.terminate()


def test_a_script_without_a_main_guard_runs_once(tmp_path: Path) -> None:
    """multiprocessing would import the calling script again in each worker; an unguarded
    script would then run its simulation there too. The workers leave ``__main__`` alone.
    (A fresh process, so also: the fork server it starts sizes the workers' thread pools.)"""
    marks = tmp_path / "marks.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from pathlib import Path
            from tests.unit.test_workers import app, _context, _message
            from fedpriv.server import workers

            with Path({str(marks)!r}).open("a") as handle:
                handle.write("script ran\\n")
            with workers.forked_backend(workers=1, threads=1, log={str(tmp_path / "w.log")!r}):
                made = sys.modules[workers._RAY_MODULE].RayBackend({{}})
            made.build(lambda: app)
            reply, _ = made.process_message(_message("train"), _context())
            made.terminate()
            print("pid", reply.content["reply"]["pid"])
            print("threads", reply.content["reply"]["threads"])
            """
        )
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=root,
        env={
            **{k: v for k, v in os.environ.items() if k not in workers.THREAD_VARIABLES},
            "PYTHONPATH": str(root),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pid" in done.stdout
    assert marks.read_text() == "script ran\n"
    # this fresh process started the fork server: its libraries' thread pools are one
    # hospital's (threads=1), not the machine's, unless the environment says otherwise
    assert "threads 1\n" in done.stdout


def test_a_share_no_gpu_set_can_hold_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray would wait for ever for GPUs it cannot find; the simulation refuses to start."""
    from types import SimpleNamespace

    from fedpriv.config import RunConfig
    from fedpriv.errors import DeviceError
    from fedpriv.server import simulation

    monkeypatch.delenv(workers.BACKEND_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")
    plan = SimpleNamespace(
        config=RunConfig(gpus_per_hospital=2.0, cpus_per_hospital=1),
        run_dir=SimpleNamespace(file=lambda name: tmp_path / name),
    )
    with pytest.raises(DeviceError, match="needs 2 GPU\\(s\\) for one hospital but 1 can"):
        simulation._backend(plan)  # type: ignore[arg-type]
    plan.config = RunConfig(gpus_per_hospital=0.5, cpus_per_hospital=1)
    with simulation._backend(plan):  # type: ignore[arg-type]
        made = sys.modules[workers._RAY_MODULE].RayBackend({})
    assert made.num_workers == min(2, os.cpu_count() or 1)  # two shares of GPU 4, cores allowing
    assert made._gpus == ["4"] * made.num_workers


def test_flowers_exit_reason_is_read_from_its_log(tmp_path: Path) -> None:
    """Flower's flwr_exit logs its reason and exits; the simulation's error line quotes it."""
    from fedpriv.server.simulation import _flower_reason

    log = tmp_path / "flower.log"
    log.write_text(
        "2026-11-29 22:53:55,954 DEBUG flwr: backend_config: {}\n"
        "2026-11-29 22:53:55,955 ERROR flwr: Exit Code: 701\n\n\n"
        "Extra dependencies required for simulation are missing.\n\n"
        "To use simulation with the Ray backend, add ...\n"
    )
    assert _flower_reason(log) == "Extra dependencies required for simulation are missing."
    log.write_text("2026-11-29 22:53:55,954 INFO flwr: nothing went wrong\n")
    assert _flower_reason(log) == f"see {log}"
    assert _flower_reason(tmp_path / "absent.log") == f"see {tmp_path / 'absent.log'}"


def test_the_default_gpu_share_fits_the_gpus_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device auto on a GPU machine shares a GPU among the hospitals that run at once (one
    a core), but no more than one a GiB: each holds a CUDA context for the run."""
    from types import SimpleNamespace

    import torch

    from fedpriv.config import RunConfig
    from fedpriv.server import simulation

    memory = {"bytes": 8 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda k: SimpleNamespace(total_memory=memory["bytes"])
    )
    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 32)
    assert simulation.share_gpu(RunConfig()).gpus_per_hospital == 0.125  # 8 GiB: 8, not 32
    memory["bytes"] = 139 * 2**30
    assert simulation.share_gpu(RunConfig()).gpus_per_hospital == 0.0312
    assert simulation.share_gpu(RunConfig(cpus_per_hospital=4)).gpus_per_hospital == 0.125
    # the share is rounded down, so that as many fit as were counted (1/7 -> 0.1428, not 0.1429)
    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 7)
    share = simulation.share_gpu(RunConfig()).gpus_per_hospital
    assert len(workers.gpu_places(share, ["0"], 7)) == 7
    # what the user asks for wins; the CPU asked for gets none
    assert simulation.share_gpu(RunConfig(gpus_per_hospital=0.5)).gpus_per_hospital == 0.5
    assert simulation.share_gpu(RunConfig(device="cpu")).gpus_per_hospital == 0.0
