"""The simulation's data handoff: workers read the server's copy only from a directory that
is this user's alone, and nothing outlives the simulation."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedpriv.data import handoff

ARGS = ("data.csv", "label", "site", "", "", "auto")


def test_a_worker_reads_what_the_server_shared_and_nothing_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(handoff.ENV, raising=False)
    value = {"features": np.arange(6.0)}
    with handoff.shared_datasets({ARGS: value}) as directory:
        assert directory is not None and os.environ[handoff.ENV] == str(directory)
        assert oct(directory.stat().st_mode & 0o777) == "0o700"
        (file,) = directory.iterdir()
        assert oct(file.stat().st_mode & 0o777) == "0o600"
        got = handoff.read(ARGS)
        assert got is not None and np.array_equal(got["features"], value["features"])
        assert handoff.read((*ARGS[:-1], "schema")) is None  # other arguments: not shared
    assert not directory.exists() and handoff.ENV not in os.environ
    assert handoff.read(ARGS) is None


def test_a_directory_others_can_enter_or_a_linked_file_is_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(handoff.ENV, raising=False)
    with handoff.shared_datasets({ARGS: [1, 2]}) as directory:
        assert directory is not None
        directory.chmod(0o755)
        assert handoff.read(ARGS) is None
        directory.chmod(0o700)
        assert handoff.read(ARGS) == [1, 2]
        (directory / handoff.key(ARGS)).rename(directory / "elsewhere")
        (directory / handoff.key(ARGS)).symlink_to(directory / "elsewhere")
        assert handoff.read(ARGS) is None


def test_nothing_to_share_or_an_outer_simulation_shares_nothing_new(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(handoff.ENV, raising=False)
    with handoff.shared_datasets({}) as directory:
        assert directory is None and handoff.ENV not in os.environ
    with handoff.shared_datasets({ARGS: 1}) as outer, handoff.shared_datasets({ARGS: 2}) as inner:
        assert outer is not None and inner is None and handoff.read(ARGS) == 1
