"""A real federation on 127.0.0.1 for the deployment tests: a SuperLink (TLS, SuperNode
authentication), SuperNodes started as separate processes, and Flower's own CLI.

Every wait is bounded; every process is started in its own session and killed (with its
children) when the federation closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONNECTION = "fedpriv-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def key_values(values: Mapping[str, Any]) -> str:
    """Flower's 'key=value key=value' form (TOML values) for --node-config / --run-config."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


class Federation:
    def __init__(self, workdir: Path, certs: Path) -> None:
        self.workdir = workdir
        self.certs = certs
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # the sites' warm workers (fedpriv.client.warm) put their sockets and logs here: a
        # short path (Unix sockets), this federation's own
        self.runtime = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
        self.lingering_workers: list[int] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "XDG_RUNTIME_DIR": str(self.runtime),
        }
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{(certs / "ca.crt").resolve()}"\n'
        )

    # ---- processes -----------------------------------------------------------------------

    def _start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        cwd.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        state = self.workdir / "superlink-state"
        state.mkdir(exist_ok=True)
        self._start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "superlink.crt"),
                "--ssl-keyfile",
                str(self.certs / "superlink.key"),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(state / "link.db"),
                "--disable-runtime-dependency-installation",
            ],
            self.workdir / "superlink",
        )
        self.wait_for_port(self.port, 60)

    def wait_for_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                sock.settimeout(0.3)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def register(self, hospital: str) -> int:
        public = self.certs / "supernodes" / f"{hospital}.pub"
        result = self.flwr("supernode", "register", str(public), CONNECTION, "--format", "json")
        reply = json.loads(result.stdout)
        assert reply.get("success"), (reply, result.stderr)
        return int(reply["node-id"])

    def start_supernode(
        self,
        hospital: str,
        node_config: Mapping[str, Any],
        *,
        key: Path | None = None,
        root_certificates: bool = True,
        max_wait: float = 60,
        label: str = "",
    ) -> subprocess.Popen[bytes]:
        args = [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key",
            str(key or self.certs / "supernodes" / hospital),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--node-config",
            key_values(node_config),
            "--max-wait-time",
            str(max_wait),
        ]
        if root_certificates:
            args += ["--root-certificates", str(self.certs / "ca.crt")]
        name = f"supernode-{label or hospital}"
        if name in self.processes:
            raise ValueError(f"{name} is already started: give it another label")
        return self._start(name, args, self.workdir / f"site-{label or hospital}")

    def kill(self, name: str) -> None:
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def close(self) -> None:
        for _name, process in list(self.processes.items()):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        # the sites' warm workers stop by themselves once their SuperNode is gone
        deadline = time.monotonic() + 20
        while self.warm_workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.lingering_workers = self.warm_workers()
        for pid in self.lingering_workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.runtime, ignore_errors=True)

    def warm_workers(self) -> list[int]:
        """Live warm-worker processes whose socket is in this federation's directory."""
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fedpriv.client.warm" in args and any(
                a.startswith(str(self.runtime).encode()) for a in args
            ):
                found.append(int(cmdline.parent.name))
        return found

    def warm_worker_log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.runtime.glob("*/*.log")))

    # ---- runs ------------------------------------------------------------------------------

    def online_nodes(self) -> int:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(result.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_online(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_nodes() >= count:
                return
            time.sleep(1.0)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout}s")

    def submit(self, run_config: Mapping[str, Any]) -> int:
        result = self.flwr(
            "run",
            str(ROOT),
            CONNECTION,
            "--format",
            "json",
            "--run-config",
            key_values(run_config),
        )
        reply = json.loads(result.stdout)
        assert reply.get("success"), (reply, result.stderr)
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        result = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        return dict(json.loads(result.stdout)["runs"][0])

    def wait_run(self, run_id: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if str(status.get("status", "")).startswith("finished"):
                return status
            time.sleep(2.0)
        raise TimeoutError(f"run {run_id} not finished after {timeout}s: {status}")
