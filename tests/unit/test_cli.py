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


def test_an_error_line_keeps_its_brackets(tmp_path: Path) -> None:
    """Error lines are text, not rich markup: a path or a column with brackets stays whole."""
    _bad(
        ["simulate", "--dataset", "visits[site].csv", "--out", str(tmp_path)],
        "visits[site].csv",
    )


def test_unknown_activation(tmp_path: Path) -> None:
    _bad(
        ["simulate", "--model-activation", "gelu", "--out", str(tmp_path)],
        "model-activation must be one of relu, elu, tanh",
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
        (["--rounds", "0"], "--rounds must be > 0"),
        (["--lr", "0"], "--lr must be > 0"),
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
    import numpy as np

    from fedpriv.data.datasets import RecordSource
    from fedpriv.privacy.accounting import DpEvent
    from fedpriv.privacy.ledger import Ledger, LedgerSettings

    ledger = Ledger.open(
        path,
        create=LedgerSettings(budget_epsilon=8.0, delta=1e-5, identity="patient-column:mrn"),
    )
    assert ledger.key is not None
    ids = np.array([f"MRN-{i}" for i in range(10)], dtype=object)
    keyed = ledger.key.records(RecordSource(patient_ids=ids, patient_column="mrn"))
    for round_ in (1, 2):
        reservation = ledger.reserve(
            keyed,
            event=DpEvent(1.0, 0.1, 10),
            hospital="hospital-0",
            dataset_name="digits",
            run_id="r1",
            round_=round_,
            exact=True,
        )
    return reservation.epsilon_after


def test_budget_table_and_json(tmp_path: Path) -> None:
    import json

    spent = _ledger_with_spend(tmp_path / "hospital-0.sqlite")
    table = runner.invoke(app, ["budget", "--ledger-dir", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert "hospital-0" in table.output and f"{spent:.3f}" in table.output
    machine = runner.invoke(
        app,
        ["budget", "--ledger", str(tmp_path / "hospital-0.sqlite"), "--json", "--histogram"],
    )
    (entry,) = json.loads(machine.output)
    row = entry["summary"]
    assert row["max_epsilon"] == pytest.approx(spent) and row["max_exact"]
    assert row["events"] == 2 and row["runs"] == 1 and row["patients"] == 10
    assert row["budget_epsilon"] == 8.0 and row["remaining"] == pytest.approx(8.0 - spent)
    assert sum(band["patients"] for band in entry["histogram"]) == 10
    one = runner.invoke(
        app, ["budget", "--ledger", str(tmp_path / "hospital-0.sqlite"), "--patient", "MRN-3"]
    )
    said = " ".join(one.output.split())
    assert one.exit_code == 0 and "'MRN-3': epsilon" in said and "over 2 recorded" in said
    nobody = runner.invoke(
        app, ["budget", "--ledger", str(tmp_path / "hospital-0.sqlite"), "--patient", "X"]
    )
    assert "has no recorded spend" in " ".join(nobody.output.split())
    over = runner.invoke(
        app, ["budget", "--ledger", str(tmp_path / "hospital-0.sqlite"), "--over", "0.1", "--json"]
    )
    assert json.loads(over.output)[0]["summary"]["at_or_over"] == 10


def test_budget_on_a_zero_byte_ledger_is_one_line_and_keeps_the_file(tmp_path: Path) -> None:
    """Before, `fedpriv budget` turned an empty file into a new, empty ledger (exit 0)."""
    path = tmp_path / "zero.sqlite"
    path.write_bytes(b"")
    _bad(["budget", "--ledger", str(path)], "empty file (0 bytes)")
    assert path.read_bytes() == b""


def test_budget_migrate_converts_an_older_ledger(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "old.sqlite"
    shutil.copy(Path(__file__).parent.parent / "fixtures" / "ledger-schema1.sqlite", path)
    _bad(["budget", "--ledger", str(path)], "budget migrate")
    done = runner.invoke(app, ["budget", "migrate", "--ledger", str(path)])
    assert done.exit_code == 0 and "6 events kept" in " ".join(done.output.split())
    shown = runner.invoke(app, ["budget", "--ledger", str(path)])
    assert shown.exit_code == 0, shown.output


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


def test_bad_key_files_and_encrypted_models_are_one_line(tmp_path: Path) -> None:
    """Before: a truncated key file or a garbage/incomplete model.ckks.npz gave 'internal
    error'."""
    import numpy as np

    from fedpriv.config import RunConfig
    from fedpriv.privacy.he import SECRET_FILE, write_keys
    from fedpriv.server.rundir import ENCRYPTED_MODEL, RunDirectory

    write_keys(tmp_path / "keys")
    secret = (tmp_path / "keys" / SECRET_FILE).read_bytes()
    (tmp_path / "short.ctx").write_bytes(secret[:30])
    (tmp_path / "cut.ctx").write_bytes(secret[:400])
    _bad(["keys", "show", str(tmp_path / "short.ctx")], "truncated")
    _bad(["keys", "show", str(tmp_path / "cut.ctx")], "truncated or damaged")
    run = RunDirectory.create(tmp_path / "run")
    run.write_config(
        RunConfig(he=True), model_name="mlp", model_args={"in_features": 30, "num_classes": 2}
    )
    key = str(tmp_path / "keys" / SECRET_FILE)
    run.file(ENCRYPTED_MODEL).write_bytes(b"garbage, not a zip archive")
    _bad(["keys", "decrypt-model", str(run.path), "--secret", key], "cannot be read")
    np.savez(run.file(ENCRYPTED_MODEL), something=np.zeros(3))
    _bad(["keys", "decrypt-model", str(run.path), "--secret", key], "lacks the array")
