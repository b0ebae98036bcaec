"""The CKKS aggregator: the server adds ciphertexts it cannot read.

Hospitals send ``{CIPHERTEXT: encrypt((n_k/1000) w_k ++ [n_k/1000]), FINGERPRINT: key id}``
as uint8 arrays (Flower chunks arrays in transit; ConfigRecord bytes are not chunked). The
aggregate is ``{CIPHERTEXT: the sum, FINGERPRINT, TOTAL: N}``: ciphertext sum plus the
plaintext total of examples, which the hospitals use to decrypt and divide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpriv.privacy.he import CkksContext, sum_ciphertexts
from fedpriv.strategies.aggregators import Aggregator, Contribution, register_aggregator

__all__ = ["CIPHERTEXT", "FINGERPRINT", "TOTAL", "CkksAggregator", "decode_text", "encode_text"]

logger = logging.getLogger(__name__)

CIPHERTEXT = "ckks-ciphertext"
FINGERPRINT = "ckks-fingerprint"
TOTAL = "ckks-total-examples"
#: Flower Array serialization type for raw ciphertext bytes: the Array's data *is* the
#: ciphertext container of ``fedpriv.privacy.he`` (chunked in transit like any array), no
#: numpy wrapping or copies
STYPE = "fedpriv.ckks"


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


@register_aggregator("ckks")
class CkksAggregator(Aggregator):
    """Sums valid contributions; rejects (and logs) the others, never corrupting the sum."""

    encrypted = True

    def __init__(self, *, context: CkksContext, length: int) -> None:
        if context.can_decrypt:
            raise ValueError("the server's aggregator must not hold the secret key")
        self.context = context
        self.length = length
        self.rejected: list[tuple[str, str]] = []
        self.seconds = 0.0
        self.bytes_in = 0

    def aggregate(
        self, contributions: Sequence[Contribution], *, reference: ArrayRecord | None = None
    ) -> ArrayRecord | None:
        import time

        started = time.perf_counter()
        self.rejected = []
        self.bytes_in = 0
        blobs: list[bytes] = []
        counts: list[int] = []
        names: list[str] = []
        for contribution in contributions:
            arrays = contribution.arrays
            if set(arrays.keys()) != {CIPHERTEXT, FINGERPRINT}:
                self._reject(contribution.hospital, f"unexpected arrays {sorted(arrays.keys())}")
                continue
            fingerprint = decode_text(arrays[FINGERPRINT])
            if fingerprint != self.context.fingerprint:
                self._reject(
                    contribution.hospital,
                    f"encrypted under key {fingerprint!r}, not this federation's "
                    f"{self.context.fingerprint!r}",
                )
                continue
            if contribution.num_examples <= 0:
                self._reject(contribution.hospital, "reported no training examples")
                continue
            try:
                blob = ciphertext_bytes(arrays[CIPHERTEXT])
            except (ValueError, TypeError):
                self._reject(contribution.hospital, "ciphertext is not a flat byte array")
                continue
            self.bytes_in += len(blob)
            blobs.append(blob)
            counts.append(contribution.num_examples)
            names.append(contribution.hospital)
        summed, rejections = sum_ciphertexts(self.context, blobs, length=self.length)
        bad = {r.index for r in rejections}
        for rejection in rejections:
            self._reject(names[rejection.index], rejection.reason)
        total = sum(n for i, n in enumerate(counts) if i not in bad)
        self.seconds = time.perf_counter() - started
        if summed is None or total == 0:
            return None
        return ArrayRecord(
            {
                CIPHERTEXT: ciphertext_array(summed),
                FINGERPRINT: encode_text(self.context.fingerprint),
                TOTAL: Array(np.array([total], dtype=np.int64)),
            }
        )

    def _reject(self, hospital: str, reason: str) -> None:
        logger.warning("rejected the encrypted update of %s for this round: %s", hospital, reason)
        self.rejected.append((hospital, reason))
