"""Auditing a finished run from its run directory alone, as an outside auditor would.

Reads ``config.json``, ``partitions.json``, ``model.pt`` and ``privacy.json``; reloads the
data with :func:`fedpriv.data.load_dataset`; attacks the final model; writes ``audit.json``.
Members are the hospitals' training records, non-members their held-out records; the central
test split serves as RMIA's population. Nothing of fedpriv's internal state is used.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.data import load_dataset
from fedpriv.errors import FedprivError
from fedpriv.models import build
from fedpriv.privacy.audit.attacks import AttackInputs, create_attack
from fedpriv.privacy.audit.bounds import (
    one_run_epsilon,
    one_run_guesses,
    split_half_bound,
)
from fedpriv.privacy.audit.metrics import (
    FPRS,
    auc,
    balanced_accuracy,
    bootstrap,
    resolvable,
    roc,
    tpr_at_fpr,
)
from fedpriv.privacy.audit.reference import (
    Outputs,
    ReferenceRecipe,
    model_outputs,
    train_reference_models,
)

__all__ = ["DEFAULT_ATTACKS", "AuditError", "AuditFailure", "audit_run"]

DEFAULT_ATTACKS = ("loss", "lira", "lira-offline", "rmia")
AUDIT_FILE = "audit.json"


class AuditError(FedprivError):
    """The run directory cannot be audited."""


class AuditFailure(FedprivError):
    """An empirical lower bound exceeds the accounted epsilon: the DP guarantee is broken."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(
            f"'{path}' is missing: is this a finished fedpriv run directory?"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"'{path}' cannot be read: {exc}") from None
    return data


def _summary(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    *,
    delta: float,
    rng: np.random.Generator,
    samples: int,
) -> dict[str, Any]:
    intervals = bootstrap(member_scores, non_member_scores, samples=samples, rng=rng)
    bound = split_half_bound(member_scores, non_member_scores, delta=delta, rng=rng)
    curve = roc(member_scores, non_member_scores)
    keep = np.unique(np.linspace(0, curve.fpr.size - 1, min(curve.fpr.size, 400)).astype(int))
    return {
        "auc": auc(member_scores, non_member_scores),
        "auc_ci": list(intervals["auc"]),
        "tpr_at_fpr": {str(f): tpr_at_fpr(member_scores, non_member_scores, f) for f in FPRS},
        "tpr_at_fpr_ci": {str(f): list(intervals[f"tpr@{f}"]) for f in FPRS},
        "tpr_at_fpr_resolvable": {str(f): resolvable(non_member_scores.size, f) for f in FPRS},
        "balanced_accuracy": balanced_accuracy(member_scores, non_member_scores),
        "balanced_accuracy_ci": list(intervals["balanced_accuracy"]),
        "epsilon_lower_bound": bound.clopper_pearson,
        "epsilon_lower_bound_gdp": bound.gdp,
        "epsilon_lower_bound_details": {
            "method": "threshold chosen on a random half, Clopper-Pearson on the other half",
            "confidence": bound.confidence,
            "threshold": bound.threshold,
            "members": bound.members,
            "non_members": bound.non_members,
            "true_positives": bound.true_positives,
            "false_positives": bound.false_positives,
        },
        "members": int(member_scores.size),
        "non_members": int(non_member_scores.size),
        "roc": {"fpr": curve.fpr[keep].tolist(), "tpr": curve.tpr[keep].tolist()},
    }


