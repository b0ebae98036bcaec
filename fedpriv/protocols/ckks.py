"""CKKS (TenSEAL/SEAL): hospitals encrypt, the server only adds ciphertexts it cannot read.

Hospitals send ``{CIPHERTEXT: encrypt((n_k/1000) w_k ++ [n_k/1000]), FINGERPRINT: key id}``
as uint8 arrays (Flower chunks arrays in transit; ConfigRecord bytes are not chunked). The
aggregate is ``{CIPHERTEXT: the sum, FINGERPRINT, TOTAL: N}``: ciphertext sum plus the
plaintext total of examples, which the hospitals use to decrypt and divide.

Threat model: an honest-but-curious server; every hospital holds the one secret key, so a
hospital that colludes with the server reads everyone's update (``secagg`` has no such key).
A decryption that leaves a hospital (the exported model) is flooded with noise: CKKS
decryptions are approximate, and an exact one lets whoever sees it recover the secret key
(Li and Micciancio 2021). See :func:`flood`.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpriv.errors import FedprivError
from fedpriv.protocols.base import (
    AggregateUnusable,
    Contribution,
    GlobalWeights,
    HospitalSide,
    Protocol,
    ServerSide,
    Update,
    register_protocol,
)
from fedpriv.protocols.checks import MAX_MAGNITUDE, Limits, Rejected, check_count

__all__ = [
    "CIPHERTEXT",
    "FINGERPRINT",
    "FLOOD_STD",
    "TOTAL",
    "CkksHospital",
    "CkksServer",
    "array_to_numpy",
    "ciphertext_array",
    "ciphertext_bytes",
    "decode_text",
    "encode_text",
    "flood",
]

CIPHERTEXT = "ckks-ciphertext"
FINGERPRINT = "ckks-fingerprint"
TOTAL = "ckks-total-examples"
#: Flower Array serialization type for raw ciphertext bytes: the Array's data *is* the
#: ciphertext container of ``fedpriv.privacy.he`` (chunked in transit like any array), no
#: numpy wrapping or copies
STYPE = "fedpriv.ckks"
#: node config key: the hospitals' secret context
HE_SECRET_CONTEXT = "he-secret-context"
KEYS_DIR = "keys"
#: standard deviation of the noise added to every decrypted value that leaves a hospital
FLOOD_STD = 2.0**-20


def ciphertext_array(blob: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)


def ciphertext_bytes(array: Array) -> bytes:
    """The ciphertext's bytes (also from a plain uint8 array, e.g. a restored checkpoint)."""
    if array.stype == STYPE:
        return bytes(array.data)
    data = array.numpy()
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError("ciphertext is not a flat byte array")
    return data.tobytes()


def array_to_numpy(array: Array) -> np.ndarray:
    """Any array of a record as numpy (ciphertexts as uint8), e.g. for checkpoints."""
    if array.stype == STYPE:
        return np.frombuffer(array.data, dtype=np.uint8)
    return array.numpy()


def encode_text(text: str) -> Array:
    return Array(np.frombuffer(text.encode(), dtype=np.uint8).copy())


def decode_text(array: Array) -> str:
    return bytes(array.numpy().astype(np.uint8)).decode(errors="replace")


def flood(values: np.ndarray, *, std: float = FLOOD_STD) -> np.ndarray:
    """Noise flooding of a decryption that leaves the hospital (Li and Micciancio 2021).

    A CKKS decryption is the message plus the encryption's error ``e``; published exactly,
    ``e`` is a linear function of the secret key, and enough of them recover it. Adding
    independent Gaussian noise of standard deviation ``std`` (2^-20, about 1e-6) per value
    hides ``e``, whose size after summing a federation's contributions is ~1e-9 at scale 2^40
    (measured in tests/unit/test_he.py): the statistical distance between the outputs for
    two different errors is at most |e1 - e2| / (2 std) ~ 2^-10.5 per value. This is the
    heuristic level OpenFHE's noise flooding follows for a bounded number of decryptions
    (not the 2^-40 of a full simulation proof, which would need noise of ~1e3 and destroy
    the model); it is far below float32 model precision and the model's accuracy does not
    change (tests). Noise from the OS entropy pool.
    """
    rng = np.random.default_rng(secrets.randbits(128))
    return np.asarray(values, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(values))


