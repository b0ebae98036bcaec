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
