"""A real simulation's workers train on the dataset the server loaded (fedpriv.data.handoff)
instead of each parsing the file again: with the file gone after the server read it, every
hospital still trains, on exactly the records the recorded split names."""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpriv.config import RunConfig
from fedpriv.data import handoff
from fedpriv.server import workers
from fedpriv.server.simulation import prepare_simulation, run_plan


def _csv(path: Path, rows: int = 240) -> Path:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(rows, 4))
    labels = (features[:, 0] + 0.3 * rng.normal(size=rows) > 0).astype(int)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "c", "d", "label"])
        for row, label in zip(features.round(4).tolist(), labels.tolist(), strict=True):
            writer.writerow([*row, label])
    return path


@pytest.mark.parametrize("backend", ["forked", "ray"])
def test_workers_train_on_the_servers_copy_of_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """On both simulation backends: the default forked workers (server/workers.py) and the
    Ray actors kept for GPU shares (``FEDPRIV_SIMULATION_BACKEND=ray``)."""
    if backend == "ray":
        monkeypatch.setenv(workers.BACKEND_ENV, "ray")
    else:
        monkeypatch.delenv(workers.BACKEND_ENV, raising=False)
    data = _csv(tmp_path / "site.csv")
    config = RunConfig(
        dataset=str(data), hospitals=3, rounds=1, dp=False, out=str(tmp_path), run_name="h"
    )
    plan = prepare_simulation(config)
    data.rename(tmp_path / "gone.csv")  # a worker that opened the file now would fail
    used: list[Path | None] = []
    real = handoff.shared_datasets

    @contextlib.contextmanager
    def noted(datasets: Any) -> Iterator[Path | None]:
        with real(datasets) as directory:
            used.append(directory)
            yield directory

    monkeypatch.setattr(handoff, "shared_datasets", noted)
    result = run_plan(plan)
    (row,) = result.rows
    assert sorted(row["hospitals"]) == ["hospital-0", "hospital-1", "hospital-2"]
    recorded = plan.run_dir.read_partitions()
    for k, hospital in enumerate(recorded.hospitals):
        assert row["hospitals"][f"hospital-{k}"]["train_examples"] == hospital.train.size
    assert handoff.ENV not in os.environ
    (directory,) = used
    assert directory is not None and not directory.exists()  # the copy went with the run
    # the forked workers write what they print to the run directory; Ray's keep it
    assert (plan.run_dir.path / workers.WORKERS_LOG).exists() == (backend == "forked")
