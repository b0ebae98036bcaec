"""The audit "inversion": replays the round, attacks each message, and scores every
attacked record against the no-information baselines."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.errors import ConfigError
from fedpriv.privacy.audit.base import Audit, AuditInputs, AuditResult, register_audit
from fedpriv.privacy.audit.inversion.metrics import psnr, ssim
from fedpriv.privacy.audit.inversion.reconstruction import match_records, reconstruct
from fedpriv.privacy.audit.inversion.replay import (
    noise_multiplier,
    replay_round,
    run_config,
    sampled_hospitals,
)
from fedpriv.privacy.audit.inversion.settings import SHOWN, InversionSettings
from fedpriv.privacy.audit.inversion.verdict import build_result


@register_audit("inversion")
class InversionAudit(Audit):
    """Optimisation-based reconstruction of a hospital's records from its round-1 message
    (or the aggregate the server gets instead)."""

    needs = frozenset({"records", "round-messages"})

    def unmet(self, inputs: AuditInputs) -> str | None:
        if inputs.dataset is None or not inputs.hospitals:
            return (
                "gradient inversion replays the hospitals' round on their records: only a "
                "simulation has them centrally"
            )
        if "model" not in inputs.config:
            return "config.json names no model"
        return None

    def run(self, inputs: AuditInputs) -> AuditResult:
        started = time.perf_counter()
        settings = InversionSettings.from_options(inputs.options)
        config, model_name, model_args = run_config(inputs.config)
        dataset = inputs.dataset
        image = dataset.features.ndim == 4
        features = np.asarray(dataset.features)
        lo, hi = float(features.min()), float(features.max())
        data_range = hi - lo if hi > lo else 1.0
        feature_shape = tuple(features.shape[1:])
        hospitals = list(inputs.hospitals)
        if settings.hospital and settings.hospital not in {h.name for h in hospitals}:
            raise ConfigError(
                f"inversion_hospital {settings.hospital!r} is not one of the run's "
                f"hospitals ({', '.join(h.name for h in hospitals)})"
            )
        protocol = config.protocol
        individual = settings.view == "server" and protocol in ("plain", "client-dp")
        sampled = 1 if individual else sampled_hospitals(config, len(hospitals))
        per_message = settings.batch * sampled
        messages = max(1, math.ceil(settings.records / per_message))
        population = _population(inputs)
        noise = (
            {
                h.name: noise_multiplier(config, inputs.privacy, h.name, int(np.size(h.train)))
                for h in hospitals
            }
            if config.sample_level_dp
            else None
        )
        rng = np.random.default_rng([int(inputs.seed) % 2**32, 12])
        order = {h.name: rng.permutation(np.asarray(h.train, dtype=np.int64)) for h in hospitals}
        used = dict.fromkeys(order, 0)
        from fedpriv.models import initial_state

        initial = initial_state(model_name, config.seed, **model_args)
        # one tick per probed start and one for the full run of the best (or the only) one
        ticks_per_message = settings.restarts + 1 if settings.restarts > 1 else 1
        total_ticks = messages * ticks_per_message
        ticks = 0
        inputs.tick("inversion", 0, total_ticks)
        rows: list[dict[str, Any]] = []
        shown: list[dict[str, Any]] = []
        failures: list[str] = []
        declined: list[str] = []
        what = ""
        round_seconds: list[float] = []
        attack_seconds = 0.0
        replay_seconds = 0.0
        with tempfile.TemporaryDirectory(prefix="fedpriv-inversion-") as tmp:
            for m in range(messages):
                first = (
                    next(i for i, h in enumerate(hospitals) if h.name == settings.hospital)
                    if settings.hospital
                    else m % len(hospitals)
                )
                chosen = []
                for k in range(sampled):
                    h = hospitals[(first + k) % len(hospitals)]
                    pool = order[h.name]
                    take = min(settings.batch, pool.size)
                    start = used[h.name] if used[h.name] + take <= pool.size else 0
                    used[h.name] = start + take
                    chosen.append((h.name, hospitals.index(h), pool[start : start + take]))
                t0 = time.perf_counter()
                seed = int(inputs.seed) * 1_000_003 + m
                observed = replay_round(
                    config,
                    model_name,
                    model_args,
                    dataset,
                    chosen,
                    view=settings.view,
                    privacy=inputs.privacy,
                    seed=seed,
                    workdir=Path(tmp) / f"m{m}",
                    noise=noise,
                )
                replay_seconds += time.perf_counter() - t0
                if isinstance(observed, str):
                    failures.append(observed)
                    ticks += ticks_per_message
                    inputs.tick("inversion", ticks, total_ticks)
                    continue
                what = observed.what
                declined.extend(observed.declined)
                round_seconds.append(observed.round_seconds)
                truth_index = np.concatenate([p.records for p in observed.participants])
                labels = dataset.labels[truth_index]

                def advance() -> None:
                    nonlocal ticks
                    ticks += 1
                    inputs.tick("inversion", ticks, total_ticks)

                t0 = time.perf_counter()
                guesses, loss = reconstruct(
                    model_name,
                    model_args,
                    initial,
                    observed,
                    labels,
                    feature_shape,
                    config=config,
                    settings=settings,
                    bounds=(lo, hi) if image else None,
                    image=image,
                    seed=seed,
                    tick=advance,
                )
                attack_seconds += time.perf_counter() - t0
                truth = features[truth_index]
                assigned = match_records(truth, labels, guesses, labels)
                owners = [p.name for p in observed.participants for _ in range(p.records.size)]
                for i, record in enumerate(truth_index):
                    guess = guesses[assigned[i]]
                    guesses_from_public = _baselines(dataset, population, int(record), rng)
                    row = _scores(
                        features[record],
                        {"attack": guess, **guesses_from_public},
                        image,
                        data_range,
                    )
                    row.update(
                        {
                            "index": int(record),
                            "hospital": owners[i],
                            "label": int(dataset.labels[record]),
                            "message": m,
                            "match_loss": loss,
                        }
                    )
                    rows.append(row)
                    if image and len(shown) < SHOWN:
                        shown.append(
                            {
                                "index": int(record),
                                "label": int(dataset.labels[record]),
                                "original": _rounded(features[record]),
                                "reconstruction": _rounded(guess),
                                **{k: _rounded(v) for k, v in guesses_from_public.items()},
                            }
                        )
        return build_result(
            rows=rows,
            shown=shown,
            failures=failures,
            declined=declined,
            noise=noise,
            what=what,
            settings=settings,
            config=config,
            image=image,
            data_range=data_range,
            bounds=(lo, hi),
            messages=messages,
            sampled=sampled,
            seconds={
                "replay": replay_seconds,
                "attack": attack_seconds,
                "round": float(np.mean(round_seconds)) if round_seconds else math.nan,
                "total": time.perf_counter() - started,
            },
        )


def _population(inputs: AuditInputs) -> np.ndarray:
    """Records the attacker may know without any hospital: the run's central test split;
    without one, every record no hospital trains on."""
    population = np.asarray(inputs.population, dtype=np.int64)
    if population.size:
        return population
    trained = np.concatenate([np.asarray(h.train, dtype=np.int64) for h in inputs.hospitals])
    return np.setdiff1d(np.arange(len(inputs.dataset)), trained)


def _baselines(
    dataset: Any, population: np.ndarray, record: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Guesses from public records alone (never the attacked one): the population's mean
    record, the mean of its records of the attacked record's class (the attacker knows the
    label), and one random record of that class (any class if the population has none)."""
    features = dataset.features
    pool = population[population != record]
    if pool.size == 0:
        pool = np.setdiff1d(np.arange(len(dataset)), [record])
    same = pool[dataset.labels[pool] == dataset.labels[record]]
    pick = same if same.size else pool
    return {
        "mean": features[pool].mean(axis=0),
        "class-mean": features[pick].mean(axis=0),
        "random": features[int(rng.choice(pick))],
    }


def _scores(
    truth: np.ndarray,
    estimates: Mapping[str, np.ndarray],
    image: bool,
    data_range: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, estimate in estimates.items():
        error = np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)
        if image:
            out[key] = {
                "psnr": psnr(truth, estimate, data_range=data_range),
                "ssim": ssim(truth, estimate, data_range=data_range),
            }
        else:
            out[key] = {
                "mse": float(np.mean(error**2)),
                "mae": float(np.mean(np.abs(error))),
                "abs_error": np.abs(error).reshape(-1),
            }
    return out


def _rounded(values: np.ndarray) -> list[Any]:
    return np.round(np.asarray(values, dtype=np.float64), 4).tolist()
