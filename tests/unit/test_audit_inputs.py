"""Damaged run directories: `fedpriv audit` and `fedpriv report` answer with one line naming
the file and a non-zero exit, and change nothing in the run directory (issue 12, section 5).

The run directory is made by hand (a real model, real data, a partition written as fedpriv
writes it) so that each case damages exactly one thing of an otherwise auditable run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedpriv.cli import app
from fedpriv.models import build

runner = CliRunner()


def _run_dir(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    config = {
        "dataset": "breast-cancer",
        "model": "mlp",
        "model-args": {"in_features": 30, "num_classes": 2},
        "delta": 1e-5,
        "dp": False,
        "rounds": 1,
        "aggregation": "plain",
    }
    (run / "config.json").write_text(json.dumps(config))
    partitions = {
        "hospitals": [
            {
                "hospital": 0,
                "name": "hospital-0",
                "train": list(range(0, 80)),
                "held_out": list(range(80, 100)),
            },
            {
                "hospital": 1,
                "name": "hospital-1",
                "train": list(range(100, 180)),
                "held_out": list(range(180, 200)),
            },
        ],
        "test": list(range(200, 300)),
        "canaries": [],
    }
    (run / "partitions.json").write_text(json.dumps(partitions))
    torch.manual_seed(0)
    torch.save(build("mlp", in_features=30, num_classes=2).state_dict(), run / "model.pt")
    row = {"round": 1, "test_accuracy": 0.5, "eval_accuracy": 0.5, "epsilon": {}}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return run


def _digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())}


def _one_line_failure(args: list[str], run: Path, expected: str) -> None:
    before = _digest(run)
    result = runner.invoke(app, args)
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "internal error" not in output, output
    assert len(output.splitlines()) == 1, output
    assert expected in output, output
    assert _digest(run) == before  # nothing written, nothing rewritten


def test_a_healthy_run_audits_so_the_damage_below_is_what_fails(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    result = runner.invoke(app, ["audit", str(run), "--attacks", "loss", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "audit verdict" in result.output
    assert json.loads((run / "audit.json").read_text())["attacks"]["loss"]["members"] == 160


def _truncate(name: str, keep: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:keep])

    return damage


def _edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        data = json.loads((run / name).read_text())
        edit(data)
        (run / name).write_text(json.dumps(data))

    return damage


def _set_train(index: int) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["hospitals"][0]["train"][3] = index

    return edit


DAMAGE = {
    "truncated config": (_truncate("config.json", 40), "config.json' is damaged"),
    "config without model": (
        _edit_json("config.json", lambda d: d.pop("model")),
        "has no 'model'",
    ),
    "corrupted metrics": (
        lambda run: (run / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "tes\n'),
        "metrics.jsonl' line 2 is damaged",
    ),
    "negative index": (_edit_json("partitions.json", _set_train(-1)), "names record -1"),
    "index past the data": (
        _edit_json("partitions.json", _set_train(100000)),
        "names record 100000",
    ),
    "fractional index": (
        _edit_json("partitions.json", _set_train(2.5)),  # type: ignore[arg-type]
        "whole record indices",
    ),
    "member and non-member at once": (
        _edit_json("partitions.json", _set_train(90)),
        "both trained on and held out",
    ),
    "truncated partitions": (_truncate("partitions.json", 100), "partitions.json' is damaged"),
    "truncated model": (_truncate("model.pt", 300), "model.pt' does not load"),
    "config not an object": (
        lambda run: (run / "config.json").write_text("[1, 2]"),
        "does not hold a JSON object",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_audit_inputs_give_one_line(tmp_path: Path, case: str) -> None:
    run = _run_dir(tmp_path)
    damage, expected = DAMAGE[case]
    damage(run)
    _one_line_failure(["audit", str(run), "--attacks", "loss"], run, expected)


def test_a_half_written_run_is_named_as_such(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    for name in ("partitions.json", "model.pt", "metrics.jsonl"):
        (run / name).unlink()
    _one_line_failure(["audit", str(run)], run, "did not get past its start")


@pytest.mark.parametrize(
    "case",
    ["truncated config", "config without model", "corrupted metrics", "config not an object"],
)
def test_damaged_report_inputs_give_one_line(tmp_path: Path, case: str) -> None:
    run = _run_dir(tmp_path)
    damage, expected = DAMAGE[case]
    damage(run)
    _one_line_failure(["report", str(run)], run, expected)


def test_every_registered_attack_says_why_it_cannot_run_on_a_deployment(tmp_path: Path) -> None:
    from fedpriv.privacy.audit import all_attacks, available_audits, create_audit
    from fedpriv.privacy.audit.base import NEEDS

    for name in available_audits():
        assert create_audit(name).needs <= set(NEEDS), name
    run = _run_dir(tmp_path)
    (run / "partitions.json").unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "deployment": True}))
    result = runner.invoke(app, ["audit", str(run)])
    assert result.exit_code == 0, result.output
    audit = json.loads((run / "audit.json").read_text())
    assert audit["attacks"] == {}
    assert set(audit["skipped"]) == set(all_attacks())
    assert all("deployment run" in reason for reason in audit["skipped"].values())
    assert "not run" in result.output and "Traceback" not in result.output
    # asked for by name, an attack that cannot run is an error, not an empty audit
    _one_line_failure(["audit", str(run), "--attacks", "lira"], run, "deployment run")


def test_an_unknown_attack_is_named(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    _one_line_failure(["audit", str(run), "--attacks", "loss,zip"], run, "unknown attack 'zip'")
