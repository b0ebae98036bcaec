"""`flwr run .`: Flower's own CLI starts a local SuperLink and runs our app from pyproject.toml.

Everything stays on 127.0.0.1 in a private FLWR_HOME; the SuperLink is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# slow real simulations: `make test-slow` (CI runs it too), not `make test`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLWR = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def flower_home(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # the app's dependencies are already installed; never reach for PyPI at run time
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    _start_local_superlink(home, env)
    try:
        yield home, env
    finally:
        _stop_superlink(home)


def _start_local_superlink(home: Path, env: dict[str, str]) -> None:
    """Start the SuperLink `flwr run` would start for ":local:", and wait for it here: Flower
    gives its own start 15 s and kills it after, which a loaded machine misses."""
    runtime = home / "local-superlink"
    runtime.mkdir()
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--log-file",
        str(runtime / "superlink.log"),
        "--database",
        str(runtime / "state.db"),
    ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, (runtime / "superlink.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the local SuperLink did not start within 180 s")


def _stop_superlink(home: Path) -> None:
    marker = str(home / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


# starting a SuperLink, a Ray simulation and training take minutes on a loaded machine
@pytest.mark.timeout(900)
@pytest.mark.skipif(FLWR is None, reason="the flwr CLI is not installed")
def test_flwr_run_runs_the_app_from_pyproject(
    tmp_path: Path, flower_home: tuple[Path, dict[str, str]]
) -> None:
    """`flwr run . --stream`, as a researcher types it: the terminal shows fedpriv's rounds,
    federated accuracy, each hospital's epsilon and the run directory, and the run leaves
    report.html beside its metrics (before, the stream showed nothing of fedpriv)."""
    _, env = flower_home
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "runs"
    run_config = f'hospitals=3 rounds=2 out="{out}" run-name="flwr"'
    # --stream follows the run's log until it ends (and exits 0 either way: check the
    # status after)
    command = [
        str(FLWR),
        "run",
        str(ROOT),
        "--stream",
        "--run-config",
        run_config,
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1",
    ]
    streamed = subprocess.run(
        command,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
        stdin=subprocess.DEVNULL,
    )
    assert streamed.returncode == 0, streamed.stderr
    status = json.loads(
        subprocess.run(
            [str(FLWR), "ls", "--format", "json"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        ).stdout
    )
    shown = streamed.stdout
    assert status["runs"][0]["status"] == "finished:completed", (status, shown[-3000:])
    run_dir = out / "flwr"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert set(rows[-1]["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert (run_dir / "model.pt").is_file() and (run_dir / "partitions.json").is_file()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["dataset"] == "breast-cancer", "the defaults come from pyproject.toml"
    # what the researcher saw: the run directory, every round with its federated accuracy
    # and each hospital's epsilon (as metrics.jsonl holds them), and where the report is
    assert f"run directory: {run_dir.resolve()}" in shown, shown[-3000:]
    for row in rows:
        line = next((x for x in shown.splitlines() if f"round {row['round']}/2: " in x), None)
        assert line is not None, shown[-3000:]
        assert f"federated accuracy {row['eval_accuracy']:.3f}" in line, line
        for hospital, epsilon in row["epsilon"].items():
            assert f"{hospital} {epsilon:.3f}" in line, line
    assert (run_dir / "report.html").is_file(), "a flwr run writes its report like simulate"
    assert f"report: {(run_dir / 'report.html').resolve()}" in shown, shown[-3000:]
