"""The replayed round: round 1 of the run, re-created as the hospitals really send it,
and what the attacker sees of it."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.privacy.audit.inversion.settings import VIEWS


@dataclasses.dataclass(frozen=True, eq=False)
class Participant:
    """One hospital whose records make up the observed message."""

    name: str
    #: its place in partitions.json (the simulation's partition id)
    index: int
    #: dataset indices of the records its round was restricted to
    records: np.ndarray
    #: its weight in the aggregate the attacker matches (1 for an individual update)
    weight: float
    #: positions (into ``records``) of each local step's batch, as the attacker models them
    schedule: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Observation:
    """What the attacker holds after one replayed round: ``target`` is the change of every
    trainable parameter it sees (new minus the global model it sent; for a FedSGD gradient
    ``-gradient``), ``participants`` whose records it is made of."""

    target: dict[str, np.ndarray]
    participants: tuple[Participant, ...]
    individual: bool
    gradient: bool
    what: str
    #: seconds of the attacked hospital's replayed training round
    round_seconds: float
    declined: tuple[str, ...] = ()


def run_config(config: Mapping[str, Any]) -> tuple[RunConfig, str, dict[str, Any]]:
    """The run's settings, model name and arguments from ``config.json``'s content."""
    known = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    try:
        parsed = RunConfig.from_mapping(
            {k: v for k, v in config.items() if k in known and k != "model"}
        )
        return parsed, str(config["model"]), dict(config.get("model-args", {}))
    except KeyError:
        raise ConfigError("config.json names no model: is this a fedpriv run directory?") from None


def noise_multiplier(
    config: RunConfig, privacy: Mapping[str, Any], hospital: str, records: int
) -> float:
    """The noise multiplier the hospital's DP-SGD used: ``privacy.json``'s, else the fixed
    ``noise-multiplier``, else calibrated as the hospital calibrates it for its ``records``
    training records (patients)."""
    report = (privacy.get("hospitals") or {}).get(hospital) or {}
    if float(report.get("noise_multiplier") or 0) > 0:
        return float(report["noise_multiplier"])
    if config.noise_multiplier > 0:
        return config.noise_multiplier
    from fedpriv.privacy.dp import plan_for_run

    return plan_for_run(
        config, max(1, records), one_step_per_round=config.strategy == "fedsgd"
    ).noise_multiplier


def sampled_hospitals(config: RunConfig, hospitals: int) -> int:
    """How many hospitals a round samples (Flower's rule: the fraction, at least the minimum)."""
    return max(1, min(hospitals, max(int(hospitals * config.fraction_train), config.min_hospitals)))


def replay_round(
    config: RunConfig,
    model_name: str,
    model_args: Mapping[str, Any],
    dataset: Any,
    chosen: Sequence[tuple[str, int, np.ndarray]],
    *,
    view: str = "server",
    privacy: Mapping[str, Any] | None = None,
    seed: int = 0,
    workdir: Path | None = None,
    noise: Mapping[str, float] | None = None,
) -> Observation | str:
    """Round 1 of the run with hospitals ``chosen`` = ``[(name, partition id, dataset
    indices)]`` (the first is the attacked one) restricted to those records; returns what
    the attacker sees, or why it sees nothing (every update declined, no aggregate).

    Each hospital runs its real training round and protocol encoding; the server side is the
    run's protocol (:meth:`LocalFederation.collect`). Only the attacked hospital takes part
    when the view is one hospital's update. ``noise``: hospital name -> DP-SGD noise
    multiplier (default: :func:`noise_multiplier`). Deterministic given ``seed`` (DP noise
    and sampling through the run's insecure-dp-seed mechanism, client-level noise seeded),
    up to CKKS's own encryption error.
    """
    from flwr.app import Array, ArrayRecord

    from fedpriv import messages as msg
    from fedpriv.client.hospital import HospitalData, PrivacyState, train_round
    from fedpriv.models import build, initial_state
    from fedpriv.protocols.local import LocalFederation

    if view not in VIEWS:
        raise ConfigError(f"inversion_view must be one of {VIEWS} (got {view!r})")
    protocol = config.protocol
    individual = view == "server" and protocol in ("plain", "client-dp")
    if individual:
        chosen = chosen[:1]
    if protocol == "secagg" and len(chosen) < 2:
        raise ConfigError("secure aggregation needs at least 2 hospitals in the round")
    gradient = config.strategy == "fedsgd"
    privacy = privacy or {}
    with tempfile.TemporaryDirectory(prefix="fedpriv-inversion-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        replay = config.replace(
            rounds=1,
            min_patients=1,
            accountant="rdp",  # accounting plays no part in the message; RDP is fast
            budget_epsilon=1e9,
            insecure_dp_seed=int(seed) % 2**31,
            out=str(work),
            run_name="inversion",
            ledger_dir=str(work / "ledgers"),
            secagg_threshold=min(config.secagg_threshold, len(chosen)),
            hospitals=max(len(chosen), 1),
            device="cpu",
        )
        if protocol == "ckks":
            from fedpriv.privacy.he import write_keys

            keys = work / "keys"
            if not (keys / "public.ctx").exists():
                write_keys(keys)
            replay = replay.replace(keys=str(keys))
        initial = initial_state(model_name, config.seed, **dict(model_args))
        names = [n for n, _ in build(model_name, **dict(model_args)).named_parameters()]
        nodes = [index + 1 for _, index, _ in chosen]
        counts = {node: int(np.size(rec)) for node, (_, _, rec) in zip(nodes, chosen, strict=True)}
        federation = LocalFederation(replay, nodes, initial, counts=counts)
        _seed_protocol(federation, seed)
        federation.server.expect(nodes)
        extra = federation.server.round_extra(nodes)
        mode = msg.MODE_GRADIENT if gradient else msg.MODE_WEIGHTS
        sent = (
            ArrayRecord()
            if federation.server.encrypted
            else ArrayRecord({k: Array(np.asarray(v)) for k, v in initial.items()})
        )
        records: dict[int, Any] = {}
        declined: list[str] = []
        participants: list[Participant] = []
        round_seconds = 0.0
        for position, (node, (name, index, rows)) in enumerate(zip(nodes, chosen, strict=True)):
            rows = np.asarray(rows, dtype=np.int64)
            settings = replay
            if replay.sample_level_dp:
                sigma = (noise or {}).get(name)
                if sigma is None:
                    sigma = noise_multiplier(config, privacy, name, rows.size)
                settings = replay.replace(noise_multiplier=float(sigma))
            order = msg.TrainingOrder(
                config=settings,
                server_round=1,
                model_name=model_name,
                model_args=dict(model_args),
                mode=mode,
                extra=dict(extra),
                node=node,
            )
            data = HospitalData(
                name=name,
                index=index,
                train_features=dataset.features[rows],
                train_labels=dataset.labels[rows],
                held_out_features=dataset.features[:0],
                held_out_labels=dataset.labels[:0],
                source=str(dataset.name),
                train_records=dataset.source.take(rows),
            )
            state = PrivacyState(
                ledger_path=work / "ledgers" / f"{name}-{seed}.sqlite",
                budget_epsilon=1e9,
                delta=settings.delta,
            )
            started = time.perf_counter()
            result = train_round(
                order,
                data,
                sent,
                privacy=state,
                side=federation.sides[node],
                state=federation.states[node],
            )
            if position == 0:
                round_seconds = time.perf_counter() - started
            if result.arrays is None:
                declined.append(result.declined or f"{name} declined")
                continue
            records[node] = result.arrays
            participants.append(
                Participant(
                    name=name,
                    index=index,
                    records=rows,
                    weight=float(rows.size),
                    schedule=_schedule(settings, order, data, gradient),
                )
            )
        if not records or (individual and nodes[0] not in records):
            return "; ".join(declined) or "no hospital sent an update"
        aggregate = federation.collect(1, records, gradient=gradient)
        if individual:
            # the attacked hospital's message as the server received it
            received = federation.received[list(records).index(nodes[0]) - len(records)]
            values = {k: received[k].numpy().astype(np.float64) for k in names}
            target = (
                {k: -values[k] for k in names}
                if gradient
                else {k: values[k] - initial[k].astype(np.float64) for k in names}
            )
            who = tuple(participants[:1])
            who = (dataclasses.replace(who[0], weight=1.0),)
            what = f"the hospital's own {'gradient' if gradient else 'updated weights'} " + (
                "in plaintext (client-level DP is added by the trusted server after it has seen it)"
                if protocol == "client-dp"
                else "in plaintext"
            )
        else:
            if aggregate is None:
                reasons = [r for _, r in federation.server.rejected]
                failure = federation.server.failure or "; ".join(reasons + declined)
                return f"the server obtained no aggregate ({failure or 'no usable update'})"
            if federation.server.encrypted:
                side = federation.sides[nodes[0]]
                order = msg.TrainingOrder(
                    config=replay,
                    server_round=2,
                    model_name=model_name,
                    model_args=dict(model_args),
                    mode=mode,
                )
                new = side.read(order, aggregate).weights
            else:
                new = {k: v.numpy() for k, v in aggregate.items()}
            target = {
                k: np.asarray(new[k], np.float64) - initial[k].astype(np.float64) for k in names
            }
            total = sum(p.weight for p in participants)
            uniform = protocol == "client-dp" or (protocol == "secagg" and replay.client_level_dp)
            who = tuple(
                dataclasses.replace(
                    p, weight=1.0 / len(participants) if uniform else p.weight / total
                )
                for p in participants
            )
            kind = {
                "secagg": "the unmasked sum of secure aggregation",
                "ckks": "the CKKS aggregate as the hospitals decrypt it (the server itself "
                "holds only ciphertexts)",
                "client-dp": "the new global model after the trusted server's client-level "
                "clipping and noise",
                "plain": "the new global model (the example-weighted mean)",
            }[protocol]
            what = f"{kind} of {len(records)} hospitals' round-1 updates"
        return Observation(
            target=target,
            participants=who,
            individual=individual,
            gradient=gradient,
            what=what,
            round_seconds=round_seconds,
            declined=tuple(declined),
        )


def _seed_protocol(federation: Any, seed: int) -> None:
    """Seed the noise the protocol draws from the OS (client-level DP's, at the server or
    the hospitals): the audit is a replay and must be reproducible; the masks and CKKS keys
    stay random (they cancel or decrypt exactly, up to CKKS's error)."""
    rng = np.random.default_rng([int(seed) % 2**32, 1])
    if hasattr(federation.server, "_rng"):
        federation.server._rng = np.random.default_rng(rng.integers(2**63))
    for side in federation.sides.values():
        if hasattr(side, "_rng"):
            side._rng = np.random.default_rng(rng.integers(2**63))


def _schedule(config: RunConfig, order: Any, data: Any, gradient: bool) -> tuple[np.ndarray, ...]:
    """Each local step's batch, as positions into the hospital's records, as the attacker
    models it: FedSGD one step over all; FedAvg without DP the run's own shuffled minibatches
    (their order follows from the run's seed, which the server knows); under DP-SGD
    (Poisson sampling from the OS, unknown) every record in each of the planned steps."""
    from fedpriv.client.hospital import _seed
    from fedpriv.training import make_loader

    n = int(data.train_labels.size)
    everyone = np.arange(n)
    if gradient:
        return (everyone,)
    if config.sample_level_dp:
        steps = config.local_epochs * math.ceil(n / config.batch_size)
        return tuple(everyone for _ in range(steps))
    loader = make_loader(
        everyone.astype(np.int64),
        everyone.astype(np.int64),
        batch_size=config.batch_size,
        shuffle=True,
        seed=_seed(order, data),
    )
    return tuple(batch.numpy().copy() for _ in range(config.local_epochs) for batch, _ in loader)
