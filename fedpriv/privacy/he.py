"""CKKS homomorphic encryption (TenSEAL): key files, and a flat parameter vector packed into
ciphertexts that the server can only add.

Threat model: an honest-but-curious server. The hospitals share one secret key; the server
holds a context without it, which can neither decrypt nor encrypt. Additions only (depth 0),
so there are no Galois or relinearisation keys to ship, and a two-prime modulus is enough.

Parameters (measured, see BENCHMARKS.md): N = 4096 (2048 slots per ciphertext), moduli
[60, 40] bits (100 bits, within SEAL's 128-bit-security limit of 109 for N = 4096), scale
2^40, symmetric encryption (8x less noise and 2x faster than public-key encryption, and the
server's context then cannot even encrypt).

What a hospital encrypts is ``(n_k / 1000) * w_k`` followed by one more slot holding
``n_k / 1000``: the server's sum then carries the plaintext total in its last slot, and a
hospital that decrypts checks it against the total ``N`` the server reports. A contribution
under a foreign key adds silently in CKKS and decrypts to noise of order 1e8, so this check
is what catches it. The 1/1000 keeps sums far below CKKS's overflow (about 5e5 at scale 2^40)
for federations of up to hundreds of millions of records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.errors import FedprivError

__all__ = [
    "CkksContext",
    "HeError",
    "HeParams",
    "Layout",
    "create_keys",
    "decrypt_sum",
    "encrypt_contribution",
    "load_context",
    "sum_ciphertexts",
    "write_keys",
]

MAGIC = b"FEDPRIV-CKKS 1\n"
SECRET_FILE = "secret.ctx"
PUBLIC_FILE = "public.ctx"
WEIGHT_UNIT = 1000.0  # contributions are weighted by n_k / WEIGHT_UNIT


class HeError(FedprivError):
    """A key file or ciphertext cannot be used."""


@dataclasses.dataclass(frozen=True)
class HeParams:
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def ciphertexts_for(self, length: int) -> int:
        return -(-length // self.slots)


class CkksContext:
    """A TenSEAL context plus the fingerprint of the key set it belongs to."""

    def __init__(self, context: Any, *, fingerprint: str, params: HeParams, kind: str) -> None:
        self.context = context
        self.fingerprint = fingerprint
        self.params = params
        self.kind = kind

    @property
    def can_decrypt(self) -> bool:
        return bool(self.context.has_secret_key())


def _tenseal() -> Any:
    import tenseal

    return tenseal


def create_keys(params: HeParams | None = None) -> tuple[bytes, bytes, str]:
    """A new key set: (hospitals' secret context, server's context, fingerprint).

    The fingerprint hashes the secret context, so it names the key (a hash of a full-entropy
    key reveals nothing of it); both files carry it.
    """
    params = params or HeParams()
    ts = _tenseal()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.global_scale = 2.0**params.scale_bits
    secret = context.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public = context.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    fingerprint = hashlib.sha256(secret).hexdigest()[:16]
    return secret, public, fingerprint


def _header(kind: str, fingerprint: str, params: HeParams) -> bytes:
    meta = {
        "kind": kind,
        "fingerprint": fingerprint,
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "scale_bits": params.scale_bits,
    }
    return MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n"


def write_keys(directory: str | Path, *, overwrite: bool = False) -> str:
    """Write ``secret.ctx`` (hospitals) and ``public.ctx`` (server), mode 0600; returns the
    fingerprint. Existing keys are never overwritten unless asked."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / SECRET_FILE, out / PUBLIC_FILE]
    if not overwrite and any(t.exists() for t in targets):
        raise HeError(f"keys already exist in '{out}': use another --out (keys are not replaced)")
    params = HeParams()
    secret, public, fingerprint = create_keys(params)
    for path, kind, blob in ((targets[0], "secret", secret), (targets[1], "public", public)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(_header(kind, fingerprint, params) + blob)
        os.chmod(path, 0o600)
    return fingerprint


def load_context(path: str | Path, *, role: str) -> CkksContext:
    """Load a key file for ``role`` ``"hospital"`` (needs the secret) or ``"server"``.

    The server refuses a context that holds a secret key.
    """
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise HeError(
            f"key file '{file}' does not exist: create keys with `fedpriv keys init`"
        ) from None
    except OSError as exc:
        raise HeError(f"cannot read key file '{file}': {exc}") from None
    if not raw.startswith(MAGIC):
        raise HeError(f"'{file}' is not a fedpriv CKKS key file")
    header_end = raw.index(b"\n", len(MAGIC))
    try:
        meta = json.loads(raw[len(MAGIC) : header_end])
        params = HeParams(
            poly_modulus_degree=int(meta["poly_modulus_degree"]),
            coeff_mod_bit_sizes=tuple(int(b) for b in meta["coeff_mod_bit_sizes"]),
            scale_bits=int(meta["scale_bits"]),
        )
        fingerprint = str(meta["fingerprint"])
        kind = str(meta["kind"])
    except (ValueError, KeyError, TypeError):
        raise HeError(f"'{file}' has a damaged header") from None
    ts = _tenseal()
    try:
        context = ts.context_from(raw[header_end + 1 :])
    except (ValueError, RuntimeError) as exc:
        raise HeError(f"'{file}' holds no readable CKKS context: {exc}") from None
    holds_secret = bool(context.has_secret_key())
    if role == "server" and holds_secret:
        raise HeError(
            f"'{file}' holds the secret key: the server must only get public.ctx, never the "
            "hospitals' secret.ctx"
        )
    if role == "hospital" and not holds_secret:
        raise HeError(f"'{file}' has no secret key: hospitals need secret.ctx")
    if role not in ("hospital", "server"):
        raise ValueError(role)
    context.global_scale = 2.0**params.scale_bits
    return CkksContext(context, fingerprint=fingerprint, params=params, kind=kind)


# ---- flattening a model ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each named array lives in the flat vector (both sides know the model)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> Layout:
        return cls(
            names=tuple(weights),
            shapes=tuple(tuple(int(d) for d in np.shape(v)) for v in weights.values()),
            dtypes=tuple(str(np.asarray(v).dtype) for v in weights.values()),
        )

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate(
            [np.asarray(weights[n], dtype=np.float64).ravel() for n in self.names]
        )

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            count = int(np.prod(shape))
            out[name] = vector[offset : offset + count].reshape(shape).astype(dtype)
            offset += count
        return out


# ---- hospitals -------------------------------------------------------------------------------


def encrypt_contribution(context: CkksContext, vector: np.ndarray, num_examples: int) -> bytes:
    """``encrypt((n_k / 1000) * vector ++ [n_k / 1000])`` as one serialized blob."""
    if not context.can_decrypt:
        raise HeError("encrypting needs the hospitals' secret context")
    weight = num_examples / WEIGHT_UNIT
    payload = np.concatenate([np.asarray(vector, dtype=np.float64) * weight, [weight]])
    ts = _tenseal()
    with contextlib.redirect_stdout(io.StringIO()):  # TenSEAL prints a note when it splits
        encrypted = ts.ckks_vector(context.context, payload)
    return bytes(encrypted.serialize())


def decrypt_sum(
    context: CkksContext, blob: bytes, *, length: int, total_examples: int
) -> np.ndarray:
    """The example-weighted mean of the hospitals' vectors, from the server's encrypted sum.

    Checks the sum's last slot against the plaintext total: a contribution under another
    key (or a corrupted sum) fails here instead of silently poisoning the model.
    """
    if not context.can_decrypt:
        raise HeError("decrypting needs the hospitals' secret context")
    ts = _tenseal()
    try:
        encrypted = ts.ckks_vector_from(context.context, blob)
    except (ValueError, RuntimeError) as exc:
        raise HeError(f"the global model's ciphertext is unreadable: {exc}") from None
    if encrypted.size() != length + 1:
        raise HeError(
            f"the global model's ciphertext holds {encrypted.size()} values, expected {length + 1}"
        )
    values = np.asarray(encrypted.decrypt(), dtype=np.float64)
    total = total_examples / WEIGHT_UNIT
    if total <= 0 or not abs(values[-1] - total) <= 1e-6 * max(1.0, total):
        raise HeError(
            "the encrypted aggregate does not add up (its example count decrypts to "
            f"{values[-1] * WEIGHT_UNIT:.6g}, the server reports {total_examples}): a hospital "
            "used a different key, or the aggregate was tampered with"
        )
    return values[:length] / total


# ---- the server ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rejection:
    index: int
    reason: str


def sum_ciphertexts(
    context: CkksContext, blobs: Sequence[bytes], *, length: int
) -> tuple[bytes | None, list[Rejection]]:
    """Add the hospitals' ciphertexts (each holding ``length + 1`` values).

    Every blob is deserialized and checked before anything is added, so a malformed,
    truncated or mis-sized one is rejected alone and cannot corrupt the sum.
    """
    ts = _tenseal()
    loaded = []
    rejected: list[Rejection] = []
    for index, blob in enumerate(blobs):
        try:
            vector = ts.ckks_vector_from(context.context, blob)
        except (ValueError, RuntimeError, TypeError) as exc:
            rejected.append(Rejection(index, f"unreadable ciphertext ({exc})"))
            continue
        if vector.size() != length + 1:
            rejected.append(
                Rejection(index, f"ciphertext holds {vector.size()} values, expected {length + 1}")
            )
            continue
        loaded.append((index, vector))
    total = None
    while loaded and total is None:
        base_index, base = loaded[0]
        failed = []
        for index, vector in loaded[1:]:
            try:
                base += vector  # in place; never CKKSVector.copy() (it re-serializes the context)
            except (ValueError, RuntimeError) as exc:  # e.g. a different CKKS scale
                failed.append((index, vector, str(exc)))
        if failed and len(failed) == len(loaded) - 1:
            # nothing would add to the first one: it is the odd one out, start over without it
            rejected.append(Rejection(base_index, "cannot be added to the others"))
            loaded = [(i, v) for i, v, _ in failed]
            continue
        rejected.extend(Rejection(i, f"cannot be added ({reason})") for i, _, reason in failed)
        total = base
    if total is None:
        return None, rejected
    return bytes(total.serialize()), rejected
