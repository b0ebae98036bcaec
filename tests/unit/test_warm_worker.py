"""A real site's messages served by its warm worker (a real process over a real Unix socket):
the same replies and context state as the in-process handlers, one worker for many
messages, a fresh one for changed code, and a worker that stops when its SuperNode does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpriv import messages as msg
from fedpriv.client import warm
from fedpriv.client.app import app
from fedpriv.client.handlers import local_app
from fedpriv.client.site import check_site
from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.models import initial_state

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test its own worker directory; every worker it started is stopped at the end."""
    base = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))  # socket paths must be short
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    monkeypatch.delenv(warm.ENVIRONMENT, raising=False)
    yield base / f"fedpriv-warm-{os.getuid()}"
    for log in base.glob("*/*.log"):
        for line in log.read_text().splitlines():
            if "listening on" in line:
                pid = int(line.split("warm worker ")[1].split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
    shutil.rmtree(base, ignore_errors=True)


def _site(tmp_path: Path, ledger: str = "st-mary", **extra: object) -> dict:
    data = tmp_path / "st-mary.csv"
    rng = np.random.default_rng(0)
    rows = [f"{a:.3f},{b:.3f},{int(a + b > 0)}" for a, b in rng.normal(size=(80, 2))]
    data.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    site = {
        "hospital-name": "st-mary",
        "data-path": str(data),
        "ledger-path": str(tmp_path / f"{ledger}.sqlite"),
        "require-dp": False,
        **extra,
    }
    check_site(site)
    return site


def _context(site: dict, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=7, node_id=11, node_config=site, state=state or RecordDict(), run_config={}
    )


def _train_message(config: RunConfig) -> Message:
    args = {"in_features": 2, "num_classes": 2}
    weights = initial_state("mlp", config.seed, **args)
    record = msg.order_record(config, model_name="mlp", model_args=args)
    record[msg.SERVER_ROUND] = 1
    content = RecordDict(
        {
            msg.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
            msg.CONFIG: ConfigRecord(record),
        }
    )
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=11)


def _workers_started(runtime_dir: Path) -> int:
    return sum(log.read_text().count("listening on") for log in runtime_dir.glob("*.log"))


@pytest.mark.usefixtures("flower_task")
def test_the_worker_replies_as_the_in_process_handlers_and_keeps_the_context_state(
    tmp_path: Path, runtime_dir: Path
) -> None:
    site = _site(tmp_path)
    config = RunConfig(
        deployment=True,
        epsilon=4.0,
        rounds=2,
        local_epochs=1,
        batch_size=16,
        lr=0.1,
        insecure_dp_seed=5,
        seed=3,
    )
    assert warm.enabled(site)

    # the same site on a ledger of its own (a run spends budget: two runs on one ledger differ)
    in_process = _context(_site(tmp_path, ledger="in-process"))
    expected = local_app(_train_message(config), in_process)
    served_context = _context(site)
    reply = app(_train_message(config), served_context)

    assert _workers_started(runtime_dir) == 1  # it went through a worker, not in-process
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    assert reply.metadata.reply_to_message_id == expected.metadata.reply_to_message_id
    assert reply.metadata.message_type == MessageType.TRAIN
    got, want = reply.content, expected.content
    assert got.config_records[msg.HOSPITAL][msg.HOSPITAL_NAME] == "st-mary"
    assert set(got.array_records[msg.ARRAYS]) == set(want.array_records[msg.ARRAYS])
    # same seeded DP noise, same data, same model: the same update, bit for bit
    for key, array in got.array_records[msg.ARRAYS].items():
        np.testing.assert_array_equal(array.numpy(), want.array_records[msg.ARRAYS][key].numpy())
    assert got.metric_records[msg.METRICS]["epsilon"] == want.metric_records[msg.METRICS]["epsilon"]
    # the DP accountant rides in Flower's context state, returned with the reply
    key = "fedpriv-dp"
    assert key in served_context.state.config_records
    assert json.loads(str(served_context.state.config_records[key]["accountant"])) == json.loads(
        str(in_process.state.config_records[key]["accountant"])
    )

    # a second message (another ClientApp process would send it) meets the same worker
    second = app(_train_message(config.replace(seed=4)), _context(site))
    assert not second.has_error()
    assert _workers_started(runtime_dir) == 1


