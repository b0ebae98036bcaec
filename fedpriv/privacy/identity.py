"""Who a record belongs to, as a site's privacy ledger knows it: keyed hashes, never IDs.

A site has one secret key (32 random bytes) in a file beside its ledger (``LEDGER.key``,
0600). A patient is identified by ``BLAKE2b(key, patient ID)`` when the site names a patient
column, otherwise by ``BLAKE2b(key, the raw record)`` over its columns in name order, so
reordering, appending or removing records, reordering columns or reformatting numbers
keeps every identity. For tables in record mode the ledger also keeps one keyed hash per
cell, so that when columns are added or dropped a record is matched to the patients it
agrees with on every column both files share.

BLAKE2b with a key is a MAC (RFC 7693): without the key nobody can test a guessed patient
ID or record against the ledger's hashes, and the key never leaves the site.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpriv.data.datasets import RecordSource
from fedpriv.errors import FedprivError

__all__ = [
    "IDENTITY_PATIENT",
    "IDENTITY_RECORD",
    "KeyedRecords",
    "SiteKey",
    "SiteKeyError",
    "count_patients",
    "identity_mode",
    "key_path_for",
]

KEY_SUFFIX = ".key"
KEY_BYTES = 32
IDENTITY_RECORD = "record"
IDENTITY_PATIENT = "patient-column"
_CHECK_MESSAGE = b"fedpriv ledger key check v1"


class SiteKeyError(FedprivError):
    """The site's identity key cannot be used; nothing was changed."""


def key_path_for(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + KEY_SUFFIX)


def identity_mode(source: RecordSource) -> str:
    """``patient-column:NAME`` when records name their patient, else ``record``."""
    if source.patient_ids is not None:
        return f"{IDENTITY_PATIENT}:{source.patient_column}"
    return IDENTITY_RECORD


def count_patients(source: RecordSource) -> int:
    """How many patients ``source``'s records belong to, as :meth:`SiteKey.records` tells
    them apart (distinct patient IDs, else distinct records), without the key: what a site
    declares before round 1 (distributed noise sizes its share by it). The ledger may still
    merge some (a record that matches several earlier patients), never split them."""
    if source.patient_ids is not None:
        return len({_canonical_id(str(p)) for p in source.patient_ids})
    return len(set(source.row_material()))


@dataclasses.dataclass(frozen=True, eq=False)
class SiteKey:
    secret: bytes = dataclasses.field(repr=False)
    path: Path

    @classmethod
    def create(cls, path: Path) -> SiteKey:
        """A new key, written 0600 with O_EXCL: an existing file is never replaced."""
        secret = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SiteKeyError(f"'{path}' already exists; it was left untouched") from None
        except OSError as exc:
            raise SiteKeyError(f"cannot create the ledger's key '{path}': {exc}") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret.hex().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        return cls(secret=secret, path=path)

    @classmethod
    def load(cls, path: Path) -> SiteKey:
        try:
            mode = path.stat().st_mode
            text = path.read_bytes()
        except FileNotFoundError:
            raise SiteKeyError(f"the ledger's key '{path}' is missing") from None
        except PermissionError:
            raise SiteKeyError(
                f"the ledger's key '{path}' cannot be read by this user (permission denied)"
            ) from None
        except OSError as exc:
            raise SiteKeyError(f"the ledger's key '{path}' cannot be read: {exc}") from None
        if not stat.S_ISREG(mode):
            raise SiteKeyError(f"the ledger's key '{path}' is not a regular file")
        try:
            secret = bytes.fromhex(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            secret = b""
        if len(secret) != KEY_BYTES:
            raise SiteKeyError(
                f"'{path}' is not a fedpriv ledger key (expected {KEY_BYTES} bytes in hex)"
            )
        return cls(secret=secret, path=path)

    def check_value(self) -> str:
        """Recorded in the ledger: tells whether a key file belongs to it (not the key)."""
        return hmac.new(self.secret, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:32]

    def _hash(self, data: bytes, size: int = 16) -> bytes:
        return hashlib.blake2b(data, key=self.secret, digest_size=size).digest()

    def patient(self, patient_id: str) -> bytes:
        """The identity of one patient ID (e.g. for ``fedpriv budget --patient``)."""
        return self._hash(b"patient\x00" + _canonical_id(patient_id).encode())

    def records(self, source: RecordSource) -> KeyedRecords:
        """Identity of every record of ``source``: its patient's, or its own."""
        if source.patient_ids is not None:
            keys = [self.patient(str(p)) for p in source.patient_ids]
            return KeyedRecords(keys=np.array(keys, dtype="S16"), mode=identity_mode(source))
        keys = [self._hash(b"record\x00" + row) for row in source.row_material()]
        return KeyedRecords(
            keys=np.array(keys, dtype="S16"),
            mode=IDENTITY_RECORD,
            columns=source.columns,
            source=source,
            key=self,
        )

    def cells(self, source: RecordSource, rows: np.ndarray | None = None) -> np.ndarray:
        """One keyed 8-byte hash per cell, ``(records, columns)`` in ``source.columns``
        order (tables in record mode): what lets a record be recognised after columns are
        added or dropped. Each distinct value of a column is hashed once."""
        picked = source if rows is None else source.take(rows)
        size = len(picked)
        out = np.empty((size, len(picked.columns)), dtype=np.uint64)
        for j, name in enumerate(picked.columns):
            prefix = b"cell\x00" + name.encode() + b"\x00"
            if name in picked.numeric:
                values = np.ascontiguousarray(
                    np.asarray(picked.numeric[name], dtype=np.float64) + 0.0
                )
                uniques, inverse = np.unique(values.view(np.uint64), return_inverse=True)
                hashed = [
                    self._hash(prefix + b"f" + int(u).to_bytes(8, "little"), 8) for u in uniques
                ]
            else:
                text = np.asarray([str(v) for v in picked.text[name]], dtype=object)
                uniques, inverse = np.unique(text, return_inverse=True)
                hashed = [self._hash(prefix + b"s" + str(u).encode(), 8) for u in uniques]
            table = (
                np.frombuffer(b"".join(hashed), dtype=np.uint64)
                if hashed
                else np.empty(0, np.uint64)
            )
            out[:, j] = table[inverse.reshape(-1)] if size else table[:0]
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class KeyedRecords:
    """The keyed identity of each record, and (record mode, tables) how to hash its cells."""

    keys: np.ndarray  # (n,) S16
    mode: str
    columns: tuple[str, ...] = ()
    source: RecordSource | None = None
    key: SiteKey | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def has_cells(self) -> bool:
        return self.mode == IDENTITY_RECORD and bool(self.columns) and self.source is not None

    def cells(self, rows: np.ndarray) -> np.ndarray:
        assert self.key is not None and self.source is not None
        return self.key.cells(self.source, rows)


def projection_keys(cells: np.ndarray, columns: Sequence[str], keep: Sequence[str]) -> list[bytes]:
    """Each row's cells restricted to the columns ``keep`` (in name order), as one key."""
    index = [columns.index(name) for name in sorted(keep)]
    picked = np.ascontiguousarray(cells[:, index])
    return [row.tobytes() for row in picked]


def _canonical_id(value: str) -> str:
    return value.strip()
