"""The container kit, built and started for real: deploy/build-images.sh builds the two images
(on a base made from Debian packages where no registry is reachable), deploy/pilot.sh starts
the compose pilot (a SuperLink and three hospitals, each container as user 10001 with a
read-only root filesystem) and runs two rounds with TLS, node authentication, DP and CKKS.

Skipped, with the reason, where Podman or podman-compose does not work. The pilot runs under
its own compose project, port and directory, and its volumes are deleted afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deployment.federation import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
APP_UID = 10001

# a first build (Debian base, PyTorch and Flower's dependencies) takes minutes; the pilot
# itself (start-up, registration, two rounds) about two
pytestmark = pytest.mark.timeout(2700)


def _compose() -> str | None:
    candidates = [os.environ.get("KIT_COMPOSE"), shutil.which("podman-compose")]
    candidates.append(str(ROOT / ".venv-deploy" / "bin" / "podman-compose"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def _podman_problem() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman buildah debootstrap)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        return f"podman does not work here: {(info.stderr or info.stdout).strip()[-300:]}"
    if _compose() is None:
        return "podman-compose is not installed (`make lint-deploy` puts it in .venv-deploy)"
    return None


def _runtime() -> list[str]:
    """The runtime the kit's scripts choose: KIT_RUNTIME, else runc where it is installed
    (crun refuses hosts with hybrid cgroups), else Podman's default."""
    runtime = os.environ.get("KIT_RUNTIME") or ("runc" if shutil.which("runc") else "")
    return ["--runtime", runtime] if runtime else []


def _podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        ["podman", *_runtime(), *args], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (args, result.stderr[-2000:])
    return result.stdout


@pytest.fixture(scope="module")
def images() -> str:
    problem = _podman_problem()
    if problem:
        pytest.skip(problem)
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build-images.sh")],
        capture_output=True,
        text=True,
        timeout=2100,
        stdin=subprocess.DEVNULL,
    )
    skipped = re.search(r"^SKIP: (.*)$", build.stderr, re.MULTILINE)
    if build.returncode == 0 and skipped:
        pytest.skip(skipped.group(1))
    assert build.returncode == 0, (build.stdout[-3000:], build.stderr[-3000:])
    return build.stdout


def test_the_compose_pilot_runs_two_rounds_with_tls_dp_and_he(
    images: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for role in ("superlink", "supernode"):
        config = json.loads(_podman("image", "inspect", f"fedpriv/{role}:0.1.0"))[0]["Config"]
        assert config["User"] == f"{APP_UID}:{APP_UID}", f"the {role} image runs as app"
        exposed = set(config.get("ExposedPorts") or {})
        assert exposed == ({"9092/tcp"} if role == "superlink" else set()), exposed

    pilot = tmp_path_factory.mktemp("pilot")
    project = f"fedpriv-kit-test-{os.getpid()}"
    env = {
        **os.environ,
        "PILOT_DIR": str(pilot),
        "PROJECT": project,
        "SUPERLINK_PORT": str(free_port()),
        "COMPOSE": str(_compose()),
        "FLWR": str(BIN / "flwr"),
        "RUN_NAME": "kit-test",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    script = str(ROOT / "deploy" / "pilot.sh")
    try:
        started = time.monotonic()
        result = subprocess.run(
            ["bash", script, "all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            stdin=subprocess.DEVNULL,
        )
        seconds = time.monotonic() - started
        logs = subprocess.run(
            ["bash", script, "logs"], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (
            result.stdout[-3000:],
            result.stderr[-3000:],
            logs.stdout[-4000:],
        )
        measured = re.search(r"up to the end of 2 rounds: ([0-9.]+) s", result.stdout)
        assert measured, result.stdout[-2000:]
        print(f"\ncompose pilot: {measured.group(1)} s from up to the end of two rounds")
        assert 0 < float(measured.group(1)) < seconds

        # the run: two rounds over all three hospitals, DP spent, only ciphertext kept
        run = pilot / "runs" / "kit-test"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert set(rows[-1]["hospitals"]) == set(HOSPITALS)
        assert all(0 < rows[-1]["epsilon"][h] <= 3.0 for h in HOSPITALS), rows[-1]["epsilon"]
        assert (run / "model.ckks.npz").exists() and not (run / "model.pt").exists()
        he = json.loads((run / "he.json").read_text())["rounds"]
        assert [r["hospitals"] for r in he] == [3, 3] and all(r["rejected"] == [] for r in he)

        # the containers run as app; each hospital's ledger is on its volume, owned by app
        for service in ("superlink", *HOSPITALS):
            name = _podman(
                "ps",
                "--filter",
                f"label=com.docker.compose.project={project}",
                "--filter",
                f"label=com.docker.compose.service={service}",
                "--format",
                "{{.Names}}",
            ).split()
            assert len(name) == 1, (service, name)
            assert _podman("exec", name[0], "id", "-u").strip() == str(APP_UID)
            if service != "superlink":
                # the image's entrypoint started the site's warm worker beside the SuperNode,
                # and that worker served the run (another would have a log of its own)
                said = subprocess.run(
                    ["podman", "logs", name[0]], capture_output=True, text=True, timeout=60
                )
                assert "warm worker listening on" in said.stdout + said.stderr, service
                workers = _podman("exec", name[0], "sh", "-c", "cat /tmp/fedpriv-warm-*/*.log")
                assert workers.count("listening on") == 1, (service, workers[-2000:])
        ledger = _podman(
            "run",
            "--rm",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            "-v",
            f"{project}_hospital-1-state:/state:ro",
            "--entrypoint",
            "fedpriv",
            "fedpriv/supernode:0.1.0",
            "budget",
            "--ledger",
            "/state/ledger.sqlite",
            "--json",
        )
        assert json.loads(ledger)[0]["summary"]["events"] == 2

        # the host-side files keep their modes; the containers read owned copies
        for original in (
            pilot / "certs" / "supernodes" / "hospital-1",
            pilot / "he" / "secret.ctx",
        ):
            assert stat.S_IMODE(original.stat().st_mode) == 0o600, original
        copy = (pilot / "mounts" / "hospital-1" / "keys" / "supernode.key").stat()
        assert stat.S_IMODE(copy.st_mode) == 0o400
        if os.geteuid() == 0:
            assert (copy.st_uid, copy.st_gid) == (APP_UID, APP_UID)
    finally:
        subprocess.run(
            ["bash", script, "down", "-v"], env=env, capture_output=True, text=True, timeout=300
        )
