"""The audit's result: the verdict against the best baseline, its reading and details."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpriv.config import RunConfig
from fedpriv.privacy.audit.base import AuditResult
from fedpriv.privacy.audit.inversion.settings import BASELINES, InversionSettings


def build_result(
    *,
    rows: list[dict[str, Any]],
    shown: list[dict[str, Any]],
    failures: list[str],
    declined: list[str],
    noise: Mapping[str, float] | None,
    what: str,
    settings: InversionSettings,
    config: RunConfig,
    image: bool,
    data_range: float,
    bounds: tuple[float, float],
    messages: int,
    sampled: int,
    seconds: dict[str, float],
) -> AuditResult:
    parts = []
    if config.sample_level_dp:
        sigmas = sorted(set((noise or {}).values()))
        shown_sigma = ", ".join(f"{v:.3g}" for v in sigmas) or "?"
        parts.append(
            f"sample-level DP-SGD (noise multiplier {shown_sigma}, clip {config.max_grad_norm:g})"
        )
    if config.client_level_dp:
        parts.append(
            f"client-level DP (clip {config.client_clip_norm:g}, noise multiplier "
            f"{config.client_noise_multiplier:g})"
        )
    dp = " and ".join(parts) or "none"
    strategy = (
        "FedSGD (one gradient step)"
        if config.strategy == "fedsgd"
        else f"{config.strategy} ({config.local_epochs} local epoch(s), batch-size "
        f"{config.batch_size}, lr {config.lr:g})"
    )
    attacker = (
        "the server (honest but curious), in round 1: it knows the initial global model it sent "
        "(built from the seed), the run's settings and the labels of the attacked records, "
        f"and attacks {what or 'what it receives'}; {strategy}; DP: {dp}; aggregation: "
        f"{config.aggregation}. Inverting Gradients (Geiping et al. 2020): "
        f"{settings.loss} matching{', total-variation prior' if image else ''}, Adam on "
        f"signed gradients; per message {settings.restarts} random start(s), the best "
        f"matching one run for {settings.steps} steps"
    )
    n = len(rows)
    if image:
        keys = ("psnr", "ssim")
    else:
        keys = ("mse", "mae")
    details: dict[str, Any] = {
        "view": settings.view,
        "protocol": config.protocol,
        "aggregation": config.aggregation,
        "dp_level": config.dp_level if config.dp else "none",
        "strategy": config.strategy,
        "batch": settings.batch,
        "hospitals_per_message": sampled,
        "messages": messages,
        "steps": settings.steps,
        "restarts": settings.restarts,
        "loss": settings.loss,
        "tv": settings.tv if image else 0.0,
        "margin_db": settings.margin_db,
        "data_range": data_range,
        "value_range": list(bounds),
        "kind": "image" if image else "tabular",
        "failures": failures,
        "declined": declined,
        "dp": {
            "noise_multiplier": dict(noise) if noise else None,
            "max_grad_norm": config.max_grad_norm if config.sample_level_dp else None,
            "client_clip_norm": config.client_clip_norm if config.client_level_dp else None,
            "client_noise_multiplier": (
                config.client_noise_multiplier if config.client_level_dp else None
            ),
        },
        "seconds": seconds,
    }
    if n == 0:
        empty = {k: math.nan for k in keys}
        return AuditResult(
            attacker=attacker,
            metrics={**empty, **{f"{k}_per_record": [] for k in keys}, "records": 0},
            baseline={**empty, **{f"{k}_per_record": [] for k in keys}, "kind": "mean"},
            verdict="inconclusive",
            reading=(
                "The server obtained nothing to attack in the replayed round ("
                + "; ".join(sorted(set(failures)))
                + "): no reconstruction was possible, which says nothing about a round in "
                "which it does."
            ),
            details={**details, "records_attacked": [], "images": []},
        )

    def per(kind: str, key: str) -> np.ndarray:
        return np.asarray([r[kind][key] for r in rows], dtype=np.float64)

    if image:
        better = max(BASELINES, key=lambda k: float(np.mean(per(k, "psnr"))))
        gain = per("attack", "psnr") - per(better, "psnr")
        leaked = gain > settings.margin_db
        mean_gain = float(np.mean(per("attack", "psnr")) - np.mean(per(better, "psnr")))
    else:
        better = min(BASELINES, key=lambda k: float(np.mean(per(k, "mse"))))
        ratio = per(better, "mse") / np.maximum(per("attack", "mse"), 1e-300)
        gain = 10 * np.log10(ratio)
        leaked = gain > settings.margin_db
        mean_gain = float(
            10 * np.log10(np.mean(per(better, "mse")) / max(np.mean(per("attack", "mse")), 1e-300))
        )
    k = int(leaked.sum())
    if k * 2 > n and mean_gain > settings.margin_db:
        verdict = "leak"
    elif k > 0:
        verdict = "inconclusive"
    else:
        verdict = "no-leak"

    def block(kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in keys:
            values = per(kind, key)
            out[key] = float(np.mean(values))
            out[f"{key}_per_record"] = values.tolist()
        if not image:
            errors = np.stack([r[kind]["abs_error"] for r in rows])
            out["mae_per_feature"] = errors.mean(axis=0).tolist()
        return out

    metrics = {**block("attack"), "records": n, "leaked_records": k}
    baseline = {**block(better), "kind": better}
    details["baselines"] = {kind: block(kind) for kind in BASELINES}
    details["records_attacked"] = [
        {
            "index": r["index"],
            "hospital": r["hospital"],
            "label": r["label"],
            "message": r["message"],
            "match_loss": r["match_loss"],
            **{key: r["attack"][key] for key in keys},
            "baseline": {key: r[better][key] for key in keys},
            "gain_db": float(g),
            "leaked": bool(flag),
        }
        for r, g, flag in zip(rows, gain, leaked, strict=True)
    ]
    details["images"] = shown
    if image:
        figures = (
            f"PSNR {metrics['psnr']:.1f} dB (SSIM {metrics['ssim']:.3f}) against "
            f"{baseline['psnr']:.1f} dB (SSIM {baseline['ssim']:.3f})"
        )
    else:
        figures = (
            f"mean squared error {metrics['mse']:.3g} (standardised features) against "
            f"{baseline['mse']:.3g}"
        )
    guess = {
        "mean": "the population's mean record",
        "class-mean": "the population's mean record of the class",
        "random": "a random record of the class",
    }
    source = what or "the message"
    records_word = "one record" if settings.batch == 1 else f"{settings.batch} records"
    if verdict == "leak":
        reading = (
            f"From {source} ({records_word} per hospital), the server rebuilds the records: "
            f"{figures} for the best guess from public data ({guess[better]}); {k} of {n} "
            "records come out closer than that guess by more than "
            f"{settings.margin_db:g} dB. This round's message reveals what the records look like."
        )
    elif verdict == "inconclusive":
        reading = (
            f"From {source} ({records_word} per hospital), {k} of {n} records are rebuilt "
            f"better than the best guess from public data ({guess[better]}) by more than "
            f"{settings.margin_db:g} dB, the others not ({figures}): some records leak."
        )
    else:
        reading = (
            f"From {source} ({records_word} per hospital), the reconstructions are no closer "
            f"to the records than the best guess from public data ({guess[better]}): "
            f"{figures}. This attack, with this budget, learns nothing of the records; "
            "a stronger attack might."
        )
    if failures:
        reading += f" ({len(failures)} replayed round(s) gave the server nothing to attack.)"
    if declined:
        reading += (
            f" ({len(declined)} hospital update(s) were declined in the replayed rounds and are "
            "not in what the server got: " + "; ".join(sorted(set(declined)))[:300] + ")"
        )
    return AuditResult(
        attacker=attacker,
        metrics=metrics,
        baseline=baseline,
        verdict=verdict,
        reading=reading,
        details=details,
    )
