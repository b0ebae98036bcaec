"""Membership inference on the final model: which records trained it?

The auditor holds the final model and the hospitals' records (members: what they trained on;
non-members: what they held out). Each attack of :mod:`fedpriv.privacy.audit.attacks` scores
every record; the scores give AUC, TPR at low FPR and an empirical epsilon lower bound per
hospital, set against the accounted epsilon (a bound above it means the DP guarantee is
broken). The no-information baseline is guessing: AUC 0.5, TPR equal to FPR.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedpriv.errors import FedprivError
from fedpriv.privacy.audit.attacks import AttackInputs, create_attack
from fedpriv.privacy.audit.base import AuditInputs
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

__all__ = ["AuditFailure", "membership_audit"]


class AuditFailure(FedprivError):
    """An empirical lower bound exceeds the accounted epsilon: the DP guarantee is broken."""


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


def membership_audit(
    inputs: AuditInputs,
    attacks: Sequence[str],
    *,
    reference_models: int,
    bootstrap_samples: int,
    on_reference_model: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the named membership attacks; returns their entries, the DP verdict (pass / fail
    / no-dp) with its failures, the LOSS threshold grid, canaries and timings."""
    from fedpriv.privacy.audit.run import AuditError

    config, dataset, model = inputs.config, inputs.dataset, inputs.model
    attack_objects = {name: create_attack(name) for name in attacks}
    hospitals = [(h.name, h.train, h.held_out) for h in inputs.hospitals]
    members = np.concatenate([train for _, train, _ in hospitals])
    non_members = np.concatenate([held for _, _, held in hospitals])
    audited = np.concatenate([members, non_members])
    is_member = np.concatenate([np.ones(members.size, bool), np.zeros(non_members.size, bool)])
    owner = np.concatenate(
        [np.full(t.size, k) for k, (_, t, _) in enumerate(hospitals)]
        + [np.full(h.size, k) for k, (_, _, h) in enumerate(hospitals)]
    )
    population = inputs.population
    x, y = dataset.features, dataset.labels
    target = model_outputs(model, x[audited], y[audited])
    target_population = model_outputs(model, x[population], y[population])
    delta = float(config.get("delta", 1e-5))
    privacy = inputs.privacy

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
            seed=inputs.seed,
            evaluate_on=[(x[audited], y[audited]), (x[population], y[population])],
            on_model=on_reference_model,
        )
        timings["reference_models"] = time.perf_counter() - t0

    attack_inputs = AttackInputs(
        target_loss=target.loss,
        target_logit=target.logit,
        target_prob=target.prob,
        population_prob=target_population.prob,
    )
    if reference is not None:
        member_mask, outputs = reference
        attack_inputs = AttackInputs(
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
    rng = np.random.default_rng(inputs.seed)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, attack in attack_objects.items():
        if attack.needs_population and population.size == 0:
            skipped[name] = "needs population records (a central test split) and the run has none"
            continue
        t0 = time.perf_counter()
        scores = attack.scores(attack_inputs)
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
        entry.update(_reading(name, entry, reference_models if reference is not None else 0))
        timings[name] = time.perf_counter() - t0
        results[name] = entry

    verdict, failures = _verdict(results, accounted, dp_on=bool(accounted))
    document: dict[str, Any] = {
        "attacks": results,
        "skipped": skipped,
        "accounted": accounted,
        "delta": delta,
        "members": int(members.size),
        "non_members": int(non_members.size),
        "population": int(population.size),
        "per_hospital_counts": {
            h: {"members": int(t.size), "non_members": int(o.size)} for h, t, o in hospitals
        },
        "reference_models": reference_models if reference is not None else 0,
        "loss_grid": _hospital_grid(model, dataset, hospitals),
        "verdict": verdict,
        "failures": failures,
        "seconds": timings,
    }
    canaries = list(inputs.options.get("canaries") or [])
    if canaries:
        document["canaries"] = _canary_audit(
            model, dataset, canaries, delta=delta, accounted=accounted
        )
    return document


def _reading(name: str, entry: dict[str, Any], reference_models: int) -> dict[str, Any]:
    """What the attacker had, the guessing baseline, and the plain reading of the result."""
    had = "the final model's loss on each record"
    if name.startswith("lira") or name == "rmia":
        had = (
            f"the final model's confidence on each record and {reference_models} reference "
            "models trained with the run's recipe on known halves of the records"
        )
    low, high = entry["auc_ci"]
    if low > 0.5:
        verdict = "leak"
        reading = (
            f"tells training records from held-out ones better than guessing: AUC "
            f"{entry['auc']:.3f} (95% interval {low:.3f}-{high:.3f}, guessing 0.5)"
        )
    else:
        verdict = "no-leak"
        reading = (
            f"indistinguishable from guessing: AUC {entry['auc']:.3f}, its 95% interval "
            f"{low:.3f}-{high:.3f} includes 0.5"
        )
    return {
        "attacker": had + "; members are the hospitals' training records, non-members "
        "their held-out records",
        "baseline": {
            "auc": 0.5,
            "balanced_accuracy": 0.5,
            "tpr_at_fpr": {str(f): f for f in FPRS},
            "epsilon_lower_bound": 0.0,
        },
        "verdict": verdict,
        "reading": reading,
    }


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
