"""The primitives of secure aggregation, all from vetted libraries.

- Key agreement: X25519 (``cryptography``), the shared secret expanded by HKDF-SHA256 with
  a label that binds it to its purpose, the run and the round.
- Authenticated encryption of secret shares between two hospitals: ChaCha20-Poly1305
  (``cryptography``), with the pair, the round and the direction in the nonce and the
  associated data.
- Pseudorandom masks: the ChaCha20 keystream (``cryptography``) read as 32-bit words.
- Threshold secret sharing: Shamir's scheme over GF(2^128) from PyCryptodome (a dependency
  of Flower), 16-byte secrets; 32-byte secrets are shared as two halves.
- Fixed-point quantisation into Z_(2^32), where the masks live (numpy's uint32 arithmetic
  wraps around exactly modulo 2^32).

fedpriv composes these; it implements no primitive of its own.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np

__all__ = [
    "KEY_BYTES",
    "Quantizer",
    "agree",
    "combine",
    "generate_keypair",
    "open_share",
    "prg_uint32",
    "seal_share",
    "share",
]

KEY_BYTES = 32
SHARE_BYTES = 16
_ZERO_NONCE = bytes(16)


def generate_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw X25519 keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (
        private.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        private.public_key().public_bytes(raw, serialization.PublicFormat.Raw),
    )


def agree(private: bytes, peer_public: bytes, *, info: bytes) -> bytes:
    """A 32-byte key both ends of an X25519 pair derive alike, for the purpose ``info``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def prg_uint32(seed: bytes, count: int) -> np.ndarray:
    """``count`` pseudorandom 32-bit words: the ChaCha20 keystream of ``seed``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if len(seed) != KEY_BYTES:
        raise ValueError("a mask seed is 32 bytes")
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * count)), dtype="<u4").astype(np.uint32)


def _nonce(round_: int, sender: int, receiver: int) -> bytes:
    # 12 bytes: round (4), sender index (4), receiver index (4): never reused under one key
    return struct.pack("<III", round_, sender, receiver)


def seal_share(
    key: bytes, plaintext: bytes, *, round_: int, sender: int, receiver: int, aad: bytes
) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key).encrypt(_nonce(round_, sender, receiver), plaintext, aad)


def open_share(
    key: bytes, sealed: bytes, *, round_: int, sender: int, receiver: int, aad: bytes
) -> bytes:
    """The plaintext, or ``cryptography.exceptions.InvalidTag`` if it was altered."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key).decrypt(_nonce(round_, sender, receiver), sealed, aad)


def share(secret: bytes, *, threshold: int, parties: int) -> list[bytes]:
    """Shamir shares of ``secret`` (16 or 32 bytes) for parties 1..``parties``; any
    ``threshold`` of them recover it, fewer reveal nothing. Share ``i`` is at index ``i-1``."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) % SHARE_BYTES:
        raise ValueError("secrets are shared in 16-byte blocks")
    blocks = [secret[i : i + SHARE_BYTES] for i in range(0, len(secret), SHARE_BYTES)]
    per_block = [Shamir.split(threshold, parties, block, ssss=False) for block in blocks]
    return [b"".join(split[i][1] for split in per_block) for i in range(parties)]


def combine(shares: dict[int, bytes]) -> bytes:
    """The secret from shares ``{party index (1-based): share}`` (at least the threshold)."""
    from Crypto.Protocol.SecretSharing import Shamir

    width = len(next(iter(shares.values())))
    blocks = []
    for offset in range(0, width, SHARE_BYTES):
        blocks.append(
            Shamir.combine(
                [(index, value[offset : offset + SHARE_BYTES]) for index, value in shares.items()],
                ssss=False,
            )
        )
    return b"".join(blocks)


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """Fixed point in Z_(2^32) for sums of up to ``parties`` values in [-``bound``, ``bound``].

    ``scale`` is chosen so that any such sum stays within the signed 32-bit range, so the sum
    of the quantised values modulo 2^32, read as a signed integer, is exactly the sum of the
    rounded values: the aggregate is exact up to the rounding of each value (at most
    ``0.5 / scale``). A value outside the range is an error, never a silent wrap-around.
    """

    bound: float
    parties: int

    @property
    def scale(self) -> float:
        return (2**31 - 1) / (self.parties * self.bound)

    @property
    def step(self) -> float:
        return 1.0 / self.scale

    def encode(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.size and (not np.all(np.isfinite(values)) or np.max(np.abs(values)) > self.bound):
            worst = float(np.max(np.abs(values[np.isfinite(values)]), initial=math.inf))
            raise OverflowError(
                f"a value ({worst:.4g}) is outside the secure-aggregation range "
                f"[-{self.bound:g}, {self.bound:g}]"
            )
        return np.round(values * self.scale).astype(np.int64).astype(np.uint32)

    def decode(self, total: np.ndarray) -> np.ndarray:
        return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64) / self.scale
