"""Deployment building blocks: the certificates fedpriv makes, and a site's settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from fedpriv.certs import init_certs
from fedpriv.client.site import SiteSettings, check_site
from fedpriv.errors import ConfigError


def test_certs_are_private_chained_and_name_the_hosts(tmp_path: Path) -> None:
    files = init_certs(tmp_path, hosts=["superlink.example.org", "127.0.0.1"], hospitals=["a", "b"])
    paths = [files.ca_certificate, files.ca_key, files.superlink_certificate, files.superlink_key]
    paths += [p for pair in files.supernode_keys.values() for p in pair]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths)
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.superlink_certificate.read_bytes())
    # the CA really signed the SuperLink's certificate
    ca.public_key().verify(  # type: ignore[union-attr,call-arg]
        server.signature,
        server.tbs_certificate_bytes,
        padding.PKCS1v15(),
        server.signature_hash_algorithm,
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    private = serialization.load_ssh_private_key(files.supernode_keys["a"][0].read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = files.supernode_keys["a"][1].read_text()
    assert public.startswith("ecdsa-sha2-nistp384 ") and public.strip().endswith(" a")


def test_certs_are_never_overwritten(tmp_path: Path) -> None:
    init_certs(tmp_path, hosts=["localhost"], hospitals=["a"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="never overwritten"):
        init_certs(tmp_path, hosts=["localhost"], hospitals=["a"])
    assert (tmp_path / "ca.key").read_bytes() == before
    with pytest.raises(ConfigError, match="hospital name"):
        init_certs(tmp_path / "x", hosts=["localhost"], hospitals=["bad name!"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "'data-path' is missing"),
        ({"data-path": "x.csv", "budget-epsilon": "lots"}, "'budget-epsilon' must be a number"),
        (
            {"data-path": "x.csv", "budget-epsilon": 0},
            "'budget-epsilon' must be a finite number > 0",
        ),
        (
            {"data-path": "x.csv", "budget-epsilon": float("nan")},
            "'budget-epsilon' must be a finite number > 0",
        ),
        ({"data-path": "x.csv", "budget-epsilon": "inf"}, "'budget-epsilon' must be a finite"),
        ({"data-path": "x.csv", "budget-delta": 0.5 * 3}, "'budget-delta' must be in \\(0, 1\\)"),
        ({"data-path": "x.csv", "device": "tpu"}, "'device' must be one of"),
        ({"data-path": "x.csv", "require-dp": "maybe"}, "'require-dp' must be true or false"),
    ],
)
def test_bad_site_settings_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SiteSettings.from_node_config(settings)


def test_site_check_finds_missing_files_and_ledgers(tmp_path: Path) -> None:
    data = tmp_path / "records.csv"
    data.write_text("a,b,label\n1,2,0\n3,4,1\n5,6,0\n")
    with pytest.raises(ConfigError, match=r"'data-path'.*does not exist"):
        check_site({"data-path": str(tmp_path / "none.csv"), "ledger-path": str(tmp_path / "l")})
    with pytest.raises(ConfigError, match="'ledger-path' is missing"):
        check_site({"data-path": str(data)})
    (tmp_path / "broken.sqlite").write_bytes(b"garbage" * 10)
    with pytest.raises(ConfigError, match=r"'ledger-path'.*left untouched"):
        check_site({"data-path": str(data), "ledger-path": str(tmp_path / "broken.sqlite")})
    with pytest.raises(ConfigError, match="'he-secret-context'"):
        check_site(
            {
                "data-path": str(data),
                "ledger-path": str(tmp_path / "ok.sqlite"),
                "he-secret-context": str(tmp_path / "none.ctx"),
            }
        )
    found = check_site({"data-path": str(data), "ledger-path": str(tmp_path / "ok.sqlite")})
    assert any("3 records, 2 classes" in line for line in found)


def _site(tmp_path: Path, **extra: object) -> dict:
    data = tmp_path / "records.csv"
    rows = "".join(f"{i},{i % 7},{i % 2}\n" for i in range(30))
    data.write_text("a,b,label\n" + rows)
    return {"data-path": str(data), "ledger-path": str(tmp_path / "ledger.sqlite"), **extra}


def test_site_check_creates_the_ledger_with_the_sites_cap_and_delta(tmp_path: Path) -> None:
    found = check_site(_site(tmp_path, **{"budget-epsilon": 3.0, "budget-delta": 1e-6}))
    assert any("created, writable" in line for line in found)
    assert any("epsilon 3 per patient for life, at delta 1e-06" in line for line in found)
    again = check_site(_site(tmp_path, **{"budget-epsilon": 3.0, "budget-delta": 1e-6}))
    assert any("existing, writable" in line for line in again)
    # the ledger's pair is fixed: a larger delta or a higher cap in the settings is refused
    with pytest.raises(ConfigError, match="larger than the delta 1e-06"):
        check_site(_site(tmp_path, **{"budget-epsilon": 3.0, "budget-delta": 1e-5}))
    with pytest.raises(ConfigError, match="cannot be raised"):
        check_site(_site(tmp_path, **{"budget-epsilon": 5.0, "budget-delta": 1e-6}))


def test_site_check_says_a_read_only_ledger_is_read_only_not_damaged(tmp_path: Path) -> None:
    """Before, a read-only ledger passed the check and training then told staff to
    'restore from a backup' a file that was fine."""
    check_site(_site(tmp_path))
    ledger = tmp_path / "ledger.sqlite"
    before = ledger.read_bytes()
    ledger.chmod(0o444)
    with pytest.raises(ConfigError, match="read-only") as refused:
        check_site(_site(tmp_path))
    assert "backup" not in str(refused.value)
    ledger.chmod(0o600)
    assert ledger.read_bytes() == before


def test_a_sites_held_out_patients_stay_held_out_when_the_file_changes(tmp_path: Path) -> None:
    from fedpriv.client.hospital import held_out_by_patient
    from fedpriv.data import load_dataset

    lines = [f"P{i // 2},{i},{i % 5},{i % 2}" for i in range(200)]  # 100 patients, 2 records
    first = tmp_path / "v1.csv"
    first.write_text("mrn,a,b,label\n" + "\n".join(lines) + "\n")
    second = tmp_path / "v2.csv"  # reordered, plus a new patient
    second.write_text("mrn,a,b,label\n" + "\n".join([*reversed(lines), "P999,1,1,1"]) + "\n")

    def held(path: Path) -> dict[str, bool]:
        source = load_dataset(str(path), patient_column="mrn").source
        mask = held_out_by_patient(source, seed=0, fraction=0.2)
        assert source.patient_ids is not None
        sides: dict[str, set[bool]] = {}
        for patient, side in zip(source.patient_ids, mask, strict=True):
            sides.setdefault(str(patient), set()).add(bool(side))
        assert all(len(s) == 1 for s in sides.values()), "a patient is never split"
        return {p: s.pop() for p, s in sides.items()}

    before, after = held(first), held(second)
    assert 10 <= sum(before.values()) <= 30
    assert all(after[p] == side for p, side in before.items())
