"""`fedpriv simulate` as a user runs it: a real process, a real Flower simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _fedpriv(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )


def test_cli_runs_a_federation_and_prints_a_summary(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('dataset = "breast-cancer"\nhospitals = 3\nrounds = 5\n')
    result = _fedpriv(
        "simulate",
        "--config",
        str(config),
        "--rounds",
        "2",
        "--strategy",
        "fedsgd",
        "--server-lr",
        "0.5",
        "--no-dp",
        "--out",
        str(tmp_path),
        "--name",
        "cli",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "central test split" in result.stdout
    assert "hospital-2" in result.stdout
    run_dir = tmp_path / "cli"
    saved = json.loads((run_dir / "config.json").read_text())
    # flags beat the file, the file beats the defaults
    assert saved["rounds"] == 2 and saved["hospitals"] == 3 and saved["strategy"] == "fedsgd"
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    # Flower's own log went to the run directory, not to the terminal
    assert "ROUND" in (run_dir / "flower.log").read_text()
    assert "flwr" not in result.stderr.lower()
    # switching DP off is explicit, and loud
    assert "DP is OFF" in result.stderr and "unprotected" in result.stderr
    assert saved["dp"] is False


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _fedpriv("simulate", "--hospitals", "400", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 400 hospitals need"), result.stderr
    assert not any(tmp_path.iterdir()) or all(p.name == "run.toml" for p in tmp_path.iterdir())


def _fedpriv_without_ray(
    *args: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``fedpriv`` in a process where ``import ray`` fails, as where Ray is not installed."""
    code = (
        "import sys; sys.modules['ray'] = None; "
        f"sys.argv = ['fedpriv', *{list(args)!r}]; "
        "from fedpriv.cli import main; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )


def test_a_simulation_needs_no_ray_and_asking_for_a_missing_ray_is_one_line(
    tmp_path: Path,
) -> None:
    """The forked workers do not need Ray (a lent GPU machine had none: Flower exited 701,
    silently, before they were told not to ask for it); FEDPRIV_SIMULATION_BACKEND=ray without
    Ray is one line and no run directory, not Flower's silent exit."""
    args = ["simulate", "--dataset", "breast-cancer", "--hospitals", "2", "--rounds", "1"]
    args += ["--no-dp", "--out", str(tmp_path)]
    ran = _fedpriv_without_ray(
        *args, "--name", "forked", cwd=tmp_path, env={"FEDPRIV_SIMULATION_BACKEND": "forked"}
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (tmp_path / "forked" / "report.html").exists()
    refused = _fedpriv_without_ray(
        *args, "--name", "ray", cwd=tmp_path, env={"FEDPRIV_SIMULATION_BACKEND": "ray"}
    )
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert "asks for Ray, which is not installed here (pip install 'flwr[simulation]')" in lines[0]
    assert not (tmp_path / "ray").exists()
