"""The run directory: everything an outside auditor needs to reload a run, and nothing more.

``config.json`` the resolved configuration (kebab-case) plus ``model-args``;
``metrics.jsonl`` one JSON object per round; ``partitions.json`` which records each hospital
trained on and held out; ``model.pt`` the final global state_dict; ``checkpoint.pt`` the last
completed round (for ``--resume``); ``flower.log`` Flower's own log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.config import RunConfig
from fedpriv.data import FederatedSplit
from fedpriv.errors import ConfigError, RunDirectoryError

__all__ = ["Checkpoint", "RunDirectory", "new_run_name"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PARTITIONS = "partitions.json"
MODEL = "model.pt"
ENCRYPTED_MODEL = "model.ckks.npz"
CHECKPOINT = "checkpoint.pt"
PRIVACY = "privacy.json"
FLOWER_LOG = "flower.log"
#: what each hospital of a deployment declared before round 1 (records, patients)
DECLARED = "declared.json"

_META_KEYS = ("model-args", "fedpriv-version", "created")


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    extra: dict[str, Any]


def new_run_name() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- creation and reading --------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path) -> RunDirectory:
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()):
            raise RunDirectoryError(
                f"run directory '{run.path}' already exists and is not empty: choose another "
                "--out / run name, or continue it with --resume"
            )
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(f"cannot create run directory '{run.path}': {exc}") from None
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        run = cls(path)
        if not (run.path / CONFIG).is_file():
            raise RunDirectoryError(
                f"'{run.path}' is not a fedpriv run directory (no {CONFIG} in it)"
            )
        return run

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(
        self, config: RunConfig, *, model_name: str, model_args: Mapping[str, Any]
    ) -> None:
        from fedpriv import __version__

        data = config.to_mapping()
        data["model"] = model_name
        data["model-args"] = dict(model_args)
        data["fedpriv-version"] = __version__
        data["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        _atomic_write_text(self.file(CONFIG), json.dumps(data, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> tuple[RunConfig, str, dict[str, Any]]:
        data = self._read_json(CONFIG)
        try:
            model_args = dict(data["model-args"])
            model_name = str(data["model"])
        except (KeyError, TypeError, ValueError):
            raise RunDirectoryError(f"{self.file(CONFIG)} has no model / model-args") from None
        values = {k: v for k, v in data.items() if k not in _META_KEYS}
        # a run recorded before schemas existed standardised per file: resumed, it still must
        values.setdefault("normalisation", "file")
        try:
            config = RunConfig.from_mapping(values)
        except ConfigError as exc:
            raise RunDirectoryError(f"{self.file(CONFIG)}: {exc}") from None
        return config, model_name, model_args

    def write_privacy(self, document: Mapping[str, Any]) -> None:
        _atomic_write_text(
            self.file(PRIVACY), json.dumps(document, indent=2, sort_keys=True) + "\n"
        )

    def read_privacy(self) -> dict[str, Any]:
        if not self.file(PRIVACY).is_file():
            return {}
        return self._read_json(PRIVACY)

    def write_partitions(self, split: FederatedSplit) -> None:
        _atomic_write_text(self.file(PARTITIONS), split.dumps() + "\n")

    def read_partitions(self) -> FederatedSplit:
        return FederatedSplit.from_json(self._read_json(PARTITIONS))

    # ---- per-round output ------------------------------------------------------------

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with self.file(METRICS).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True, allow_nan=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS)
        if not path.is_file():
            return []
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunDirectoryError(f"{path} line {number} is not valid JSON") from None
        return rows

    def keep_metrics_through(self, last_round: int) -> None:
        """Drop rows after ``last_round`` (a resumed run redoes them)."""
        rows = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        _atomic_write_text(
            self.file(METRICS),
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows),
        )

    def save_checkpoint(
        self, round_: int, weights: Mapping[str, np.ndarray], extra: Mapping[str, Any]
    ) -> None:
        payload = {
            "round": round_,
            "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
            "extra": json.dumps(dict(extra)),
        }
        _atomic_torch_save(payload, self.file(CHECKPOINT))

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.file(CHECKPOINT)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return Checkpoint(
                round=int(payload["round"]),
                weights={k: v.numpy() for k, v in payload["state_dict"].items()},
                extra=json.loads(payload.get("extra", "{}")),
            )
        except Exception as exc:
            raise RunDirectoryError(f"checkpoint '{path}' cannot be read: {exc}") from None

    def save_encrypted_model(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The final model as the server holds it under HE: ciphertext sum and total."""
        path = self.file(ENCRYPTED_MODEL)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_json(self, name: str, document: Mapping[str, Any]) -> None:
        _atomic_write_text(self.file(name), json.dumps(document, indent=2, sort_keys=True) + "\n")

    def write_declarations(self, records: Mapping[str, int], patients: Mapping[str, int]) -> None:
        """What the hospitals declared before round 1: a resumed run checks claims and sizes
        its noise against the same counts (its hospitals are not asked again)."""
        self.write_json(DECLARED, {"records": dict(records), "patients": dict(patients)})

    def read_declarations(self) -> tuple[dict[str, int], dict[str, int]]:
        """``(records, patients)`` per hospital; empty for a run that recorded none."""
        if not self.file(DECLARED).exists():
            return {}, {}
        data = self._read_json(DECLARED)
        try:
            return tuple(  # type: ignore[return-value]
                {str(name): int(count) for name, count in dict(data[part]).items()}
                for part in ("records", "patients")
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirectoryError(
                f"'{self.file(DECLARED)}' does not hold the hospitals' counts ({exc})"
            ) from None

    def save_model(self, weights: Mapping[str, np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        _atomic_torch_save(state, self.file(MODEL))

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.file(name)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirectoryError(f"'{path}' is missing") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirectoryError(f"'{path}' cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise RunDirectoryError(f"'{path}' does not hold a JSON object")
        return data


def decrypt_final_model(run: RunDirectory, secret_context: str | Path) -> Path:
    """A hospital (which holds the secret key) turns the server's encrypted model into model.pt.

    The model leaves the hospital: its values are flooded with noise (see
    :func:`fedpriv.protocols.ckks.flood`), so that no exact CKKS decryption is ever published.
    """
    from fedpriv.models import initial_state
    from fedpriv.privacy.he import HeError, Layout, load_context
    from fedpriv.protocols.ckks import CIPHERTEXT, FINGERPRINT, TOTAL, decrypt_export

    config, model_name, model_args = run.read_config()
    encrypted = run.file(ENCRYPTED_MODEL)
    if not encrypted.is_file():
        raise RunDirectoryError(f"'{run.path}' has no encrypted model ({ENCRYPTED_MODEL})")
    context = load_context(secret_context, role="hospital")
    try:
        with np.load(encrypted, allow_pickle=False) as archive:
            blob = archive[CIPHERTEXT].astype(np.uint8).tobytes()
            fingerprint = bytes(archive[FINGERPRINT].astype(np.uint8)).decode(errors="replace")
            total = int(np.asarray(archive[TOTAL]).reshape(-1)[0])
    except KeyError as exc:
        raise RunDirectoryError(
            f"'{encrypted}' lacks the array {exc}: not an encrypted model"
        ) from None
    except (OSError, ValueError, IndexError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise RunDirectoryError(f"'{encrypted}' cannot be read: {exc}") from None
    if fingerprint != context.fingerprint:
        raise HeError(
            f"the model is encrypted under key {fingerprint}, '{secret_context}' is "
            f"{context.fingerprint}"
        )
    layout = Layout.of(initial_state(model_name, config.seed, **model_args))
    weights = layout.unflatten(decrypt_export(context, blob, length=layout.size, total=total))
    run.save_model(weights)
    return run.file(MODEL)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
