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
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    yield home, env
    _stop_superlink(home)


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


@pytest.mark.skipif(FLWR is None, reason="the flwr CLI is not installed")
def test_flwr_run_runs_the_app_from_pyproject(
    tmp_path: Path, flower_home: tuple[Path, dict[str, str]]
) -> None:
    _, env = flower_home
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "runs"
    run_config = f'hospitals=3 rounds=2 out="{out}" run-name="flwr"'
    submit = subprocess.run(
        [
            str(FLWR),
            "run",
            str(ROOT),
            "--format",
            "json",
            "--run-config",
            run_config,
            "--federation-config",
            "num-supernodes=3 client-resources-num-cpus=1",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert submit.returncode == 0, submit.stderr
    reply = json.loads(submit.stdout)
    assert reply.get("success"), reply
    run_id = str(reply["run-id"])
    # `flwr log` streams until the run ends (it exits 0 either way, so check the status after)
    log = subprocess.run(
        [str(FLWR), "log", run_id],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    status = json.loads(
        subprocess.run(
            [str(FLWR), "ls", "--run-id", run_id, "--format", "json"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        ).stdout
    )
    assert status["runs"][0]["status"] == "finished:completed", (status, log.stdout[-3000:])
    run_dir = out / "flwr"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert set(rows[-1]["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert (run_dir / "model.pt").is_file() and (run_dir / "partitions.json").is_file()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["dataset"] == "breast-cancer", "the defaults come from pyproject.toml"
