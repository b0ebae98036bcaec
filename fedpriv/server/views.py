"""What the server writes beside the model: its view of the hospitals' privacy spend
(``privacy.json``) and, under CKKS, the encryption's costs (``he.json``)."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fedpriv.config import RunConfig
from fedpriv.privacy.accounting import DpEvent, compose_epsilon, statistics_event
from fedpriv.privacy.he import Layout
from fedpriv.protocols.base import ServerSide
from fedpriv.protocols.ckks import CIPHERTEXT, CkksServer
from fedpriv.server.loop import RoundOutcome
from fedpriv.server.rundir import RunDirectory

__all__ = ["HeLog", "PrivacyView"]

logger = logging.getLogger(__name__)


class PrivacyView:
    """What the server knows of privacy: each hospital's latest report, who trained without
    reporting any accounting, and its own client-level accountant. Written to
    ``privacy.json`` after every round."""

    def __init__(self, run_dir: RunDirectory, config: RunConfig, aggregator: ServerSide) -> None:
        self.run_dir = run_dir
        self.config = config
        self.aggregator = aggregator
        self.hospitals: dict[str, dict[str, Any]] = {}
        #: hospitals that trained under sample-level DP without a privacy report: round
        self.unaccounted: dict[str, int] = {}
        self.client_rounds = 0

    def load(self) -> None:
        """On resume: start from what the run recorded so far."""
        saved = self.run_dir.read_privacy()
        self.hospitals = dict(saved.get("hospitals", {}))
        self.unaccounted = {str(k): int(v) for k, v in saved.get("unaccounted", {}).items()}
        self.client_rounds = int(saved.get("client_level", {}).get("rounds", 0))

    def update(
        self,
        reports: dict[str, dict[str, Any]],
        *,
        rounds_done: int | None,
        trained: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.hospitals.update(reports)
        if self.config.sample_level_dp:
            for name in sorted(trained):
                report = reports.get(name)
                if report is None or report.get("status") != "trained":
                    # it sent an update but no account of its DP: no epsilon can be claimed
                    self.unaccounted.setdefault(name, rounds_done or 0)
                    logger.warning(
                        "round %s: %s trained without reporting DP accounting: the run makes "
                        "no DP claim for it",
                        rounds_done,
                        name,
                    )
        if rounds_done is not None and self.config.client_level_dp:
            self.client_rounds += 1
        self.run_dir.write_privacy(self.document())

    def all_exact(self) -> bool:
        return all(
            bool(self.hospitals[name].get("epsilon_exact", True)) for name in self.epsilons()
        )

    def epsilons(self) -> dict[str, float]:
        return {
            name: float(r["epsilon"])
            for name, r in sorted(self.hospitals.items())
            if name not in self.unaccounted and "epsilon" in r
        }

    def client_level(self) -> dict[str, Any]:
        config = self.config
        sample_rate = min(
            1.0, max(1, round(config.hospitals * config.fraction_train)) / config.hospitals
        )
        noise = config.client_noise_multiplier
        step = float(self.aggregator.stats.get("quantisation_step", 0.0))
        size = int(self.aggregator.stats.get("parameters", 0))
        if step and noise:
            # secure aggregation rounds each value: the sensitivity grows by sqrt(d) * step
            clip = config.client_clip_norm
            noise = noise * clip / (clip + math.sqrt(size) * step)
        event = DpEvent(noise, sample_rate, self.client_rounds)
        epsilon = (
            compose_epsilon([event], delta=config.delta, accountant=config.accountant)
            if noise > 0
            else float("inf")
        )
        return {
            "epsilon": epsilon,
            "delta": config.delta,
            "accountant": config.accountant,
            "noise_multiplier": noise,
            "where": "hospitals (distributed, secure aggregation)"
            if config.aggregation == "secagg"
            else "server (trusted)",
            "clip_norm": getattr(self.aggregator, "clip_norm", config.client_clip_norm),
            "adaptive_clip": config.client_adaptive_clip,
            "sample_rate": sample_rate,
            "rounds": self.client_rounds,
            "events": [
                {
                    "noise_multiplier": event.noise_multiplier,
                    "sample_rate": sample_rate,
                    "steps": self.client_rounds,
                }
            ],
            "unit": "one hospital (all its records)",
        }

    def document(self) -> dict[str, Any]:
        config = self.config
        claim = config.sample_level_dp and not self.unaccounted
        doc: dict[str, Any] = {
            "dp": config.dp and not self.unaccounted,
            "dp_level": config.dp_level if config.dp else "none",
            "dp_claim": claim,
            "unit": "one patient (all of their records) of one hospital",
            "hospitals": dict(sorted(self.hospitals.items())),
        }
        if self.unaccounted:
            doc["unaccounted"] = dict(sorted(self.unaccounted.items()))
            doc["no_claim_reason"] = (
                "hospitals trained without reporting DP accounting: "
                + ", ".join(sorted(self.unaccounted))
            )
        epsilons = self.epsilons()
        if claim and epsilons:
            # disjoint hospitals: the federation's per-patient guarantee is the maximum
            doc["max_epsilon"] = max(epsilons.values())
            doc["max_epsilon_exact"] = self.all_exact()
            doc["delta"] = max(
                float(self.hospitals[name].get("delta", config.delta)) for name in epsilons
            )
        if config.client_level_dp:
            doc["client_level"] = self.client_level()
        event = statistics_event(config)
        if event is not None:
            # normalisation federated: one Gaussian release per hospital before round 1, in
            # each hospital's ledger (its events above include it) and its epsilon
            doc["statistics_release"] = {
                "epsilon_alone": config.stats_epsilon,
                "delta": config.delta,
                "event": {
                    "noise_multiplier": event.noise_multiplier,
                    "sample_rate": event.sample_rate,
                    "steps": event.steps,
                },
                "composed_with_training": True,
            }
        if config.distributed_noise:
            doc["distributed_noise"] = self.distributed_noise()
        return doc

    def distributed_noise(self) -> dict[str, Any]:
        """Under distributed noise the epsilons above are conditional: on what, and the
        worst epsilon a patient keeps if the assumption fails (its hospital's own share)."""
        splits = {
            name: r["distributed_noise"]
            for name, r in sorted(self.hospitals.items())
            if isinstance(r.get("distributed_noise"), dict)
        }
        out: dict[str, Any] = {
            "conditional": True,
            "where": "hospitals add shares; the secure sum holds the full noise",
        }
        if splits:
            first = next(iter(splits.values()))
            out.update(
                {
                    "assumption": first.get("assumption", ""),
                    "colluders": first.get("colluders"),
                    "threshold": first.get("threshold"),
                    "honest_shares": first.get("honest_shares"),
                    "max_fallback_planned_epsilon": max(
                        float(s.get("fallback_planned_epsilon", math.inf)) for s in splits.values()
                    ),
                }
            )
            lifetime = [
                s for s in splits.values() if isinstance(s.get("fallback_epsilon"), int | float)
            ]
            if lifetime:
                # per patient and for life (every recorded run), as the ledgers compute it
                out["max_fallback_epsilon"] = max(float(s["fallback_epsilon"]) for s in lifetime)
                out["max_fallback_epsilon_exact"] = all(
                    bool(s.get("fallback_epsilon_exact")) for s in lifetime
                )
        return out


class HeLog:
    """``he.json``: per round, bytes up and down, bytes per parameter, time spent in HE."""

    def __init__(self, run_dir: RunDirectory, aggregator: ServerSide, layout: Layout) -> None:
        self.run_dir = run_dir
        self.aggregator = aggregator
        self.layout = layout
        self.rounds: list[dict[str, Any]] = []
        self.last_aggregate = 0  # what this round's trainers downloaded
        path = run_dir.file("he.json")
        if path.is_file():  # resuming: keep the rounds already recorded
            self.rounds = list(json.loads(path.read_text()).get("rounds", []))

    def record(self, result: RoundOutcome) -> None:
        aggregator = self.aggregator
        assert isinstance(aggregator, CkksServer)
        trained = [h for h in result.hospitals.values() if "train_examples" in h]
        uploads = aggregator.bytes_in
        aggregate = len(result.arrays[CIPHERTEXT].data) if CIPHERTEXT in result.arrays else 0
        evaluated = sum(1 for h in result.hospitals.values() if "num_examples" in h)
        encrypt = [float(h.get("he_encrypt_seconds", 0.0)) for h in trained]
        # a hospital decrypts each aggregate once, when it evaluates it (its evaluation
        # figure replaces its training reply's, which found the model already decrypted)
        decrypt = [
            float(h["he_decrypt_seconds"])
            for h in result.hospitals.values()
            if "he_decrypt_seconds" in h
        ]
        entry = {
            "round": result.round,
            "key_fingerprint": str(aggregator.context.fingerprint),
            "aggregate_failure": result.aggregate_failure,
            "parameters": self.layout.size,
            "hospitals": len(trained),
            "bytes_up": uploads,
            "bytes_up_per_param": uploads / max(1, len(trained)) / self.layout.size,
            "plaintext_bytes_per_param": 4,
            # down: last round's aggregate to this round's trainers, this one's to evaluators
            "bytes_down": self.last_aggregate * len(trained) + aggregate * evaluated,
            "server_aggregate_seconds": aggregator.seconds,
            "client_encrypt_seconds_mean": sum(encrypt) / len(encrypt) if encrypt else 0.0,
            "client_decrypt_seconds_mean": sum(decrypt) / len(decrypt) if decrypt else 0.0,
            "rejected": [{"hospital": h, "reason": r} for h, r in aggregator.rejected],
        }
        self.rounds.append(entry)
        self.last_aggregate = aggregate
        self.run_dir.write_json("he.json", {"rounds": self.rounds})
