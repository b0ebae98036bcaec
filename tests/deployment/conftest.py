"""Fixtures for the deployment tests: certificates, CKKS keys, three hospitals' data files,
and one real federation shared by the tests of a module (SuperLink start-up is costly)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deployment.federation import Federation

HOSPITALS = ("st-mary", "county", "university")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/deployment" in str(item.fspath):
            item.add_marker(pytest.mark.deployment)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    from fedpriv.certs import init_certs
    from fedpriv.privacy.he import write_keys

    base = tmp_path_factory.mktemp("deployment")
    init_certs(base / "certs", hosts=["localhost", "127.0.0.1"], hospitals=[*HOSPITALS, "intruder"])
    write_keys(base / "he")
    data = load_breast_cancer()
    sites = {}
    for k, hospital in enumerate(HOSPITALS):
        path = base / f"{hospital}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([f"f{i}" for i in range(data.data.shape[1])] + ["label"])
            for row, label in zip(data.data[k::3], data.target[k::3], strict=True):
                writer.writerow([*row.tolist(), int(label)])
        sites[hospital] = {
            "hospital-name": hospital,
            "data-path": str(path),
            "ledger-path": str(base / "ledgers" / f"{hospital}.sqlite"),
            "budget-epsilon": 10.0,
            "device": "cpu",
            "he-secret-context": str(base / "he" / "secret.ctx"),
        }
    return {"base": base, "sites": sites}


@pytest.fixture(scope="module")
def federation(kit: dict[str, Any]) -> Iterator[Federation]:
    fed = Federation(kit["base"] / "fed", kit["base"] / "certs")
    try:
        fed.start_superlink()
        for hospital in HOSPITALS:
            fed.register(hospital)
            fed.start_supernode(hospital, kit["sites"][hospital])
        fed.wait_online(len(HOSPITALS), 90)
        yield fed
    finally:
        fed.close()
    assert not fed.lingering_workers, (
        f"warm workers {fed.lingering_workers} outlived their SuperNodes by 20 s"
    )
