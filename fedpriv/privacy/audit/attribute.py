"""Attribute inference: does the model give away a hidden column of the patients it trained on?

The attacker knows a patient's record except one sensitive column (a diagnosis code, an age
band), knows the patient's label, and holds the final model. For each value the column could
take it asks the model how likely the known label is, and weighs that by how likely the value
is given the other columns (Bayes' rule). Guessing well proves little by itself: the other
columns and the label may already give the value away. So the attack is compared with an
*imputation* baseline holding the same knowledge but no model, trained on the population
records (Jayaraman and Evans, "Are attribute inference attacks just imputation?", CCS 2022).
The leak is the attack's advantage over imputation; an advantage shared by patients the model
never saw is what the model learned about everyone (distributional inference), not a leak of
the trained patients' records, and is reported as such.

Which column is hidden, and what the attacker chooses between, is
:mod:`fedpriv.privacy.audit.sensitive`'s job.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.errors import ConfigError, DataError
from fedpriv.privacy.audit.base import Audit, AuditInputs, AuditResult, register_audit
from fedpriv.privacy.audit.sensitive import (
    SensitiveAttribute,
    feature_columns,
    sensitive_attribute,
)

__all__ = [
    "Advantage",
    "AttributeAudit",
    "Imputer",
    "attack_log_likelihoods",
    "paired_advantage",
]

#: below this many members or non-members the audit says it cannot tell
MIN_RECORDS = 20
DEFAULT_RECORDS = 1000
DEFAULT_BOOTSTRAP = 1000
CONFIDENCE = 0.95
_LOG_FLOOR = float(np.log(1e-12))


class Imputer:
    """Guesses the sensitive class from what the attacker knows, without the model: a
    logistic regression fitted on the population records (the attacker's auxiliary data)."""

    def __init__(self, n_classes: int, *, with_label: bool, num_labels: int) -> None:
        self.n_classes = n_classes
        self.with_label = with_label
        self.num_labels = num_labels
        self._model: Any = None
        self._constant = np.zeros(n_classes)

    def _inputs(self, aux: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if not self.with_label:
            return aux
        return np.column_stack([aux, np.eye(self.num_labels)[labels]])

    def fit(self, aux: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> Imputer:
        present = np.unique(classes)
        if present.size < 2:  # nothing to learn: always the one value seen
            self._constant = np.full(self.n_classes, _LOG_FLOOR)
            self._constant[present] = 0.0
            return self
        from sklearn.linear_model import LogisticRegression

        self._model = LogisticRegression(max_iter=2000).fit(self._inputs(aux, labels), classes)
        return self

    def log_proba(self, aux: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` log-probabilities; classes the population lacks get ~0."""
        if self._model is None:
            return np.tile(self._constant, (aux.shape[0], 1))
        out = np.full((aux.shape[0], self.n_classes), _LOG_FLOOR)
        with np.errstate(divide="ignore"):
            out[:, self._model.classes_] = self._model.predict_log_proba(self._inputs(aux, labels))
        return np.maximum(out, _LOG_FLOOR)


@torch.no_grad()
def attack_log_likelihoods(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    column: int | list[int],
    candidates: np.ndarray,
    *,
    batch_size: int = 4096,
) -> np.ndarray:
    """``(n, k)``: log p_model(label | record with ``column`` set to ``candidates[k]``);
    a list of columns (a one-hot feature) is set to the row ``candidates[k]``."""
    model.eval()
    out = np.empty((labels.shape[0], len(candidates)))
    for start in range(0, labels.shape[0], batch_size):
        x = np.array(features[start : start + batch_size], dtype=np.float32)
        y = torch.from_numpy(labels[start : start + batch_size])
        for k, value in enumerate(candidates):
            x[:, column] = value
            log_p = torch.log_softmax(model(torch.from_numpy(x)).double(), dim=1)
            out[start : start + y.shape[0], k] = log_p.gather(1, y[:, None]).squeeze(1).numpy()
    return out


@dataclasses.dataclass(frozen=True)
class Advantage:
    """Mean of attack-minus-baseline correctness, with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    draws: np.ndarray = dataclasses.field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """JSON has no NaN: an advantage over no records is null."""
        if np.isnan(self.value):
            return {"value": None, "ci": [None, None]}
        return {"value": self.value, "ci": [self.low, self.high]}


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def paired_advantage(
    attack_correct: np.ndarray,
    baseline_correct: np.ndarray,
    *,
    samples: int,
    rng: np.random.Generator,
    truth: np.ndarray | None = None,
    level: float = CONFIDENCE,
) -> Advantage:
    """Attack accuracy minus baseline accuracy on the same records (with ``truth``, the true
    classes: balanced accuracy, the mean over classes of each class's accuracy). The bootstrap
    resamples records, keeping each record's pair of outcomes together: both guessed the same
    patient, so what they share does not widen the interval."""
    diff = np.asarray(attack_correct, np.float64) - np.asarray(baseline_correct, np.float64)
    if diff.size == 0:
        return Advantage(float("nan"), float("nan"), float("nan"), np.full(samples, np.nan))
    classes = np.unique(truth) if truth is not None else np.zeros(0)

    def statistic(d: np.ndarray, t: np.ndarray | None) -> np.ndarray:
        if t is None:
            return d.mean(axis=-1)
        recalls = []
        for c in classes:
            mask = t == c
            count = mask.sum(axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                recalls.append(np.where(count > 0, (d * mask).sum(axis=-1) / count, np.nan))
        with np.errstate(invalid="ignore"):
            return np.nanmean(np.stack(recalls), axis=0)

    draws = np.empty(samples)
    chunk = max(1, 2_000_000 // diff.size)
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        pick = rng.integers(0, diff.size, (count, diff.size))
        draws[start : start + count] = statistic(diff[pick], None if truth is None else truth[pick])
    low, high = _interval(draws, level)
    return Advantage(float(statistic(diff, truth)), low, high, draws)


def _accuracy(correct: np.ndarray) -> float | None:
    return float(correct.mean()) if correct.size else None


def _balanced_accuracy(correct: np.ndarray, truth: np.ndarray) -> float | None:
    recalls = [correct[truth == c].mean() for c in np.unique(truth)]
    return float(np.mean(recalls)) if recalls else None


@dataclasses.dataclass(frozen=True, eq=False)
class _Guesses:
    """One group of records (members or non-members) and both attackers' guesses."""

    owner: np.ndarray  # hospital position of each record
    truth: np.ndarray
    attack: np.ndarray
    imputation: np.ndarray

    @property
    def size(self) -> int:
        return int(self.truth.size)


def _option_int(options: Any, key: str, default: int) -> int:
    value = options.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise ConfigError(f"the audit option {key} must be a positive whole number, not {value!r}")
    return number


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _pts(value: float) -> str:
    return f"{100 * value:+.1f}"


def _ci(adv: Advantage) -> str:
    return f"{_pts(adv.value)} points (95% CI {_pts(adv.low)} to {_pts(adv.high)})"


@register_audit("attribute")
class AttributeAudit(Audit):
    """Infer a hidden column of trained and untrained patients, with and without the model."""

    needs = frozenset({"final-model", "records", "auxiliary", "tabular"})

    def unmet(self, inputs: AuditInputs) -> str | None:
        if inputs.model is None:
            return "attribute inference needs the final model (model.pt)"
        if inputs.dataset is None or not inputs.hospitals:
            return "attribute inference needs the hospitals' records, which only a simulation holds"
        if inputs.dataset.kind != "tabular":
            return "attribute inference needs a tabular dataset with a column to hide"
        if inputs.dataset.features.shape[1] < 2 or len(feature_columns(inputs.dataset)) < 2:
            return "attribute inference needs at least two feature columns"
        if np.asarray(inputs.population).size < MIN_RECORDS:
            return (
                f"attribute inference needs at least {MIN_RECORDS} population records (the "
                "central test split) to fit the imputation baseline"
            )
        return None

    def run(self, inputs: AuditInputs) -> AuditResult:
        reason = self.unmet(inputs)
        if reason is not None:
            raise DataError(reason)
        dataset = inputs.dataset
        options = inputs.options
        cap = _option_int(options, "attribute_records", DEFAULT_RECORDS)
        samples = _option_int(options, "bootstrap_samples", DEFAULT_BOOTSTRAP)
        population = np.asarray(inputs.population, dtype=np.int64)
        attr = sensitive_attribute(dataset, options.get("sensitive_feature"), population)
        rng = np.random.default_rng(inputs.seed)
        x = dataset.features
        y = dataset.labels
        k = len(attr.candidates)

        def aux(index: np.ndarray) -> np.ndarray:
            return np.delete(x[index], attr.hidden, axis=1).astype(np.float64)

        def truth(index: np.ndarray) -> np.ndarray:
            return attr.classes(x[index][:, attr.hidden].astype(np.float64))

        inputs.tick("attribute: imputation", 0, 3)
        known = truth(population)
        prior = Imputer(k, with_label=False, num_labels=dataset.num_classes)
        prior.fit(aux(population), y[population], known)
        imputer = Imputer(k, with_label=True, num_labels=dataset.num_classes)
        imputer.fit(aux(population), y[population], known)

        groups: dict[str, _Guesses] = {}
        available: dict[str, int] = {}
        for step, (group, part) in enumerate((("members", "train"), ("non_members", "held_out"))):
            inputs.tick("attribute: guessing", step + 1, 3)
            parts = [np.asarray(getattr(h, part), dtype=np.int64) for h in inputs.hospitals]
            index = np.concatenate(parts)
            owner = np.concatenate([np.full(p.size, i) for i, p in enumerate(parts)])
            available[group] = int(index.size)
            if index.size > cap:
                keep = np.sort(rng.choice(index.size, cap, replace=False))
                index, owner = index[keep], owner[keep]
            likelihood = attack_log_likelihoods(
                inputs.model, x[index], y[index], attr.hidden, attr.candidates
            )
            groups[group] = _Guesses(
                owner=owner,
                truth=truth(index),
                attack=(likelihood + prior.log_proba(aux(index), y[index])).argmax(axis=1),
                imputation=imputer.log_proba(aux(index), y[index]).argmax(axis=1),
            )
        inputs.tick("attribute: intervals", 3, 3)
        return _result(inputs, attr, groups, available, known, population.size, samples, rng)


def _result(
    inputs: AuditInputs,
    attr: SensitiveAttribute,
    groups: dict[str, _Guesses],
    available: dict[str, int],
    population_classes: np.ndarray,
    population: int,
    samples: int,
    rng: np.random.Generator,
) -> AuditResult:
    metrics: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    advantage: dict[str, Any] = {}
    balanced: dict[str, Any] = {}
    kept: dict[str, Advantage] = {}
    majority_class = int(np.bincount(population_classes).argmax())
    majority: dict[str, float | None] = {}
    for group, g in groups.items():
        hit_attack = g.attack == g.truth
        hit_imputation = g.imputation == g.truth
        metrics[group] = {
            "accuracy": _accuracy(hit_attack),
            "balanced_accuracy": _balanced_accuracy(hit_attack, g.truth),
        }
        baseline[group] = {
            "accuracy": _accuracy(hit_imputation),
            "balanced_accuracy": _balanced_accuracy(hit_imputation, g.truth),
        }
        kept[group] = paired_advantage(hit_attack, hit_imputation, samples=samples, rng=rng)
        advantage[group] = kept[group].to_json()
        balanced[group] = paired_advantage(
            hit_attack, hit_imputation, samples=samples, rng=rng, truth=g.truth
        ).to_json()
        majority[group] = _accuracy(g.truth == majority_class)
    m, n = kept["members"], kept["non_members"]
    gap_draws = m.draws - n.draws
    gap_low, gap_high = _interval(gap_draws, CONFIDENCE)
    gap = Advantage(m.value - n.value, gap_low, gap_high, gap_draws)
    advantage["members_minus_non_members"] = gap.to_json()
    finding, verdict, reading = _conclude(attr, groups, metrics, baseline, m, n, gap)

    hospitals = []
    for position, h in enumerate(inputs.hospitals):
        row: dict[str, Any] = {"name": h.name}
        for group, g in groups.items():
            mine = g.owner == position
            adv = paired_advantage(
                g.attack[mine] == g.truth[mine],
                g.imputation[mine] == g.truth[mine],
                samples=samples,
                rng=rng,
            )
            row[group] = {"records": int(mine.sum()), **adv.to_json()}
        hospitals.append(row)

    details = {
        "primary": "accuracy",
        "advantage": advantage,
        "balanced_advantage": balanced,
        "finding": finding,
        "sensitive_feature": {
            "name": attr.name,
            "index": attr.index,
            "columns": list(attr.columns),
            "chosen_by": attr.chosen_by,
            "encoding": attr.encoding,
            "classes": list(attr.labels),
        },
        "majority_guess_accuracy": majority,
        "records": {
            "members": groups["members"].size,
            "non_members": groups["non_members"].size,
            "members_available": available["members"],
            "non_members_available": available["non_members"],
            "population": population,
        },
        "imputation": "logistic regression on the population records: every other column "
        "and the label -> the sensitive class",
        "attack": "argmax over values v of log p_model(label | record with v) + "
        "log p_imputation(v | every other column)",
        "hospitals": hospitals,
        "bootstrap_samples": samples,
        "confidence": CONFIDENCE,
    }
    attacker = (
        f"knows every column of a patient's record except '{attr.name}', and the patient's "
        "label, and holds the final model; the baseline has the same knowledge and the "
        "population records but no model"
    )
    return AuditResult(attacker, metrics, baseline, verdict, reading, details)


def _conclude(
    attr: SensitiveAttribute,
    groups: dict[str, _Guesses],
    metrics: dict[str, Any],
    baseline: dict[str, Any],
    members: Advantage,
    non_members: Advantage,
    gap: Advantage,
) -> tuple[str, str, str]:
    """(finding, verdict, reading): a leak needs the members' advantage to be above zero
    and above the non-members'; an advantage everyone shares is distributional."""
    what = f"'{attr.name}'" + (
        " (above or below the population median)" if attr.encoding == "median-split" else ""
    )
    if min(g.size for g in groups.values()) < MIN_RECORDS:
        return (
            "too-few-records",
            "inconclusive",
            f"Too few records to tell whether the model reveals {what}: at least "
            f"{MIN_RECORDS} trained and {MIN_RECORDS} untrained patients are needed.",
        )
    scene = (
        f"Hiding {what} and knowing the rest of the record and the label, an attacker with "
        f"the model guessed it right for {_pct(metrics['members']['accuracy'])} of trained "
        f"patients; guessing from the same knowledge without the model got "
        f"{_pct(baseline['members']['accuracy'])}. "
    )
    if members.low > 0 and gap.low > 0:
        return (
            "member-leak",
            "leak",
            scene + f"The model's advantage is {_ci(members)} for trained patients against "
            f"{_ci(non_members)} for patients it never saw: it reveals this column of the "
            "patients it was trained on.",
        )
    if members.low > 0 and non_members.low > 0:
        return (
            "distributional",
            "no-leak",
            scene + f"The model helps by {_ci(members)} for trained patients and "
            f"{_ci(non_members)} for patients it never saw alike: it reveals what holds for "
            "any patient (what it learned about the population), not the trained patients' "
            "records. Whether that inference is acceptable is a question about the model's "
            "use, not about its training data.",
        )
    if members.low > 0:
        return (
            "unresolved",
            "inconclusive",
            scene + f"The advantage for trained patients, {_ci(members)}, is above zero but "
            f"cannot be told apart from that for patients the model never saw "
            f"({_ci(non_members)}): more records (option attribute_records) would decide "
            "whether it is a leak of the trained patients or true of everyone.",
        )
    if members.high < 0:
        return (
            "none",
            "no-leak",
            scene + f"With the model the guess is worse, by {_ci(members)}: the model gives "
            "an attacker nothing about this column beyond what the rest of the record and the "
            "label already give away.",
        )
    return (
        "none",
        "no-leak",
        scene + f"The model's advantage, {_ci(members)}, cannot be told from zero: no sign "
        "that the model reveals this column of the patients it trained on.",
    )