# ---- the server -----------------------------------------------------------------------------


class CkksServer(ServerSide):
    """Sums valid contributions; rejects (and logs) the others, never corrupting the sum.

    What the server cannot see (a ciphertext whose encrypted example count differs from the
    declared one, one under another key with this federation's label, values out of range)
    the hospitals find when they decrypt the new aggregate to evaluate it: if most of them
    cannot use it, the round is discarded and the previous model stays
    (``verified_on_evaluate``). The shared key leaves no way to find *which* contribution
    was bad without decrypting single contributions, which this protocol never does."""

    encrypted = True
    verified_on_evaluate = True

    def __init__(self, *, context: Any, length: int, limits: Limits) -> None:
        super().__init__()
        if context.can_decrypt:
            raise ValueError("the server's aggregator must not hold the secret key")
        self.context = context
        self.length = length
        self.limits = limits
        self.seconds = 0.0
        self.bytes_in = 0

    def aggregate(
        self,
        contributions: Sequence[Contribution],
        *,
        reference: ArrayRecord | None = None,
        gradient: bool = False,
        server_round: int = 0,
    ) -> ArrayRecord | None:
        from fedpriv.privacy.he import sum_ciphertexts

        started = time.perf_counter()
        self.rejected = []
        self.bytes_in = 0
        blobs: list[bytes] = []
        counts: list[int] = []
        names: list[str] = []
        for contribution in contributions:
            arrays = contribution.arrays
            try:
                count = check_count(contribution.hospital, contribution.num_examples, self.limits)
            except Rejected as why:
                self.reject(contribution.hospital, str(why))
                continue
            if set(arrays.keys()) != {CIPHERTEXT, FINGERPRINT}:
                self.reject(contribution.hospital, f"unexpected arrays {sorted(arrays.keys())}")
                continue
            fingerprint = decode_text(arrays[FINGERPRINT])
            if fingerprint != self.context.fingerprint:
                self.reject(
                    contribution.hospital,
                    f"encrypted under key {fingerprint!r}, not this federation's "
                    f"{self.context.fingerprint!r}",
                )
                continue
            try:
                blob = ciphertext_bytes(arrays[CIPHERTEXT])
            except (ValueError, TypeError):
                self.reject(contribution.hospital, "ciphertext is not a flat byte array")
                continue
            self.bytes_in += len(blob)
            blobs.append(blob)
            counts.append(count)
            names.append(contribution.hospital)
        summed, rejections = sum_ciphertexts(self.context, blobs, length=self.length)
        bad = {r.index for r in rejections}
        for rejection in rejections:
            self.reject(names[rejection.index], rejection.reason)
        total = sum(n for i, n in enumerate(counts) if i not in bad)
        self.seconds = time.perf_counter() - started
        self.stats.update({"bytes_in": self.bytes_in, "seconds": self.seconds})
        if summed is None or total == 0:
            return None
        return ArrayRecord(
            {
                CIPHERTEXT: ciphertext_array(summed),
                FINGERPRINT: encode_text(self.context.fingerprint),
                TOTAL: Array(np.array([total], dtype=np.int64)),
            }
        )


# ---- the hospitals --------------------------------------------------------------------------


