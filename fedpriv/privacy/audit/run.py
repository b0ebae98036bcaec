"""Auditing a finished run from its run directory alone, as an outside auditor would.

Reads ``config.json``, ``partitions.json``, ``model.pt``, ``privacy.json`` (and, for a
deployment, ``federated_audit.json``, what the hospitals computed themselves); checks each
before trusting it; runs every requested attack whose needs the run meets and says, for each
one it cannot run, why; writes ``audit.json``. Nothing of fedpriv's internal state is used.

Attacks are of two kinds behind one name space: membership-inference scores
(:mod:`fedpriv.privacy.audit.attacks`: loss, lira, lira-offline, rmia), which share the
members/non-members machinery of :mod:`fedpriv.privacy.audit.membership`, and audits of
:mod:`fedpriv.privacy.audit.base`'s registry (inversion, attribute, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.errors import FedprivError
from fedpriv.privacy.audit.attacks import available_attacks
from fedpriv.privacy.audit.base import (
    AuditInputs,
    HospitalRecords,
    Progress,
    available_audits,
    create_audit,
)
from fedpriv.privacy.audit.membership import AuditFailure, membership_audit
from fedpriv.runfiles import read_metrics, read_run_json

__all__ = [
    "DEFAULT_ATTACKS",
    "AuditError",
    "AuditFailure",
    "all_attacks",
    "audit_run",
    "load_run",
]

#: the membership attacks ``fedpriv simulate --audit`` has always run
DEFAULT_ATTACKS = ("loss", "lira", "lira-offline", "rmia")
AUDIT_FILE = "audit.json"


class AuditError(FedprivError):
    """The run directory cannot be audited."""


def all_attacks() -> tuple[str, ...]:
    """Every attack ``--attacks`` accepts, membership scores first."""
    return available_attacks() + tuple(
        a for a in available_audits() if a not in available_attacks()
    )


def _indices(value: Any, where: str, size: int) -> np.ndarray:
    """Record indices as partitions.json must hold them: whole numbers in ``[0, size)``."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise AuditError(f"partitions.json: {where} must be a list of whole record indices")
    array = np.asarray(value, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= size):
        bad = int(array[(array < 0) | (array >= size)][0])
        raise AuditError(
            f"partitions.json: {where} names record {bad}, outside the dataset's 0..{size - 1}: "
            "the file is damaged or belongs to another dataset"
        )
    return array


def _hospitals(partitions: Mapping[str, Any], size: int) -> tuple[HospitalRecords, ...]:
    entries = partitions.get("hospitals")
    if not isinstance(entries, list) or not entries:
        raise AuditError("partitions.json names no hospitals: the file is damaged")
    hospitals = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or "train" not in entry or "held_out" not in entry:
            raise AuditError(f"partitions.json: hospital {k} lacks train / held_out")
        name = str(entry.get("name", f"hospital-{k}"))
        train = _indices(entry["train"], f"{name}'s train", size)
        held = _indices(entry["held_out"], f"{name}'s held_out", size)
        both = np.intersect1d(train, held)
        if both.size:
            raise AuditError(
                f"partitions.json: record {int(both[0])} is both trained on and held out at "
                f"{name}: the file is damaged"
            )
        hospitals.append(HospitalRecords(name=name, train=train, held_out=held))
    return tuple(hospitals)


