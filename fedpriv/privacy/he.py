"""CKKS homomorphic encryption (TenSEAL's contexts, SEAL's API through ``tenseal.sealapi``):
key files, and a flat parameter vector packed into ciphertexts that the server can only add.

Threat model: an honest-but-curious server. The hospitals share one secret key; the server
holds a context without it, which can neither decrypt nor encrypt. Additions only (depth 0),
so there are no Galois or relinearisation keys to ship, and a two-prime modulus is enough.

Parameters (measured, see BENCHMARKS.md): N = 4096 (2048 complex slots per ciphertext, two
values packed in each, so 4096 values per ciphertext), moduli [60, 40] bits (100 bits, within
SEAL's 128-bit-security limit of 109 for N = 4096), scale 2^40, symmetric encryption (8x less
noise and 2x faster than public-key encryption, and the server's context then cannot even
encrypt).

What a hospital encrypts is ``(n_k / 1000) * w_k`` followed by one more value holding
``n_k / 1000``: the server's sum then carries the plaintext total in its last value, and a
hospital that decrypts checks it against the total ``N`` the server reports. A contribution
under a foreign key adds silently in CKKS and decrypts to noise of order 1e8, so this check
is what catches it. The 1/1000 keeps sums far below CKKS's overflow (about 5e5 at scale 2^40)
for federations of up to hundreds of millions of records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
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
        """Complex slots per ciphertext; each carries two values (real and imaginary part)."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        return 2 * self.slots

    def ciphertexts_for(self, values: int) -> int:
        return -(-values // self.values_per_ciphertext)


@dataclasses.dataclass
class _Seal:
    """SEAL objects of one context, built once (TenSEAL's wrappers hold the keys)."""

    context: Any
    encoder: Any
    evaluator: Any
    encryptor: Any = None
    decryptor: Any = None


class CkksContext:
    """A TenSEAL context plus the fingerprint of the key set it belongs to."""

    def __init__(self, context: Any, *, fingerprint: str, params: HeParams, kind: str) -> None:
        self.context = context
        self.fingerprint = fingerprint
        self.params = params
        self.kind = kind

        self._seal: _Seal | None = None

    @property
    def can_decrypt(self) -> bool:
        return bool(self.context.has_secret_key())

    def seal(self) -> _Seal:
        if self._seal is None:
            sealapi = _sealapi()
            seal_context = self.context.seal_context().data
            bundle = _Seal(
                context=seal_context,
                encoder=sealapi.CKKSEncoder(seal_context),
                evaluator=sealapi.Evaluator(seal_context),
            )
            if self.can_decrypt:
                secret_key = self.context.secret_key().data
                bundle.encryptor = sealapi.Encryptor(seal_context, secret_key)
                bundle.decryptor = sealapi.Decryptor(seal_context, secret_key)
            self._seal = bundle
        return self._seal


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
    header_end = raw.find(b"\n", len(MAGIC))
    if header_end < 0:
        raise HeError(f"'{file}' is truncated (its header never ends)")
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
    body = raw[header_end + 1 :]
    if not body:
        raise HeError(f"'{file}' is truncated (no CKKS context after its header)")
    try:
        context = ts.context_from(body)
    except Exception as exc:  # TenSEAL raises several types for a damaged context
        raise HeError(
            f"'{file}' holds no readable CKKS context (truncated or damaged): {exc}"
        ) from None
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


# ---- the ciphertext container ---------------------------------------------------------------
#
# A contribution or a sum travels as one byte string:
#   b"FPCK" | version (1 byte) | 0 (1 byte) | values (uint32) | ciphertexts (uint32)
#   | each ciphertext's size (uint32 each) | SEAL's own serialization of each ciphertext
# Values are packed two per CKKS slot, as the real and imaginary parts of one complex number:
# addition is componentwise on both, so the server's sum is unchanged, and a ciphertext of
# N = 4096 carries 4096 values instead of the 2048 a real-only packing (TenSEAL's
# CKKSVector) gives. That halves upload, download, encryption and the server's work per
# parameter (measured in BENCHMARKS.md).

CONTAINER_MAGIC = b"FPCK"
CONTAINER_VERSION = 1
_HEADER = struct.Struct("<4sBBII")
_SIZE = struct.Struct("<I")


def _pack_container(values: int, ciphertexts: Sequence[bytes]) -> bytes:
    header = _HEADER.pack(CONTAINER_MAGIC, CONTAINER_VERSION, 0, values, len(ciphertexts))
    sizes = b"".join(_SIZE.pack(len(c)) for c in ciphertexts)
    return header + sizes + b"".join(ciphertexts)


def _unpack_container(blob: bytes, *, values: int, params: HeParams) -> list[bytes]:
    """The ciphertexts of a container that must hold ``values`` values; HeError otherwise."""
    if len(blob) < _HEADER.size:
        raise HeError("not a fedpriv ciphertext (too short)")
    magic, version, _, count, n_cts = _HEADER.unpack_from(blob)
    if magic != CONTAINER_MAGIC or version != CONTAINER_VERSION:
        raise HeError("not a fedpriv ciphertext (unknown format)")
    if count != values:
        raise HeError(f"ciphertext holds {count} values, expected {values}")
    if n_cts != params.ciphertexts_for(values):
        raise HeError(
            f"{n_cts} ciphertexts for {values} values, expected {params.ciphertexts_for(values)}"
        )
    offset = _HEADER.size + n_cts * _SIZE.size
    if len(blob) < offset:
        raise HeError("ciphertext container is truncated")
    sizes = [_SIZE.unpack_from(blob, _HEADER.size + i * _SIZE.size)[0] for i in range(n_cts)]
    if offset + sum(sizes) != len(blob):
        raise HeError(
            f"ciphertext container is {len(blob)} bytes, its header says {offset + sum(sizes)}"
        )
    parts = []
    for size in sizes:
        parts.append(blob[offset : offset + size])
        offset += size
    return parts


class _Scratch:
    """SEAL's Python binding reads and writes ciphertexts only through file paths: one
    private scratch file, in memory (/dev/shm) where the system has it."""

    def __init__(self) -> None:
        shm = Path("/dev/shm")
        where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        fd, self.path = tempfile.mkstemp(prefix="fedpriv-ckks-", dir=where)
        os.close(fd)

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def save(self, ciphertext: Any) -> bytes:
        ciphertext.save(self.path)
        with open(self.path, "rb") as handle:
            return handle.read()

    def load(self, seal_context: Any, blob: bytes) -> Any:
        with open(self.path, "wb") as handle:
            handle.write(blob)
        ciphertext = _sealapi().Ciphertext()
        ciphertext.load(seal_context, self.path)
        return ciphertext


def _sealapi() -> Any:
    import tenseal.sealapi

    return tenseal.sealapi


# ---- hospitals -------------------------------------------------------------------------------


def encrypt_contribution(context: CkksContext, vector: np.ndarray, num_examples: int) -> bytes:
    """``encrypt((n_k / 1000) * vector ++ [n_k / 1000])`` as one serialized container."""
    if not context.can_decrypt:
        raise HeError("encrypting needs the hospitals' secret context")
    weight = num_examples / WEIGHT_UNIT
    payload = np.concatenate([np.asarray(vector, dtype=np.float64) * weight, [weight]])
    values = payload.size
    if values % 2:
        payload = np.append(payload, 0.0)
    packed = payload[0::2] + 1j * payload[1::2]
    seal = context.seal()
    slots = context.params.slots
    scale = 2.0**context.params.scale_bits
    sealapi = _sealapi()
    blobs = []
    with _Scratch() as scratch:
        for start in range(0, packed.size, slots):
            plain = sealapi.Plaintext()
            seal.encoder.encode(packed[start : start + slots].tolist(), scale, plain)
            # seeded: SEAL writes the seed of the uniformly random half of a symmetric
            # encryption instead of the half itself (half the bytes on the wire); loading
            # it expands the seed, so the server's checks and sums see a full ciphertext
            blobs.append(scratch.save(seal.encryptor.encrypt_symmetric(plain)))
    return _pack_container(values, blobs)


def decrypt_sum(
    context: CkksContext, blob: bytes, *, length: int, total_examples: int
) -> np.ndarray:
    """The example-weighted mean of the hospitals' vectors, from the server's encrypted sum.

    Checks the sum's last value against the plaintext total: a contribution under another
    key (or a corrupted sum) fails here instead of silently poisoning the model.
    """
    if not context.can_decrypt:
        raise HeError("decrypting needs the hospitals' secret context")
    try:
        parts = _unpack_container(blob, values=length + 1, params=context.params)
    except HeError as exc:
        raise HeError(f"the global model's ciphertext is unusable: {exc}") from None
    seal = context.seal()
    sealapi = _sealapi()
    decoded = []
    with _Scratch() as scratch:
        for part in parts:
            try:
                cipher = _checked(scratch, context, part)
            except HeError as exc:
                raise HeError(f"the global model's ciphertext is unusable: {exc}") from None
            plain = sealapi.Plaintext()
            seal.decryptor.decrypt(cipher, plain)
            decoded.append(np.asarray(seal.encoder.decode_complex(plain), dtype=np.complex128))
    packed = np.concatenate(decoded)
    values = np.empty(2 * packed.size, dtype=np.float64)
    values[0::2] = packed.real
    values[1::2] = packed.imag
    values = values[: length + 1]
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
    """Add the hospitals' ciphertexts (each container holding ``length + 1`` values).

    Every ciphertext of a contribution is loaded and checked (parameters, level, scale, size)
    before anything is added, so a malformed, truncated, mis-sized or mis-scaled one is
    rejected alone and the additions that follow cannot fail half-way through a sum.
    """
    seal = context.seal()
    rejected: list[Rejection] = []
    total: list[Any] | None = None
    with _Scratch() as scratch:
        for index, blob in enumerate(blobs):
            try:
                parts = _unpack_container(blob, values=length + 1, params=context.params)
                ciphers = [_checked(scratch, context, p) for p in parts]
            except HeError as exc:
                rejected.append(Rejection(index, str(exc)))
                continue
            if total is None:
                total = ciphers
            else:
                for accumulated, cipher in zip(total, ciphers, strict=True):
                    seal.evaluator.add_inplace(accumulated, cipher)
        if total is None:
            return None, rejected
        summed = [scratch.save(c) for c in total]
    return _pack_container(length + 1, summed), rejected


def _checked(scratch: _Scratch, context: CkksContext, blob: bytes) -> Any:
    """One SEAL ciphertext, loaded and checked to be a fresh (or summed) encryption under
    this context's parameters and scale; HeError otherwise."""
    seal = context.seal()
    scale = 2.0**context.params.scale_bits
    try:
        cipher = scratch.load(seal.context, blob)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HeError(f"unreadable ciphertext ({exc})") from None
    parms = seal.context.first_parms_id()
    if list(cipher.parms_id()) != list(parms) or cipher.size() != 2 or not cipher.is_ntt_form():
        raise HeError("ciphertext is not a fresh encryption under this federation's parameters")
    if cipher.scale != scale:
        raise HeError(f"ciphertext has scale {cipher.scale:g}, expected 2^{int(math.log2(scale))}")
    return cipher
