"""fedpriv on Flower's deployment engine: real SuperLink and SuperNode processes on 127.0.0.1,
TLS and SuperNode authentication on, DP and HE on."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedpriv.cli import app
from fedpriv.models import build
from fedpriv.privacy.ledger import Ledger
from tests.deployment.conftest import HOSPITALS
from tests.deployment.federation import CONNECTION, Federation
from tests.report_browser import check_report

pytestmark = pytest.mark.timeout(600)


def _run_config(kit: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    return {
        "deployment": True,
        "hospitals": len(HOSPITALS),
        "rounds": 2,
        "he": True,
        "keys": str(kit["base"] / "he"),
        "out": str(kit["base"] / "runs"),
        "run-name": name,
        "epsilon": 3.0,
        **extra,
    }


def test_a_dp_he_run_across_three_sites(federation: Federation, kit: dict[str, Any]) -> None:
    started = time.monotonic()
    run_id = federation.submit(_run_config(kit, "secure", audit=True))
    status = federation.wait_run(run_id, 400)
    seconds = time.monotonic() - started
    assert status["status"] == "finished:completed", (status, federation.log("superlink")[-3000:])
    run = kit["base"] / "runs" / "secure"
    # the run wrote its own report, and its log (what `flwr run --stream` shows) has the
    # rounds, each site's epsilon and the run directory
    assert (run / "report.html").is_file(), "a deployment run writes report.html itself"
    shown = federation.flwr("log", str(run_id), CONNECTION, "--show").stdout
    assert f"run directory: {run.resolve()}" in shown, shown[-3000:]
    for hospital in HOSPITALS:
        assert re.search(rf"round 2/2: .*{hospital} \d", shown), shown[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert set(rows[-1]["hospitals"]) == set(HOSPITALS)
    assert rows[-1]["test_accuracy"] is None, "the server holds no data to test on"
    # each site's messages were served by its warm worker, one process per site
    workers = federation.warm_worker_log()
    assert workers.count("listening on") == len(HOSPITALS), workers[-3000:]
    assert workers.count("served a train message") >= 2 * len(HOSPITALS), workers[-3000:]
    # every site's own ledger shows its spend, and the server only learnt what they reported
    for hospital in HOSPITALS:
        ledger = Ledger.open(kit["sites"][hospital]["ledger-path"], writable=False)
        spend = ledger.summary()
        assert spend.events == 2 and spend.max_exact and 0 < spend.max_epsilon <= 3.0
        assert {e.dataset_name for e in ledger.events()} == {f"{hospital}.csv"}, (
            "the ledger names the site's own file"
        )
        assert rows[-1]["epsilon"][hospital] == pytest.approx(spend.max_epsilon)
    budget = CliRunner().invoke(
        app, ["budget", "--ledger", kit["sites"]["st-mary"]["ledger-path"], "--json"]
    )
    assert json.loads(budget.output)[0]["summary"]["events"] == 2
    # the server kept only ciphertext; a hospital decrypts the final model
    assert not (run / "model.pt").exists() and (run / "model.ckks.npz").exists()
    decrypted = CliRunner().invoke(
        app, ["keys", "decrypt-model", str(run), "--secret", str(kit["base"] / "he" / "secret.ctx")]
    )
    assert decrypted.exit_code == 0, decrypted.output
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "mlp" and config["model-args"]["in_features"] == 30
    model = build(config["model"], **config["model-args"])
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    he = json.loads((run / "he.json").read_text())["rounds"]
    assert all(r["rejected"] == [] and r["hospitals"] == 3 for r in he)
    # the audit says which attacks cannot run without central records; the report renders
    audited = CliRunner().invoke(app, ["audit", str(run)])
    assert audited.exit_code == 0, audited.output
    audit = json.loads((run / "audit.json").read_text())
    assert audit["attacks"] == {} and "deployment run" in audit["skipped"]["loss"]
    assert audit["federated"]["members"] > 0, "the hospitals ran the federated audit"
    text = check_report(
        run / "report.html",
        [
            "summary",
            "results",
            "settings",
            "privacy",
            "protection",
            "audit",
            "not-run",
            "federated-audit",
        ],
    )
    settings = text.split("Settings")[1].split("Privacy spent")[0]
    assert "partition\t" not in settings and "dataset\t" not in settings, settings
    assert "rounds\t2" in settings, settings
    traffic = status.get("network-traffic")
    (kit["base"] / "secure-timing.json").write_text(
        json.dumps({"seconds": seconds, "network_traffic": traffic, "rounds": 2})
    )


def test_an_unregistered_supernode_is_refused(federation: Federation, kit: dict[str, Any]) -> None:
    process = federation.start_supernode("intruder", kit["sites"]["st-mary"], max_wait=20)
    assert process.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in federation.log("supernode-intruder")


def test_a_supernode_without_the_ca_cannot_connect(
    federation: Federation, kit: dict[str, Any]
) -> None:
    process = federation.start_supernode(
        "county", kit["sites"]["county"], root_certificates=False, max_wait=20, label="no-ca"
    )
    assert process.wait(timeout=90) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in federation.log("supernode-no-ca")


def test_a_hospital_dropping_out_mid_run_does_not_stop_it(
    federation: Federation, kit: dict[str, Any]
) -> None:
    """Under secure aggregation (threshold 2 of 3): set up across real processes, one
    hospital killed after round 1. Round 2 is a one-exchange round (the default): its masked
    updates are discarded, never unmasked; round 3 is a recoverable two-exchange round and
    goes on with the two others."""
    secure = {"he": False, "aggregation": "secagg", "secagg-threshold": 2}
    run_id = federation.submit(_run_config(kit, "dropout", rounds=3, **secure))
    run = kit["base"] / "runs" / "dropout"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(1.0)
    federation.kill("supernode-university")
    status = federation.wait_run(run_id, 500)
    assert status["status"] == "finished:completed", status
    # the set-up's key exchange rode on the schema query
    shown = federation.flwr("log", str(run_id), CONNECTION, "--show").stdout
    assert "keys came with their schemas" in shown, shown[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert "university" in rows[0]["hospitals"]
    assert rows[0]["aggregation"]["exchanges"] == 1
    # round 2 went on with the two others, records the dropout, and is discarded
    for row in rows[1:]:
        trained = sorted(h for h, e in row["hospitals"].items() if "train_examples" in e)
        assert trained == ["county", "st-mary"], row["round"]
    assert rows[1]["failed"], "the dropout is logged in metrics.jsonl"
    assert any("unavailable" in reason.lower() for reason in rows[1]["failed"].values())
    masked = rows[1]["aggregation"]
    assert masked["protocol"] == "secagg" and masked["exchanges"] == 1
    assert masked["survivors"] == 2 and masked["dropped"] == 1
    assert "discarded" in rows[1]["aggregate_failure"]
    # round 3: two exchanges, unmasked from the two others
    assert rows[2]["aggregation"]["exchanges"] == 2 and rows[2]["aggregation"]["survivors"] == 2
    assert "aggregate_failure" not in rows[2], rows[2].get("aggregate_failure")
    masked = rows[2]["aggregation"]
    # the DP recipe's updates fit the range derived from the run (the fixed 10 turned
    # every hospital away): nobody declined or was clipped
    assert masked["max_norm_from"] == "derived" and masked["max_norm"] > 10.0
    for row in rows:
        assert row["declined"] == {}, row["declined"]
        assert all(h.get("update_clipped", 0.0) == 0.0 for h in row["hospitals"].values())


def test_a_restarted_superlink_keeps_its_hospitals_and_a_run_resumes(
    federation: Federation, kit: dict[str, Any]
) -> None:
    # the coordinator's SuperLink restarts on its database: registered hospitals stay, the
    # running SuperNodes reconnect by themselves
    federation.kill("superlink")
    federation.processes.pop("superlink")
    federation.start_superlink()
    federation.wait_online(2, 120)
    listing = json.loads(
        federation.flwr("supernode", "list", "fedpriv-test", "--format", "json").stdout
    )
    statuses = {str(n.get("status", "")).lower() for n in listing["nodes"]}
    assert len(listing["nodes"]) >= 3 and statuses <= {"online", "offline", "registered"}
    # a ServerApp that stopped (here: after its planned rounds) continues from its checkpoint
    dropout = kit["base"] / "runs" / "dropout"
    run_id = federation.submit(
        _run_config(
            kit,
            "dropout",
            rounds=3,
            he=False,
            aggregation="secagg",
            **{"secagg-threshold": 2},
            resume=str(dropout),
        )
    )
    status = federation.wait_run(run_id, 400)
    assert status["status"] == "finished:completed", (status, federation.log("superlink")[-2000:])
    rows = [json.loads(line) for line in (dropout / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    trained = sorted(h for h, e in rows[2]["hospitals"].items() if "train_examples" in e)
    assert trained == ["county", "st-mary"]
