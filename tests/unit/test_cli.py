"""The CLI's handling of bad input: one line naming the problem, exit code 2, no traceback.

These cases fail before any Flower process starts, so they run without the runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpriv.cli import app

runner = CliRunner()


def _bad(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    output = result.output.strip()
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert expected in output


def test_unknown_dataset(tmp_path: Path) -> None:
    _bad(
        ["simulate", "--dataset", "imagenet", "--out", str(tmp_path)], "unknown dataset 'imagenet'"
    )


def test_unknown_strategy(tmp_path: Path) -> None:
    _bad(["simulate", "--strategy", "fedsvd", "--out", str(tmp_path)], "unknown strategy 'fedsvd'")


def test_missing_file(tmp_path: Path) -> None:
    _bad(
        ["simulate", "--dataset", str(tmp_path / "x.csv"), "--out", str(tmp_path)], "does not exist"
    )


def test_npz_without_expected_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((3, 28, 28)))
    _bad(["simulate", "--dataset", str(path), "--out", str(tmp_path)], "lacks train_images")


def test_csv_without_label_column(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    _bad(["simulate", "--dataset", str(path), "--out", str(tmp_path)], "no label column 'label'")


def test_more_hospitals_than_records(tmp_path: Path) -> None:
    _bad(["simulate", "--hospitals", "1000", "--out", str(tmp_path)], "use fewer hospitals")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--alpha", "0", "--partition", "dirichlet"], "alpha must be > 0"),
        (["--alpha", "-2"], "alpha must be > 0"),
        (["--rounds", "0"], "rounds must be at least 1"),
        (["--partition", "natural"], "needs a site column"),
        (
            ["--partition", "label-skew", "--classes-per-hospital", "1", "--hospitals", "1"],
            "covers only 1 of 2",
        ),
    ],
)
def test_out_of_range_settings(tmp_path: Path, args: list[str], expected: str) -> None:
    _bad(["simulate", *args, "--out", str(tmp_path)], expected)


def test_cuda_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _bad(["simulate", "--device", "cuda", "--out", str(tmp_path)], "no usable CUDA GPU")


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    _bad(["simulate", "--resume", str(tmp_path)], "is not a fedpriv run directory")


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    _bad(["simulate", "--resume", str(tmp_path), "--lr", "0.5"], "only --rounds may be given")


def test_nothing_is_written_on_bad_input(tmp_path: Path) -> None:
    runner.invoke(app, ["simulate", "--rounds", "0", "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_gpu_share_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _bad(["simulate", "--gpus-per-hospital", "0.5", "--out", str(tmp_path)], "no usable CUDA GPU")


# ---- fedpriv budget ---------------------------------------------------------------------------


def _ledger_with_spend(path: Path) -> float:
    from fedpriv.privacy.dp import DpEvent
    from fedpriv.privacy.ledger import Ledger

    ledger = Ledger.open(path)
    for round_ in (1, 2):
        reservation = ledger.reserve(
            dataset_id="abc",
            dataset_name="digits",
            hospital="hospital-0",
            run_id="r1",
            round_=round_,
            event=DpEvent(1.0, 0.1, 10),
            accountant="rdp",
            delta=1e-5,
            budget_epsilon=8.0,
        )
    return reservation.spent_after


def test_budget_table_and_json(tmp_path: Path) -> None:
    import json

    spent = _ledger_with_spend(tmp_path / "hospital-0.sqlite")
    table = runner.invoke(app, ["budget", "--ledger-dir", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert "hospital-0" in table.output and f"{spent:.3f}" in table.output
    machine = runner.invoke(
        app, ["budget", "--ledger", str(tmp_path / "hospital-0.sqlite"), "--json"]
    )
    (row,) = json.loads(machine.output)
    assert row["epsilon"] == pytest.approx(spent) and row["rounds"] == 2 and row["runs"] == 1
    assert row["budget_epsilon"] == 8.0 and row["remaining"] == pytest.approx(8.0 - spent)


def test_budget_on_a_corrupted_ledger_is_one_line_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hospital-0.sqlite"
    path.write_bytes(b"\x00garbage" * 100)
    _bad(["budget", "--ledger", str(path)], "left untouched")
    assert path.read_bytes() == b"\x00garbage" * 100


def test_budget_needs_a_ledger(tmp_path: Path) -> None:
    _bad(["budget"], "give --ledger PATH or --ledger-dir DIR")
    _bad(["budget", "--ledger", str(tmp_path / "none.sqlite")], "no privacy ledger")
    _bad(["budget", "--ledger-dir", str(tmp_path)], "no ledgers")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--epsilon", "0"], "epsilon must be > 0"),
        (["--delta", "0.5"], "delta 0.5 must be below 1/n"),
        (["--accountant", "gdp"], "unknown accountant 'gdp'"),
        (["--epsilon", "20"], "more than the hospitals' budget cap"),
        (["--dp-level", "client", "--strategy", "fedprox"], "use fedavg or fedsgd"),
        (["--grad-sample-mode", "fast"], "unknown grad-sample-mode 'fast'"),
    ],
)
def test_bad_dp_settings(tmp_path: Path, args: list[str], expected: str) -> None:
    _bad(["simulate", *args, "--out", str(tmp_path)], expected)
