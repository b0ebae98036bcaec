"""CKKS aggregation with real TenSEAL: the sum against numpy, the server's lack of a key,
and rejection of bad ciphertexts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedpriv.privacy.he import (
    PUBLIC_FILE,
    SECRET_FILE,
    HeError,
    Layout,
    decrypt_sum,
    encrypt_contribution,
    load_context,
    write_keys,
)
from fedpriv.protocols.base import Contribution
from fedpriv.protocols.checks import Limits
from fedpriv.protocols.ckks import (
    CIPHERTEXT,
    FINGERPRINT,
    TOTAL,
    CkksServer,
    ciphertext_bytes,
    encode_text,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    write_keys(directory)
    return directory


def _record(blob: bytes, fingerprint: str) -> ArrayRecord:
    return ArrayRecord(
        {
            CIPHERTEXT: Array(np.frombuffer(blob, dtype=np.uint8).copy()),
            FINGERPRINT: encode_text(fingerprint),
        }
    )


def _contribution(secret, vector: np.ndarray, n: int, name: str = "h") -> Contribution:  # type: ignore[no-untyped-def]
    blob = encrypt_contribution(secret, vector, n)
    return Contribution(name, _record(blob, secret.fingerprint), n)


def _decrypt(secret, result: ArrayRecord, length: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return decrypt_sum(
        secret,
        ciphertext_bytes(result[CIPHERTEXT]),
        length=length,
        total_examples=int(result[TOTAL].numpy()[0]),
    )


@pytest.mark.parametrize("length", [10, 2047, 2048, 4095, 4096, 6274, 20_000])
def test_decrypted_aggregate_equals_the_weighted_average(keys: Path, length: int) -> None:
    secret = load_context(keys / SECRET_FILE, role="hospital")
    server = load_context(keys / PUBLIC_FILE, role="server")
    rng = np.random.default_rng(length)
    counts = [37, 230, 5, 1200]
    vectors = [rng.normal(0, 0.5, length) for _ in counts]
    aggregator = CkksServer(context=server, length=length, limits=Limits())
    result = aggregator.aggregate(
        [_contribution(secret, v, n) for v, n in zip(vectors, counts, strict=True)]
    )
    assert result is not None and int(result[TOTAL].numpy()[0]) == sum(counts)
    expected = np.average(np.stack(vectors), axis=0, weights=counts)
    got = _decrypt(secret, result, length)
    assert np.max(np.abs(got - expected)) <= 1e-6 * np.max(np.abs(expected))
    big = np.abs(expected) > 1e-2
    assert np.max(np.abs(got[big] - expected[big]) / np.abs(expected[big])) <= 1e-6


def test_the_server_context_cannot_decrypt_or_encrypt(keys: Path) -> None:
    import tenseal as ts

    server = load_context(keys / PUBLIC_FILE, role="server")
    assert not server.context.has_secret_key() and not server.context.is_private()
    assert not server.can_decrypt
    # no secret key to decrypt with and (symmetric scheme) no public key to encrypt with
    with pytest.raises(ValueError):
        server.context.secret_key()
    with pytest.raises(ValueError):
        server.context.public_key()
    with pytest.raises(ValueError):
        ts.ckks_vector(server.context, [1.0, 2.0])
    assert server.seal().encryptor is None and server.seal().decryptor is None
    secret = load_context(keys / SECRET_FILE, role="hospital")
    blob = encrypt_contribution(secret, np.ones(5), 10)
    with pytest.raises(HeError, match="secret context"):
        decrypt_sum(server, blob, length=5, total_examples=10)
    with pytest.raises(HeError, match="secret context"):
        encrypt_contribution(server, np.ones(5), 10)


def test_two_values_per_slot_keep_the_upload_near_4x_float32(keys: Path) -> None:
    secret = load_context(keys / SECRET_FILE, role="hospital")
    length = 40_959  # with the count, 40,960 values: exactly 10 full ciphertexts
    blob = encrypt_contribution(secret, np.zeros(length), 10)
    # each ciphertext: 2 polynomials x 4096 coefficients x 8 bytes, for 4096 values
    assert len(blob) / (4 * length) < 4.02


def test_a_ciphertext_at_another_scale_is_rejected_before_anything_is_added(keys: Path) -> None:
    import tenseal.sealapi as sealapi

    from fedpriv.privacy.he import _pack_container, _Scratch

    secret = load_context(keys / SECRET_FILE, role="hospital")
    server = load_context(keys / PUBLIC_FILE, role="server")
    length = 5000  # two ciphertexts: the odd one is the second
    honest = encrypt_contribution(secret, np.ones(length), 10)
    seal = secret.seal()
    parts = []
    with _Scratch() as scratch:
        for scale in (2.0**40, 2.0**30):
            plain = sealapi.Plaintext()
            seal.encoder.encode([complex(1, 1)] * 2048, scale, plain)
            cipher = sealapi.Ciphertext()
            seal.encryptor.encrypt_symmetric(plain, cipher)
            parts.append(scratch.save(cipher))
    odd = _pack_container(length + 1, parts)
    aggregator = CkksServer(context=server, length=length, limits=Limits())
    result = aggregator.aggregate(
        [
            Contribution("odd", _record(odd, secret.fingerprint), 10),
            Contribution("honest", _record(honest, secret.fingerprint), 10),
        ]
    )
    assert result is not None
    assert [name for name, _ in aggregator.rejected] == ["odd"]
    assert "scale" in aggregator.rejected[0][1]
    np.testing.assert_allclose(_decrypt(secret, result, length), np.ones(length), atol=1e-6)


def test_the_server_refuses_a_context_with_the_secret_key(keys: Path) -> None:
    with pytest.raises(HeError, match="holds the secret key"):
        load_context(keys / SECRET_FILE, role="server")
    secret = load_context(keys / SECRET_FILE, role="hospital")
    with pytest.raises(ValueError, match="must not hold the secret key"):
        CkksServer(context=secret, length=3, limits=Limits())
    with pytest.raises(HeError, match="no secret key"):
        load_context(keys / PUBLIC_FILE, role="hospital")


def test_key_files_are_private_and_share_a_fingerprint(keys: Path) -> None:
    for name in (SECRET_FILE, PUBLIC_FILE):
        assert (keys / name).stat().st_mode & 0o777 == 0o600
    secret = load_context(keys / SECRET_FILE, role="hospital")
    public = load_context(keys / PUBLIC_FILE, role="server")
    assert secret.fingerprint == public.fingerprint
    # no Galois or relinearisation keys travel to the server
    assert not public.context.has_galois_keys() and not public.context.has_relin_keys()
    assert (keys / PUBLIC_FILE).stat().st_size < 1000


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(HeError, match="does not exist"):
        load_context(tmp_path / "missing.ctx", role="server")
    (tmp_path / "junk.ctx").write_bytes(b"not a key")
    with pytest.raises(HeError, match="not a fedpriv CKKS key file"):
        load_context(tmp_path / "junk.ctx", role="server")


def test_malformed_truncated_foreign_and_miscounted_ciphertexts_are_rejected(
    keys: Path, tmp_path: Path
) -> None:
    secret = load_context(keys / SECRET_FILE, role="hospital")
    server = load_context(keys / PUBLIC_FILE, role="server")
    write_keys(tmp_path / "other")
    foreign = load_context(tmp_path / "other" / SECRET_FILE, role="hospital")
    length = 3000
    rng = np.random.default_rng(0)
    good = [rng.normal(size=length) for _ in range(2)]
    contributions = [
        _contribution(secret, good[0], 10, "good-0"),
        _contribution(secret, good[1], 30, "good-1"),
    ]
    blob = contributions[0].arrays[CIPHERTEXT].numpy()
    bad = {
        "garbage": Array(np.frombuffer(b"\x01\x02" * 500, dtype=np.uint8).copy()),
        "truncated": Array(blob[: blob.size // 2].copy()),
        "empty": Array(np.zeros(0, dtype=np.uint8)),
    }
    for name, array in bad.items():
        contributions.append(
            Contribution(
                name,
                ArrayRecord({CIPHERTEXT: array, FINGERPRINT: encode_text(secret.fingerprint)}),
                50,
            )
        )
    # wrong length: a ciphertext for a different model size
    contributions.append(_contribution(secret, rng.normal(size=length + 7), 50, "wrong-count"))
    # honest about its (foreign) key: refused by fingerprint
    contributions.append(_contribution(foreign, rng.normal(size=length), 50, "foreign"))
    # a float array where bytes belong
    contributions.append(
        Contribution(
            "floats",
            ArrayRecord(
                {CIPHERTEXT: Array(np.ones(10)), FINGERPRINT: encode_text(secret.fingerprint)}
            ),
            50,
        )
    )
    aggregator = CkksServer(context=server, length=length, limits=Limits())
    result = aggregator.aggregate(contributions)
    assert result is not None
    rejected = {name for name, _ in aggregator.rejected}
    assert rejected == {"garbage", "truncated", "empty", "wrong-count", "foreign", "floats"}
    assert int(result[TOTAL].numpy()[0]) == 40
    expected = np.average(np.stack(good), axis=0, weights=[10, 30])
    np.testing.assert_allclose(_decrypt(secret, result, length), expected, atol=1e-6)


def test_a_foreign_key_that_lies_about_itself_is_caught_at_decryption(
    keys: Path, tmp_path: Path
) -> None:
    secret = load_context(keys / SECRET_FILE, role="hospital")
    server = load_context(keys / PUBLIC_FILE, role="server")
    write_keys(tmp_path / "other")
    foreign = load_context(tmp_path / "other" / SECRET_FILE, role="hospital")
    liar = _contribution(foreign, np.ones(100), 10, "liar")
    liar.arrays[FINGERPRINT] = encode_text(secret.fingerprint)
    result = CkksServer(context=server, length=100, limits=Limits()).aggregate(
        [_contribution(secret, np.ones(100), 10), liar]
    )
    assert result is not None  # CKKS adds it silently...
    with pytest.raises(HeError, match="does not add up"):  # ...and the hospitals notice
        _decrypt(secret, result, 100)


def test_layout_round_trip() -> None:
    weights = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float32)}
    layout = Layout.of(weights)
    assert layout.size == 10
    back = layout.unflatten(layout.flatten(weights))
    for key in weights:
        np.testing.assert_array_equal(back[key], weights[key])
        assert back[key].dtype == np.float32


def test_a_hospital_decrypts_the_servers_final_model(keys: Path, tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from fedpriv.cli import app
    from fedpriv.config import RunConfig
    from fedpriv.models import initial_state
    from fedpriv.protocols.ckks import array_to_numpy
    from fedpriv.server.rundir import RunDirectory

    args = {"in_features": 30, "num_classes": 2}
    run = RunDirectory.create(tmp_path / "run")
    run.write_config(RunConfig(he=True), model_name="mlp", model_args=args)
    secret = load_context(keys / SECRET_FILE, role="hospital")
    server = load_context(keys / PUBLIC_FILE, role="server")
    layout = Layout.of(initial_state("mlp", 0, **args))
    models = [initial_state("mlp", seed, **args) for seed in (1, 2)]
    contributions = [
        _contribution(secret, layout.flatten(m), n) for m, n in zip(models, (10, 30), strict=True)
    ]
    result = CkksServer(context=server, length=layout.size, limits=Limits()).aggregate(
        contributions
    )
    assert result is not None
    run.save_encrypted_model({k: array_to_numpy(v) for k, v in result.items()})
    outcome = CliRunner().invoke(
        app, ["keys", "decrypt-model", str(run.path), "--secret", str(keys / SECRET_FILE)]
    )
    assert outcome.exit_code == 0, outcome.output
    state = torch.load(run.file("model.pt"), weights_only=True)
    # the exported model is the decryption flooded with the intended noise: never the exact
    # decryption (which would expose the encryption error, and with it the secret key)
    from fedpriv.privacy.he import decrypt_sum
    from fedpriv.protocols.ckks import CIPHERTEXT, FLOOD_STD, TOTAL, ciphertext_bytes

    exact = layout.unflatten(
        decrypt_sum(
            secret,
            ciphertext_bytes(result[CIPHERTEXT]),
            length=layout.size,
            total_examples=int(result[TOTAL].numpy()[0]),
        ).astype(np.float64)
    )
    difference = np.concatenate(
        [state[k].numpy().astype(np.float64).ravel() - exact[k].ravel() for k in models[0]]
    )
    expected_model = {k: (10 * models[0][k] + 30 * models[1][k]) / 40 for k in models[0]}
    decryption_error = np.concatenate(
        [exact[k].ravel() - expected_model[k].ravel() for k in models[0]]
    )
    # float32 storage adds at most ~4e-9 here; the noise is ~1e-6, the CKKS error ~1e-9
    assert np.std(decryption_error) < FLOOD_STD / 100
    assert abs(np.mean(difference)) < 5 * FLOOD_STD / np.sqrt(difference.size)
    assert np.std(difference) == pytest.approx(FLOOD_STD, rel=0.05)
    assert not np.any(difference == 0.0) or np.mean(difference == 0.0) < 0.01
    # and the model is the same model: predictions on any input agree
    from fedpriv.models import build

    flooded, true = build("mlp", **args), build("mlp", **args)
    flooded.load_state_dict(state)
    true.load_state_dict(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in expected_model.items()}
    )
    inputs = torch.randn(2000, 30)
    with torch.no_grad():
        agree = (flooded(inputs).argmax(1) == true(inputs).argmax(1)).float().mean()
    assert float(agree) > 0.999
    # the server's own context cannot do it
    refused = CliRunner().invoke(
        app, ["keys", "decrypt-model", str(run.path), "--secret", str(keys / PUBLIC_FILE)]
    )
    assert refused.exit_code == 2 and "no secret key" in refused.output