def load_run(
    run_dir: str | Path,
    *,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> AuditInputs:
    """What an auditor holds for the run, each file checked: the final model when there is
    ``model.pt``; the records and who trained on them when the run is a simulation."""
    import torch

    from fedpriv.data import load_dataset, load_schema
    from fedpriv.data.datasets import with_feature_statistics
    from fedpriv.data.schema import check_schema_digest
    from fedpriv.models import build

    run = Path(run_dir)
    if not run.is_dir():
        raise AuditError(f"run directory '{run}' does not exist")
    config = read_run_json(run / "config.json")
    for key in ("model", "model-args", "dataset"):
        if key not in config:
            raise AuditError(
                f"'{run / 'config.json'}' has no '{key}': the file is damaged or not fedpriv's"
            )
    if not isinstance(config["model-args"], dict):
        raise AuditError(f"'{run / 'config.json'}': model-args must be an object")
    read_metrics(run / "metrics.jsonl")
    privacy = read_run_json(run / "privacy.json", required=False)
    if privacy and not isinstance(privacy.get("hospitals", {}), dict):
        raise AuditError(f"'{run / 'privacy.json'}': hospitals must be an object")
    opts: dict[str, Any] = dict(options or {})

    model = None
    model_file = run / "model.pt"
    if model_file.is_file():
        try:
            model = build(str(config["model"]), **dict(config["model-args"]))
            model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
        except FedprivError as exc:
            raise AuditError(f"'{run / 'config.json'}': {exc}") from None
        except Exception as exc:
            raise AuditError(
                f"'{model_file}' does not load into the recorded model "
                f"({type(exc).__name__}): {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
    deployment = bool(config.get("deployment", False))
    dataset = None
    hospitals: tuple[HospitalRecords, ...] = ()
    population = np.zeros(0, dtype=np.int64)
    partitions_file = run / "partitions.json"
    if not deployment and partitions_file.is_file():
        partitions = read_run_json(partitions_file)
        try:
            schema_file = str(config.get("schema", "") or "")
            dataset = load_dataset(
                str(config["dataset"]),
                label_column=str(config.get("label-column", "label")),
                site_column=str(config.get("site-column", "site")),
                # normalised as the run's hospitals did (the recorded schema)
                schema=load_schema(schema_file) if schema_file else None,
                # a run recorded before schemas existed standardised per file
                normalisation=str(config.get("normalisation", "file")),
            )
            check_schema_digest(
                str(config.get("schema-digest", "") or ""), dataset.schema, who="the audit"
            )
            if str(config.get("normalisation", "")) == "federated":  # what the model was fed
                dataset = with_feature_statistics(
                    dataset, str(config.get("feature-statistics", "") or "")
                )
        except FedprivError as exc:
            raise AuditError(f"the run's dataset cannot be loaded: {exc}") from None
        hospitals = _hospitals(partitions, len(dataset))
        population = _indices(partitions.get("test", []), "test", len(dataset))
        canaries = partitions.get("canaries") or []
        if not isinstance(canaries, list):
            raise AuditError("partitions.json: canaries must be a list")
        for c in canaries:
            if not isinstance(c, dict) or not {"index", "label", "included"} <= set(c):
                raise AuditError("partitions.json: a canary lacks index / label / included")
            _indices([c["index"]], "a canary", len(dataset))
        opts.setdefault("canaries", canaries)
    elif not deployment and model is None and not (run / "metrics.jsonl").is_file():
        raise AuditError(
            f"'{run}' holds no rounds, no partitions.json and no model: the run did not get "
            "past its start (resume it with `fedpriv simulate --resume`)"
        )
    return AuditInputs(
        run_dir=run,
        config=config,
        model=model,
        dataset=dataset,
        hospitals=hospitals,
        population=population,
        privacy=privacy,
        options=opts,
        seed=seed,
        progress=progress,
    )


def _unmet(name: str, inputs: AuditInputs) -> str | None:
    """Why attack ``name`` cannot run on this run, or None."""
    deployment = bool(inputs.config.get("deployment", False))
    if inputs.model is None and name != "inversion":
        if (inputs.run_dir / "model.ckks.npz").is_file():
            return (
                "the final model is encrypted (model.ckks.npz): a hospital decrypts it with "
                "`fedpriv keys decrypt-model` first"
            )
        return "the run has no final model (model.pt): it did not finish"
    if inputs.dataset is None:
        if deployment:
            return (
                "deployment run: the records stay at the hospitals, so no one holds them "
                "centrally to attack"
                + (
                    "; the hospitals ran the federated LOSS audit instead (below)"
                    if (inputs.run_dir / "federated_audit.json").is_file()
                    else "; run with --audit to have each hospital run the federated LOSS audit"
                )
            )
        return "the run has no partitions.json, so which records trained the model is unknown"
    if name in available_attacks():
        return None
    return create_audit(name).unmet(inputs)


def audit_run(
    run_dir: str | Path,
    *,
    attacks: Sequence[str] | None = None,
    reference_models: int = 4,
    bootstrap_samples: int = 200,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    on_reference_model: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``attacks`` (None: every attack the run's files allow) on the run; write and
    return ``audit.json``'s content. Requested attacks the run cannot support are listed
    under ``skipped`` with the reason."""
    started = time.perf_counter()
    known = all_attacks()
    requested = list(dict.fromkeys(attacks)) if attacks is not None else list(known)
    unknown = [a for a in requested if a not in known]
    if unknown:
        raise AuditError(f"unknown attack '{unknown[0]}': use {', '.join(known)}")
    inputs = load_run(
        run_dir,
        seed=seed,
        options={"bootstrap_samples": bootstrap_samples, **dict(options or {})},
        progress=progress,
    )
    run = inputs.run_dir
    skipped: dict[str, str] = {}
    runnable: list[str] = []
    for name in requested:
        reason = _unmet(name, inputs)
        if reason is None:
            runnable.append(name)
        else:
            skipped[name] = reason
    if (
        attacks is not None
        and requested
        and not runnable
        and not ((run / "federated_audit.json").is_file())
    ):
        first = requested[0]
        raise AuditError(f"no requested attack can run on '{run}': {first}: {skipped[first]}")

    delta = float(inputs.config.get("delta", 1e-5))
    accounted = {
        str(name): float(report["epsilon"])
        for name, report in inputs.privacy.get("hospitals", {}).items()
        if isinstance(report, dict) and isinstance(report.get("epsilon"), int | float)
    }
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    membership_names = [n for n in runnable if n in available_attacks()]
    document: dict[str, Any] = {
        "accounted_epsilon": accounted,
        "accounted_epsilon_max": max(accounted.values()) if accounted else None,
        "delta": delta,
        "deployment": bool(inputs.config.get("deployment", False)),
        # pass / fail: membership bounds against the accounted epsilon; unchecked: none ran
        "verdict": "no-dp" if not accounted else "unchecked",
        "failures": [],
    }
    if membership_names:
        membership = membership_audit(
            inputs,
            membership_names,
            reference_models=reference_models,
            bootstrap_samples=bootstrap_samples,
            on_reference_model=on_reference_model,
        )
        results.update(membership.pop("attacks"))
        skipped.update(membership.pop("skipped"))
        timings.update(membership.pop("seconds"))
        membership.pop("accounted")
        document.update(membership)
    for name in runnable:
        if name in membership_names:
            continue
        t0 = time.perf_counter()
        results[name] = create_audit(name).run(inputs).to_json()
        timings[name] = time.perf_counter() - t0
    document["attacks"] = results
    document["skipped"] = skipped
    document["leaks"] = sorted(n for n, e in results.items() if e.get("verdict") == "leak")
    document["settings"] = {
        "attacks": list(results),
        "reference_models": document.pop("reference_models", 0),
        "bootstrap_samples": bootstrap_samples,
        "confidence": 0.95,
        "seed": seed,
        "options": {
            k: v for k, v in dict(options or {}).items() if isinstance(v, str | int | float)
        },
        "score": "membership: higher = more likely a member",
    }
    federated_path = run / "federated_audit.json"
    if federated_path.is_file():
        document["federated"] = read_run_json(federated_path)
    linkage_path = run / "linkage.json"
    if linkage_path.is_file():
        document["linkage"] = read_run_json(linkage_path)
    document["seconds"] = {**timings, "total": time.perf_counter() - started}
    _write(run / AUDIT_FILE, document)
    return document


def _write(path: Path, document: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=True, allow_nan=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