class CkksHospital(HospitalSide):
    """Holds the hospitals' secret context: decrypts the global model, encrypts updates.

    Under FedSGD it takes the server's step itself (the server cannot read the model)."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def read(self, order: Any, arrays: ArrayRecord) -> GlobalWeights:
        from fedpriv.models import initial_state
        from fedpriv.privacy.he import HeError, Layout

        initial = initial_state(order.model_name, order.config.seed, **order.model_args)
        if len(arrays) == 0:  # round 1: the initial model follows from the seed
            return GlobalWeights(initial)
        if FINGERPRINT not in arrays or CIPHERTEXT not in arrays or TOTAL not in arrays:
            raise FedprivError("the server's global model is not an encrypted aggregate")
        if decode_text(arrays[FINGERPRINT]) != self.context.fingerprint:
            raise FedprivError(
                "the server's global model is encrypted under another key than this "
                f"hospital's ({self.context.fingerprint}): check he-secret-context / --keys"
            )
        layout = Layout.of(initial)
        started = time.perf_counter()
        try:
            mean = _decrypted(
                self.context,
                ciphertext_bytes(arrays[CIPHERTEXT]),
                layout.size,
                int(arrays[TOTAL].numpy()[0]),
            )
        except (HeError, ValueError, TypeError, IndexError) as exc:
            raise AggregateUnusable(str(exc)) from None
        if not np.all(np.isfinite(mean)) or float(np.max(np.abs(mean))) > MAX_MAGNITUDE:
            raise AggregateUnusable(
                f"the aggregate decrypts to values beyond +-{MAX_MAGNITUDE:g} or not finite"
            )
        return GlobalWeights(
            layout.unflatten(mean), {"he-decrypt-seconds": time.perf_counter() - started}
        )

    def encode(
        self, order: Any, update: Update, state: Any
    ) -> tuple[ArrayRecord, dict[str, float]]:
        from fedpriv.privacy.he import Layout, encrypt_contribution

        weights = update.weights()
        layout = Layout.of(update.before)
        started = time.perf_counter()
        blob = encrypt_contribution(self.context, layout.flatten(weights), update.num_examples)
        record = ArrayRecord(
            {CIPHERTEXT: ciphertext_array(blob), FINGERPRINT: encode_text(self.context.fingerprint)}
        )
        return record, {"he-encrypt-seconds": time.perf_counter() - started}


@functools.lru_cache(maxsize=2)
def _decrypted(context: Any, blob: bytes, length: int, total: int) -> np.ndarray:
    """Decrypt once per aggregate: evaluation and the next round's training get the same one
    (and in simulation one worker process serves several hospitals)."""
    from fedpriv.privacy.he import decrypt_sum

    return decrypt_sum(context, blob, length=length, total_examples=total)


def secret_context_path(config: Any, node_config: Mapping[str, Any]) -> Path:
    if HE_SECRET_CONTEXT in node_config:
        return Path(str(node_config[HE_SECRET_CONTEXT])).expanduser()
    base = Path(config.keys) if config.keys else Path(config.out) / config.run_name / KEYS_DIR
    from fedpriv.privacy.he import SECRET_FILE

    return base / SECRET_FILE


@functools.lru_cache(maxsize=4)
def _load_secret(path: str) -> Any:
    from fedpriv.privacy.he import load_context

    return load_context(path, role="hospital")


def server_keys(config: Any) -> Path:
    """Where the server's public context lives: --keys DIR, or the run's keys/."""
    from fedpriv.privacy.he import PUBLIC_FILE

    base = Path(config.keys) if config.keys else Path(config.out) / config.run_name / KEYS_DIR
    return base / PUBLIC_FILE


def _server(config: Any, *, limits: Limits, length: int, **_: Any) -> CkksServer:
    from fedpriv.privacy.he import load_context

    return CkksServer(
        context=load_context(server_keys(config), role="server"), length=length, limits=limits
    )


def _hospital(config: Any, node_config: Mapping[str, Any]) -> CkksHospital:
    return CkksHospital(_load_secret(str(secret_context_path(config, node_config))))


def decrypt_export(context: Any, blob: bytes, *, length: int, total: int) -> np.ndarray:
    """A decryption meant to leave the hospital (the final model): flooded."""
    from fedpriv.privacy.he import decrypt_sum

    return flood(decrypt_sum(context, blob, length=length, total_examples=total))


CKKS = register_protocol(
    Protocol(
        name="ckks",
        server=_server,
        hospital=_hospital,
        summary="the server adds CKKS ciphertexts it cannot read (one key shared by the hospitals)",
    )
)
