"""The SuperNode image's entrypoint (deploy/supernode-entrypoint.sh) with stand-ins for the
two programs it runs: what it hands each (this is its own logic; the compose pilot in
tests/deployment/test_kit.py runs it for real in the images)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "supernode-entrypoint.sh"


def _stubs(tmp_path: Path) -> Path:
    """`fedpriv` and `flower-supernode` that record their arguments and process id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("fedpriv", "flower-supernode"):
        stub = bin_dir / name
        stub.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$$" > "{tmp_path}/{name}.pid"\n'
            f'for a in "$@"; do printf "%s\\n" "$a"; done > "{tmp_path}/{name}.args"\n'
        )
        stub.chmod(0o755)
    return bin_dir


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PATH": f"{_stubs(tmp_path)}:{os.environ['PATH']}", **env}
    done = subprocess.run(
        ["sh", str(SCRIPT), *args], env=environment, capture_output=True, text=True, timeout=60
    )
    deadline = time.monotonic() + 30  # the worker's starter runs in the background
    while not (tmp_path / "fedpriv.args").exists() and time.monotonic() < deadline:
        if env.get("FEDPRIV_WARM_WORKER") == "0" or "--node-config" not in " ".join(args):
            break
        time.sleep(0.05)
    return done


CONFIG = 'hospital-name="st-mary" data-path="/data/records.csv" budget-epsilon=10.0'


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_the_worker_starts_with_the_supernodes_node_config_and_pid(
    tmp_path: Path, form: str
) -> None:
    given = ["--node-config", CONFIG] if form == "separate" else [f"--node-config={CONFIG}"]
    args = ["--superlink", "link:9092", *given, "--max-wait-time", "60"]
    done = _run(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    # the SuperNode gets every argument as given
    assert (tmp_path / "flower-supernode.args").read_text().splitlines() == args
    warm = (tmp_path / "fedpriv.args").read_text().splitlines()
    assert warm[:4] == ["site", "warm", "--node-config", CONFIG]
    # the worker watches the SuperNode: exec kept the entrypoint's process id
    supernode = (tmp_path / "flower-supernode.pid").read_text().strip()
    assert warm[4:] == ["--watch-pid", supernode, "--if-enabled"]


def test_no_node_config_or_the_worker_turned_off_starts_only_the_supernode(
    tmp_path: Path,
) -> None:
    done = _run(tmp_path, "--superlink", "link:9092")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "flower-supernode.args").exists()
    assert not (tmp_path / "fedpriv.args").exists()
    other = tmp_path / "off"
    other.mkdir()
    done = _run(other, "--node-config", CONFIG, FEDPRIV_WARM_WORKER="0")
    assert done.returncode == 0, done.stderr
    time.sleep(0.5)
    assert (other / "flower-supernode.args").exists() and not (other / "fedpriv.args").exists()
