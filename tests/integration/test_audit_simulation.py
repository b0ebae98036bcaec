"""Membership-inference audits of real simulated runs, read back from the run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import fedpriv
from fedpriv.cli import app
from fedpriv.config import RunConfig
from fedpriv.privacy.audit import DEFAULT_ATTACKS, audit_run

runner = CliRunner()


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits, no DP, 3 rounds of 20 local epochs: a model that memorises. (breast-cancer, nearly
    linearly separable, leaks too little to show: AUC 0.55-0.59 whatever the overfitting.)"""
    out = tmp_path_factory.mktemp("overfit")
    config = RunConfig(
        dataset="digits",
        hospitals=2,
        rounds=3,
        local_epochs=20,
        dp=False,
        held_out_fraction=0.5,
        audit=True,
        out=str(out),
        run_name="overfit",
    )
    return fedpriv.simulate(config).run_dir


def test_an_overfit_model_without_dp_leaks_plainly(overfit: Path) -> None:
    result = runner.invoke(
        app,
        [
            "audit",
            str(overfit),
            "--attacks",
            "loss,lira,lira-offline,rmia",
            "--reference-models",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "without DP" in result.output
    audit = json.loads((overfit / "audit.json").read_text())
    assert audit["verdict"] == "no-dp" and audit["accounted_epsilon"] == {}
    attacks = audit["attacks"]
    assert set(attacks) == {"loss", "lira", "lira-offline", "rmia"}
    for entry in attacks.values():
        for key in (
            "auc",
            "auc_ci",
            "tpr_at_fpr",
            "tpr_at_fpr_ci",
            "balanced_accuracy",
            "epsilon_lower_bound",
            "epsilon_lower_bound_gdp",
            "per_hospital",
        ):
            assert key in entry, key
        assert set(entry["tpr_at_fpr"]) == {"0.1", "0.01", "0.001"}
        assert set(entry["per_hospital"]) == {"hospital-0", "hospital-1"}
    assert audit["non_members"] >= 700
    # 700+ non-members resolve 1 %, not 0.1 %
    assert attacks["loss"]["tpr_at_fpr_resolvable"] == {"0.1": True, "0.01": True, "0.001": False}
    # reference-model attacks see clearly above chance, and beat LOSS at 1 % FPR
    best = max(attacks["lira-offline"]["tpr_at_fpr"]["0.01"], attacks["rmia"]["tpr_at_fpr"]["0.01"])
    assert best >= 0.025 and best > 2 * attacks["loss"]["tpr_at_fpr"]["0.01"]
    for name in ("lira-offline", "rmia"):
        assert attacks[name]["auc"] >= 0.56 and attacks[name]["auc_ci"][0] > 0.53
    # the federated LOSS audit (hospitals returned counts only) equals the simulation audit's
    federated, grid = audit["federated"], audit["loss_grid"]
    assert federated["auc"] == grid["auc"]
    assert federated["tpr_at_fpr"] == grid["tpr_at_fpr"]
    assert abs(federated["auc"] - attacks["loss"]["auc"]) < 0.01
    report = (overfit / "report.html").read_text()
    assert (
        report.count("data:image/png;base64,") >= 2 and "without</b> differential privacy" in report
    )


def test_a_leak_beyond_the_accounted_epsilon_fails_loudly(overfit: Path, tmp_path: Path) -> None:
    # the same leaky model, but its privacy.json claims epsilon 0.01: what a DP bug looks like
    fake = tmp_path / "claims-dp"
    shutil.copytree(overfit, fake)
    (fake / "privacy.json").write_text(
        json.dumps(
            {
                "dp": True,
                "hospitals": {
                    h: {"epsilon": 0.01, "noise_multiplier": 1.0}
                    for h in ("hospital-0", "hospital-1")
                },
            }
        )
    )
    result = runner.invoke(
        app, ["audit", str(fake), "--attacks", "loss,rmia", "--reference-models", "2"]
    )
    assert result.exit_code == 3
    assert "AUDIT FAILED" in result.output
    assert json.loads((fake / "audit.json").read_text())["verdict"] == "fail"


def test_at_epsilon_one_the_audit_stays_under_the_ledger(tmp_path: Path) -> None:
    config = RunConfig(
        dataset="digits",
        hospitals=2,
        rounds=3,
        epsilon=1.0,
        held_out_fraction=0.5,
        canaries=100,
        out=str(tmp_path),
        run_name="dp1",
    )
    run = fedpriv.simulate(config)
    audit = audit_run(run.run_dir, attacks=DEFAULT_ATTACKS, reference_models=2)
    assert audit["verdict"] == "pass", audit["failures"]
    accounted = max(audit["accounted_epsilon"].values())
    assert accounted <= 1.0
    for entry in audit["attacks"].values():
        assert entry["epsilon_lower_bound"] <= accounted
        assert entry["epsilon_lower_bound_gdp"] <= accounted
        # near chance: epsilon 1 allows at most e/(1+e) = 0.73 in the worst case
        assert entry["auc"] < 0.6
    canaries = audit["canaries"]
    assert canaries["canaries"] == 100 and canaries["epsilon_lower_bound"] <= accounted
    # canaries are trained on and accounted, but never evaluated or tested
    parts = json.loads((run.run_dir / "partitions.json").read_text())
    planted = {c["index"] for c in parts["canaries"]}
    evaluated = set(parts["test"]).union(
        *(set(h["held_out"]) | set(h["train"]) for h in parts["hospitals"])
    )
    assert not planted & evaluated
    for k, hospital in enumerate(parts["hospitals"]):
        extra = sum(1 for c in parts["canaries"] if c["hospital"] == k and c["included"])
        assert (
            run.final["hospitals"][hospital["name"]]["train_examples"]
            == len(hospital["train"]) + extra
        )
        assert run.final["hospitals"][hospital["name"]]["num_examples"] == len(hospital["held_out"])
    assert np.isfinite(audit["attacks"]["loss"]["auc"])
