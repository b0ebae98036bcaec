"""Under CKKS a round is one exchange: the hospital checks the aggregate the next training
order brings (decrypting it to evaluate and train from it). One that does not add up is
reported unusable and the order is declined before any budget is reserved; a good one is
evaluated, trained from, and charged as usual. Real handlers, real TenSEAL, real ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpriv import messages as msg
from fedpriv.client.handlers import local_app
from fedpriv.client.site import check_site
from fedpriv.config import RunConfig
from fedpriv.models import initial_state
from fedpriv.privacy.he import SECRET_FILE, Layout, encrypt_contribution, load_context, write_keys
from fedpriv.protocols.base import UNUSABLE
from fedpriv.protocols.ckks import CIPHERTEXT, FINGERPRINT, TOTAL, ciphertext_array, encode_text

ARGS = {"in_features": 2, "num_classes": 2}
ENCRYPTED_COUNT = 40


def _site(tmp_path: Path) -> dict:
    data = tmp_path / "st-mary.csv"
    rng = np.random.default_rng(0)
    rows = [f"{a:.3f},{b:.3f},{int(a + b > 0)}" for a, b in rng.normal(size=(80, 2))]
    data.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    keys = tmp_path / "keys"
    write_keys(keys)
    site = {
        "hospital-name": "st-mary",
        "data-path": str(data),
        "ledger-path": str(tmp_path / "ledger.sqlite"),
        "he-secret-context": str(keys / SECRET_FILE),
        "require-dp": False,
        "warm-worker": False,
    }
    check_site(site)
    return site


def _order(config: RunConfig, site: dict, declared: int) -> Message:
    """Round 2's training order, bringing round 1's aggregate (one hospital's contribution
    encrypting ENCRYPTED_COUNT examples; the server declares ``declared``)."""
    context = load_context(site["he-secret-context"], role="hospital")
    weights = initial_state("mlp", config.seed, **ARGS)
    blob = encrypt_contribution(context, Layout.of(weights).flatten(weights) * 0.5, ENCRYPTED_COUNT)
    arrays = ArrayRecord(
        {
            CIPHERTEXT: ciphertext_array(blob),
            FINGERPRINT: encode_text(context.fingerprint),
            TOTAL: Array(np.array([declared], dtype=np.int64)),
        }
    )
    record = msg.order_record(config, model_name="mlp", model_args=ARGS)
    record[msg.SERVER_ROUND] = 2
    record[msg.EVALUATE_RECEIVED] = True
    content = RecordDict({msg.ARRAYS: arrays, msg.CONFIG: ConfigRecord(record)})
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=11)


def _events(ledger: Path) -> int:
    if not ledger.exists():
        return 0
    with sqlite3.connect(ledger) as db:
        return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])


@pytest.mark.usefixtures("flower_task")
def test_an_order_bringing_an_unusable_aggregate_is_declined_before_any_spend(
    tmp_path: Path,
) -> None:
    site = _site(tmp_path)
    config = RunConfig(
        deployment=True, he=True, epsilon=4.0, rounds=3, local_epochs=1, batch_size=16, seed=3
    )
    context = Context(run_id=7, node_id=11, node_config=site, state=RecordDict(), run_config={})
    ledger = Path(site["ledger-path"])

    bad = local_app(_order(config, site, ENCRYPTED_COUNT - 7), context)
    assert not bad.has_error(), bad.error.reason if bad.has_error() else ""
    hospital = bad.content.config_records[msg.HOSPITAL]
    assert hospital[msg.STATUS] == msg.STATUS_DECLINED
    assert "does not add up" in str(bad.content.config_records[msg.PROTOCOL][UNUSABLE])
    assert msg.ARRAYS not in bad.content.array_records  # nothing trained, nothing sent
    assert msg.PRIVACY not in bad.content.config_records
    assert _events(ledger) == 0  # no budget reserved for it

    good = local_app(_order(config, site, ENCRYPTED_COUNT), context)
    assert not good.has_error(), good.error.reason if good.has_error() else ""
    assert good.content.config_records[msg.HOSPITAL][msg.STATUS] == msg.STATUS_OK
    assert msg.PROTOCOL not in good.content.config_records
    evaluation = good.content.metric_records[msg.EVALUATION]
    assert 0.0 <= float(evaluation["eval-accuracy"]) <= 1.0
    assert float(evaluation["he-decrypt-seconds"]) > 0
    assert set(good.content.array_records[msg.ARRAYS]) == {CIPHERTEXT, FINGERPRINT}
    assert _events(ledger) >= 1  # the round it trained is on its ledger