def audit_run(
    run_dir: str | Path,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    reference_models: int = 4,
    bootstrap_samples: int = 200,
    seed: int = 0,
    on_reference_model: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Attack the run's final model; write and return ``audit.json``'s content."""
    started = time.perf_counter()
    run = Path(run_dir)
    config = _read_json(run / "config.json")
    partitions = _read_json(run / "partitions.json")
    privacy = _read_json(run / "privacy.json") if (run / "privacy.json").is_file() else {}
    if not (run / "model.pt").is_file():
        raise AuditError(
            f"'{run / 'model.pt'}' is missing (under HE a hospital first decrypts it with "
            "`fedpriv keys decrypt-model`)"
        )
    attack_objects = {name: create_attack(name) for name in attacks}
    dataset = load_dataset(
        str(config["dataset"]),
        label_column=str(config.get("label-column", "label")),
        site_column=str(config.get("site-column", "site")),
    )
    model = build(str(config["model"]), **dict(config["model-args"]))
    try:
        model.load_state_dict(torch.load(run / "model.pt", map_location="cpu", weights_only=True))
    except Exception as exc:
        raise AuditError(
            f"'{run / 'model.pt'}' does not load into the recorded model: {exc}"
        ) from None
    hospitals = [
        (
            str(h["name"]),
            np.asarray(h["train"], dtype=np.int64),
            np.asarray(h["held_out"], dtype=np.int64),
        )
        for h in partitions["hospitals"]
    ]
    members = np.concatenate([train for _, train, _ in hospitals])
    non_members = np.concatenate([held for _, _, held in hospitals])
    audited = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(members.size, bool), np.zeros(non_members.size, bool)])
    owner = np.concatenate(
        [np.full(t.size, k) for k, (_, t, _) in enumerate(hospitals)]
        + [np.full(h.size, k) for k, (_, _, h) in enumerate(hospitals)]
    )
    population = np.asarray(partitions.get("test", []), dtype=np.int64)
    x, y = dataset.features, dataset.labels
    target = model_outputs(model, x[audited], y[audited])
    target_population = model_outputs(model, x[population], y[population])
    delta = float(config.get("delta", 1e-5))

    timings: dict[str, float] = {}
    reference: tuple[np.ndarray, list[list[Outputs]]] | None = None
    if any(a.needs_reference_models for a in attack_objects.values()):
        if reference_models < 1:
            raise AuditError("LiRA and RMIA need at least one reference model (--reference-models)")
        dp = bool(config.get("dp", True)) and config.get("dp-level", "sample") in ("sample", "both")
        noise = [float(r["noise_multiplier"]) for r in privacy.get("hospitals", {}).values()]
        recipe = ReferenceRecipe(
            model_name=str(config["model"]),
            model_args=dict(config["model-args"]),
            rounds=int(config.get("rounds", 1)),
            local_epochs=int(config.get("local-epochs", 1)),
            hospitals=len(hospitals),
            batch_size=int(config.get("batch-size", 32)),
            lr=float(config.get("lr", 0.1)),
            momentum=float(config.get("momentum", 0.0)),
            noise_multiplier=float(np.median(noise)) if dp and noise else 0.0,
            max_grad_norm=float(config.get("max-grad-norm", 1.0)),
        )
        t0 = time.perf_counter()
        reference = train_reference_models(
            recipe,
            x[audited],
            y[audited],
            count=reference_models,
            seed=seed,
            evaluate_on=[(x[audited], y[audited]), (x[population], y[population])],
            on_model=on_reference_model,
        )
        timings["reference_models"] = time.perf_counter() - t0

    inputs = AttackInputs(
        target_loss=target.loss,
        target_logit=target.logit,
        target_prob=target.prob,
        population_prob=target_population.prob,
    )
    if reference is not None:
        member_mask, outputs = reference
        inputs = AttackInputs(
            target_loss=target.loss,
            target_logit=target.logit,
            target_prob=target.prob,
            reference_logit=np.stack([o[0].logit for o in outputs]),
            reference_prob=np.stack([o[0].prob for o in outputs]),
            reference_in=member_mask,
            population_prob=target_population.prob,
            population_reference_prob=np.stack([o[1].prob for o in outputs]),
        )

    accounted = {
        name: float(report["epsilon"]) for name, report in privacy.get("hospitals", {}).items()
    }
    rng = np.random.default_rng(seed)
    results: dict[str, Any] = {}
    for name, attack in attack_objects.items():
        if attack.needs_population and population.size == 0:
            continue
        t0 = time.perf_counter()
        scores = attack.scores(inputs)
        entry = _summary(
            scores[is_member], scores[~is_member], delta=delta, rng=rng, samples=bootstrap_samples
        )
        entry["per_hospital"] = {
            hospital: _summary(
                scores[is_member & (owner == k)],
                scores[~is_member & (owner == k)],
                delta=delta,
                rng=rng,
                samples=bootstrap_samples,
            )
            for k, (hospital, _, _) in enumerate(hospitals)
        }
        for per in entry["per_hospital"].values():
            per.pop("roc", None)
        timings[name] = time.perf_counter() - t0
        results[name] = entry

    verdict, failures = _verdict(results, accounted, dp_on=bool(accounted))
    document: dict[str, Any] = {
        "attacks": results,
        "accounted_epsilon": accounted,
        "accounted_epsilon_max": max(accounted.values()) if accounted else None,
        "delta": delta,
        "members": int(members.size),
        "non_members": int(non_members.size),
        "population": int(population.size),
        "per_hospital_counts": {
            h: {"members": int(t.size), "non_members": int(o.size)} for h, t, o in hospitals
        },
        "settings": {
            "attacks": list(results),
            "reference_models": reference_models if reference is not None else 0,
            "bootstrap_samples": bootstrap_samples,
            "confidence": 0.95,
            "seed": seed,
            "score": "higher = more likely a member",
        },
        "loss_grid": _hospital_grid(model, dataset, hospitals),
        "verdict": verdict,
        "failures": failures,
        "seconds": {**timings, "total": time.perf_counter() - started},
    }
    canaries = partitions.get("canaries") or []
    if canaries:
        document["canaries"] = _canary_audit(
            model, dataset, canaries, delta=delta, accounted=accounted
        )
    federated_path = run / "federated_audit.json"
    if federated_path.is_file():
        document["federated"] = _read_json(federated_path)
    _write(run / AUDIT_FILE, document)
    return document


def _hospital_grid(
    model: torch.nn.Module, dataset: Any, hospitals: list[tuple[str, np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """The LOSS audit on the federated audit's threshold grid, computed exactly as each
    hospital computes its counts (same loss function, same batches), then summed."""
    from fedpriv.privacy.audit.federated import LOSS_THRESHOLDS, combine_counts, loss_counts
    from fedpriv.training import per_example_losses

    cpu = torch.device("cpu")
    members_le = np.zeros(LOSS_THRESHOLDS.size, dtype=np.int64)
    non_members_le = np.zeros(LOSS_THRESHOLDS.size, dtype=np.int64)
    members = non_members = 0
    for _, train, held in hospitals:
        m_loss, _ = per_example_losses(
            model, dataset.features[train], dataset.labels[train], device=cpu
        )
        n_loss, _ = per_example_losses(
            model, dataset.features[held], dataset.labels[held], device=cpu
        )
        m_le, n_le = loss_counts(m_loss, n_loss, LOSS_THRESHOLDS)
        members_le += np.asarray(m_le)
        non_members_le += np.asarray(n_le)
        members += train.size
        non_members += held.size
    return combine_counts(members_le, non_members_le, members, non_members)


def _verdict(
    results: dict[str, Any], accounted: dict[str, float], *, dp_on: bool
) -> tuple[str, list[str]]:
    if not dp_on:
        return "no-dp", []
    failures: list[str] = []
    worst = max(accounted.values())
    for name, entry in results.items():
        for key in ("epsilon_lower_bound", "epsilon_lower_bound_gdp"):
            if entry[key] > worst:
                failures.append(f"{name} ({key}) {entry[key]:.3f} > accounted {worst:.3f}")
            for hospital, per in entry["per_hospital"].items():
                if hospital in accounted and per[key] > accounted[hospital]:
                    failures.append(
                        f"{name} ({key}) at {hospital}: {per[key]:.3f} > accounted "
                        f"{accounted[hospital]:.3f}"
                    )
    return ("fail" if failures else "pass"), failures


def _canary_audit(
    model: torch.nn.Module,
    dataset: Any,
    canaries: list[dict[str, Any]],
    *,
    delta: float,
    accounted: dict[str, float],
    beta: float = 0.05,
) -> dict[str, Any]:
    """Steinke et al.'s one-run audit: score the canaries, guess, bound epsilon."""
    index = np.asarray([c["index"] for c in canaries], dtype=np.int64)
    labels = np.asarray([c["label"] for c in canaries], dtype=np.int64)
    included = np.asarray([bool(c["included"]) for c in canaries])
    outputs = model_outputs(model, dataset.features[index], labels)
    scores = -outputs.loss
    m = len(canaries)
    # the guess counts are fixed in advance; taking the best of them costs a Bonferroni factor
    grid = sorted({g for g in (m // 10, m // 5, m // 2, m) if g >= 2})
    trials = []
    for guesses in grid:
        r, v = one_run_guesses(included, scores, guesses)
        trials.append(
            {
                "guesses": r,
                "correct": v,
                "epsilon_lower_bound": one_run_epsilon(m, r, v, delta=delta, beta=beta / len(grid)),
            }
        )
    best = max(trials, key=lambda t: t["epsilon_lower_bound"]) if trials else None
    bound = best["epsilon_lower_bound"] if best else 0.0
    worst = max(accounted.values()) if accounted else math.inf
    return {
        "canaries": m,
        "included": int(included.sum()),
        "confidence": 1 - beta,
        "delta": delta,
        "trials": trials,
        "epsilon_lower_bound": bound,
        "exceeds_accounted": bool(bound > worst),
        "member_auc": auc(scores[included], scores[~included]) if 0 < included.sum() < m else None,
    }


def _write(path: Path, document: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True, allow_nan=True)
        handle.write("\n")
    os.replace(tmp, path)