@pytest.mark.usefixtures("flower_task")
def test_a_failing_message_fails_as_in_process_naming_the_cause(
    tmp_path: Path, runtime_dir: Path
) -> None:
    site = _site(tmp_path)
    (tmp_path / "st-mary.csv").write_text("a,b\n1,2\n")  # the label column went missing
    config = RunConfig(deployment=True, dp=False)
    with pytest.raises(warm.WarmWorkerError, match="label"):
        app(_train_message(config), _context(site))
    assert _workers_started(runtime_dir) == 1


def test_a_site_can_turn_the_worker_off_and_simulated_hospitals_never_use_one() -> None:
    assert not warm.enabled({"partition-id": 0, "num-partitions": 5})
    assert not warm.enabled({"data-path": "x.csv", "warm-worker": False})
    assert not warm.enabled({"data-path": "x.csv", "warm-worker": "false"})
    assert warm.enabled({"data-path": "x.csv"})
    # a typo is one line naming the key, at `fedpriv site check` and at the first message
    with pytest.raises(ConfigError, match="'warm-worker' must be true or false"):
        check_site({"data-path": "x.csv", "warm-worker": "maybe"})
    with pytest.raises(ConfigError, match="'warm-worker-idle' must be a number of seconds"):
        warm.enabled({"data-path": "x.csv", "warm-worker-idle": -1})


@pytest.mark.usefixtures("flower_task")
def test_an_unsafe_worker_directory_means_no_worker_and_the_message_runs_here(
    tmp_path: Path, runtime_dir: Path
) -> None:
    runtime_dir.mkdir(mode=0o755)
    runtime_dir.chmod(0o755)  # others could reach the socket: not used
    site = _site(tmp_path)
    with pytest.raises(warm.WarmWorkerError, match="0700"):
        warm.socket_path(site)
    config = RunConfig(deployment=True, dp=False)
    reply = app(_train_message(config), _context(site))
    assert not reply.has_error()
    assert not list(runtime_dir.glob("*.sock"))


