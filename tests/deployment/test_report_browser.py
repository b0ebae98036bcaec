"""report.html in a real headless browser, for a simulation (audited with every attack), a
simulation under CKKS, and (in test_deployment.py) a deployment run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpriv.cli import app
from tests.report_browser import check_report, require_chromium

pytestmark = pytest.mark.timeout(900)

runner = CliRunner()

COMMON = ["--hospitals", "3", "--rounds", "2", "--dataset", "breast-cancer"]


def _simulate(tmp_path: Path, name: str, *extra: str) -> Path:
    result = runner.invoke(
        app, ["simulate", *COMMON, "--out", str(tmp_path), "--name", name, *extra]
    )
    assert result.exit_code == 0, result.output
    # library warnings (Opacus, PyTorch, Ray) go to the run's log, not the terminal
    assert "Warning" not in result.output and "warnings.warn" not in result.output, result.output
    return tmp_path / name


def test_an_audited_simulation_report_renders_every_section(tmp_path: Path) -> None:
    require_chromium()
    run = _simulate(tmp_path, "sim")
    audited = runner.invoke(
        app, ["audit", str(run), "--reference-models", "2", "--bootstrap", "50"]
    )
    assert audited.exit_code == 0, audited.output
    assert "audit verdict:" in audited.output and "Warning" not in audited.output
    audit = json.loads((run / "audit.json").read_text())
    sections = ["summary", "results", "settings", "privacy", "protection", "audit"]
    sections += [f"attack-{name}" for name in audit["attacks"]]
    text = check_report(run / "report.html", sections)
    assert "epsilon 4.00 at delta 1e-05" in text and "0.000" not in text.split("Results")[0]
    assert "in the clear" in text  # plain aggregation: the summary says what the server saw
    assert "True" not in text and "False" not in text


def test_a_ckks_simulation_report_shows_the_key_and_what_the_server_never_saw(
    tmp_path: Path,
) -> None:
    require_chromium()
    run = _simulate(tmp_path, "he", "--he")
    fingerprint = json.loads((run / "he.json").read_text())["rounds"][-1]["key_fingerprint"]
    text = check_report(
        run / "report.html",
        ["summary", "results", "settings", "privacy", "protection", "audit"],
    )
    assert fingerprint and fingerprint in text
    assert "never saw" in text and "encrypted contributions" in text