def test_changed_code_gets_another_worker(
    tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker is keyed by the code's content: an edit gets another worker; the same code
    elsewhere (the run's app bundle, unpacked by Flower, against the copy installed at the
    site) or merely touched is the same worker."""
    site = {"data-path": str(tmp_path / "x.csv")}
    first = warm.socket_path(site)
    assert warm.socket_path(dict(site)) == first
    assert warm.socket_path({**site, "hospital-name": "other"}) != first
    package = Path(warm.__file__).resolve().parents[1]
    bundle = tmp_path / "bundle" / "fedpriv"  # a copy elsewhere, with other file times
    shutil.copytree(package, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(warm, "_PACKAGE", bundle)
    assert warm._code_digest(bundle) == warm._code_digest(package)
    assert warm.socket_path(site) == first
    module = bundle / "client" / "warm.py"
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert warm.socket_path(site) == first
    module.write_text(module.read_text() + "\n# edited\n")
    assert warm.socket_path(site) != first


def test_the_worker_stops_when_its_supernode_is_gone(tmp_path: Path, runtime_dir: Path) -> None:
    runtime_dir.mkdir(mode=0o700)
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    path = runtime_dir / "w.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedpriv.client.warm",
            "--socket",
            str(path),
            "--watch-pid",
            str(supernode.pid),
            "--idle",
            "600",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            assert worker.poll() is None, "the worker exited before listening"
            time.sleep(0.1)
        assert path.exists()
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)  # only its user may connect
        time.sleep(1.5)
        assert worker.poll() is None  # it waits while the SuperNode lives
        supernode.kill()
        supernode.wait()
        assert worker.wait(timeout=30) == 0
        assert not path.exists()  # and leaves no socket behind
    finally:
        for process in (worker, supernode):
            if process.poll() is None:
                process.kill()


@pytest.mark.usefixtures("flower_task")
def test_a_worker_that_died_is_replaced_at_the_next_message(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """Killed (OOM, an operator): its socket file stays behind; the next message finds no one
    listening, removes it and starts a new worker."""
    site = _site(tmp_path)
    config = RunConfig(deployment=True, dp=False)
    assert not app(_train_message(config), _context(site)).has_error()
    log = next(runtime_dir.glob("*.log")).read_text()
    pid = int(log.split("warm worker ")[1].split()[0])
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # a zombie until reaped: its socket no longer accepts either way
    assert list(runtime_dir.glob("*.sock")), "the dead worker's socket file is still there"
    assert not app(_train_message(config), _context(site)).has_error()
    assert _workers_started(runtime_dir) == 2


def _node_config_text(site: dict) -> str:
    """The site as flower-supernode's --node-config takes it (TOML values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in site.items())


@pytest.mark.usefixtures("flower_task")
def test_a_worker_started_with_the_supernode_serves_its_first_message(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """`fedpriv site warm --node-config ...` starts the worker the SuperNode's ClientApp
    processes will look for (same socket: the node config as Flower parses the same text),
    so the first round does not wait for its imports."""
    from flwr.common.config import parse_config_args
    from typer.testing import CliRunner

    from fedpriv.cli import app as cli

    site = _site(tmp_path)
    text = _node_config_text(site)
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        result = CliRunner().invoke(
            cli, ["site", "warm", "--node-config", text, "--watch-pid", str(supernode.pid)]
        )
        assert result.exit_code == 0, result.output
        assert "warm worker listening on" in result.output
        assert _workers_started(runtime_dir) == 1
        # what a ClientApp process started by that SuperNode has as its node config
        config = RunConfig(deployment=True, rounds=1, local_epochs=1, batch_size=16, seed=3)
        reply = app(_train_message(config), _context(parse_config_args([text])))
        assert not reply.has_error(), reply.error if reply.has_error() else ""
        assert _workers_started(runtime_dir) == 1  # the one started early served it
        logs = "".join(log.read_text() for log in runtime_dir.glob("*.log"))
        assert "served a train message" in logs
        assert "went away" not in logs  # `site warm`'s check that it listens is no failure
        # a second `site warm` for the same node config keeps the worker that listens
        again = CliRunner().invoke(cli, ["site", "warm", "--node-config", text])
        assert again.exit_code == 0 and _workers_started(runtime_dir) == 1
    finally:
        supernode.kill()
        supernode.wait()


def test_site_warm_refuses_bad_input_in_one_line(tmp_path: Path, runtime_dir: Path) -> None:
    from typer.testing import CliRunner

    from fedpriv.cli import app as cli

    cases = {
        'data-path="': "--node-config cannot be read",
        'hospital-name="st-mary"': "runs no warm worker",
        f'data-path="{tmp_path}/x.csv" warm-worker=false': "runs no warm worker",
        f'data-path="{tmp_path}/x.csv" warm-worker-idle=-1': "warm-worker-idle",
    }
    for text, expected in cases.items():
        result = CliRunner().invoke(cli, ["site", "warm", "--node-config", text])
        assert result.exit_code != 0, text
        assert expected in result.output, (text, result.output)
        assert "Traceback" not in result.output
    assert _workers_started(runtime_dir) == 0


def test_site_warm_if_enabled_notes_a_site_without_a_worker(
    tmp_path: Path, runtime_dir: Path
) -> None:
    """The kit's entrypoint passes --if-enabled: a site that turned its worker off gets a
    note and exit 0 (the SuperNode's log shows no error line), bad input is still an error."""
    from typer.testing import CliRunner

    from fedpriv.cli import app as cli

    off = f'data-path="{tmp_path}/x.csv" warm-worker=false'
    result = CliRunner().invoke(cli, ["site", "warm", "--node-config", off, "--if-enabled"])
    assert result.exit_code == 0, result.output
    assert "runs no warm worker" in result.output and "error" not in result.output.lower()
    for text in ('data-path="', f'data-path="{tmp_path}/x.csv" warm-worker-idle=-1'):
        result = CliRunner().invoke(cli, ["site", "warm", "--node-config", text, "--if-enabled"])
        assert result.exit_code != 0 and "Traceback" not in result.output, text
    assert _workers_started(runtime_dir) == 0
