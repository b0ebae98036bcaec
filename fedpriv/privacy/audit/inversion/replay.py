"""Gradient inversion: can the server rebuild a hospital's records from what it receives?

The audit re-creates, in simulation, the message of round 1 exactly as the run's hospitals
send it: their real training round (:func:`fedpriv.client.hospital.train_round`: Opacus
DP-SGD under sample-level DP, the clipping and noise of the run, the protocol's encoding)
from the initial global model (a function of the seed, so the server knows it), through the
run's aggregation protocol in one process (:class:`~fedpriv.protocols.local.LocalFederation`:
the client-level DP of a trusted server, secure aggregation's masking and unmasking, CKKS
encryption). The attacked message is made from ``batch`` records of a hospital's training
split only (the round restricted to them: same sampling rule, same clipping, the run's noise
multiplier from ``privacy.json``), so it is known which records it reveals.

The attacker is the server (honest but curious), in the style of Inverting Gradients
(Geiping et al. 2020): it knows the global model it sent, the run's settings, and the labels
of the records; it optimises dummy records (Adam on signed gradients, bounded steps and
restarts, a total-variation prior for images, the data's value range as a box) until the
update they would produce matches the observed one in cosine similarity (or L2). Under
FedAvg the hospital's local SGD steps are unrolled differentiably
(:func:`torch.func.functional_call`) and the parameter difference is matched; without DP the
minibatch order follows from the run's seed, which the server knows; under DP-SGD (Poisson
sampling from the OS) the attacker puts every record in every step (exact when the batch is
no larger than ``batch-size``: the sample rate is then 1). What it attacks is what it sees:

- plaintext (and client-level DP by a trusted server, which receives the raw updates): the
  hospital's own update;
- secure aggregation: only the unmasked sum of the round's hospitals (each restricted to
  ``batch`` records), never one update: the attacker reconstructs all their records at once;
- CKKS: the server holds ciphertexts only; the audit attacks the round's aggregate as the
  hospitals decrypt it (what the server gets if it ever sees the model).

``inversion_view=model`` attacks instead the round's new global model as the hospitals read
it (after client-level DP's noise): what another hospital, or anyone given the model, sees.

Reconstructions are matched to the true records by the Hungarian method (same label only).
Per record: PSNR and SSIM for images (data range: the dataset's max - min), MSE and mean
absolute error per feature for tables, beside no-information baselines from the population
records (the run's test split, which no hospital trains on): their mean, their mean over the
record's class (the attacker knows the label), and a random one of the class; the baseline
is the one that does best on average. A record *leaks* when its reconstruction beats that
baseline by ``margin_db`` (3 dB: half the squared error). Verdict: ``leak`` when most
attacked records leak and the mean beats the baseline's mean by the margin,
``inconclusive`` when some do (or nothing reached the server), ``no-leak`` when none does.
A ``no-leak`` holds for this attack and budget only.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from fedpriv.config import RunConfig
from fedpriv.errors import ConfigError
from fedpriv.privacy.audit.base import Audit, AuditInputs, AuditResult, register_audit

__all__ = [
    "VIEWS",
    "InversionAudit",
    "InversionSettings",
    "Observation",
    "Participant",
    "Simulator",
    "figure",
    "psnr",
    "reconstruct",
    "replay_round",
    "ssim",
]

#: whose view is attacked: what the server can read, or the round's new global model
VIEWS = ("server", "model")
LOSSES = ("cosine", "l2")
#: image arrays kept in audit.json for the report
SHOWN = 8
#: the no-information guesses (see :func:`_baselines`); the best on average is the baseline
BASELINES = ("mean", "class-mean", "random")


# ---- settings -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InversionSettings:
    """The attack's budget and knobs; audit options ``inversion_<field>``.

    ``batch``: records per attacked message (default 1: the most a single record's message
    reveals). ``records``: records attacked in all (messages: ``records / batch``, per
    hospital in the aggregate). ``restarts`` random starts per message are each run for
    ``steps / 4`` optimiser steps; the one whose update matches best (the attacker cannot see
    the truth) runs the full ``steps``: ``steps * (1 + restarts / 4)`` steps a message.
    ``hospital``: attack only this one (default: each in turn). ``view``: see
    :data:`VIEWS`. ``threads``: torch threads during the attack (1: fastest for small
    models, and polite to a shared machine).
    """

    batch: int = 1
    records: int = 8
    steps: int = 1000
    restarts: int = 4
    lr: float = 0.1
    tv: float = 1e-3
    loss: str = "cosine"
    view: str = "server"
    hospital: str = ""
    margin_db: float = 3.0
    threads: int = 1
    signed: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.batch >= 1, f"inversion_batch must be at least 1 (got {self.batch})"),
            (self.records >= 1, f"inversion_records must be at least 1 (got {self.records})"),
            (self.steps >= 1, f"inversion_steps must be at least 1 (got {self.steps})"),
            (self.restarts >= 1, f"inversion_restarts must be at least 1 (got {self.restarts})"),
            (self.lr > 0, f"inversion_lr must be > 0 (got {self.lr})"),
            (self.tv >= 0, f"inversion_tv must be >= 0 (got {self.tv})"),
            (self.loss in LOSSES, f"inversion_loss must be one of {LOSSES} (got {self.loss!r})"),
            (self.view in VIEWS, f"inversion_view must be one of {VIEWS} (got {self.view!r})"),
            (self.margin_db >= 0, f"inversion_margin_db must be >= 0 (got {self.margin_db})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> InversionSettings:
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            for key in (f"inversion_{field.name}", f"inversion-{field.name.replace('_', '-')}"):
                if key in options:
                    raw = options[key]
                    kind = type(getattr(cls(), field.name))
                    try:
                        if kind is bool and isinstance(raw, str):
                            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                                raise ValueError(raw)
                            values[field.name] = raw.lower() in ("true", "1", "yes")
                        else:
                            values[field.name] = kind(raw)
                    except (TypeError, ValueError):
                        raise ConfigError(f"audit option {key}: {raw!r} is not valid") from None
        return cls(**values)


# ---- metrics --------------------------------------------------------------------------------


def psnr(reference: np.ndarray, estimate: np.ndarray, *, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)`` (inf if equal)."""
    mse = float(
        np.mean((np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)) ** 2)
    )
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, estimate: np.ndarray, *, data_range: float) -> float:
    """Mean structural similarity of two images ``(channels, height, width)`` (or
    ``(height, width)``), averaged over channels: scikit-image's
    ``structural_similarity`` defaults (7x7 uniform window, or the largest odd window the
    image allows, sample covariance, K1 0.01, K2 0.03, the window-wide border cropped)."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(estimate, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[None], b[None]
    side = min(a.shape[1:])
    win = min(7, side if side % 2 else side - 1)
    if win < 1:
        raise ValueError("images must be at least 1x1")
    return float(np.mean([_ssim_channel(x, y, data_range, win) for x, y in zip(a, b, strict=True)]))


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> float:
    n = win**x.ndim
    cov_norm = n / (n - 1) if n > 1 else 1.0
    ux, uy = ndimage.uniform_filter(x, size=win), ndimage.uniform_filter(y, size=win)
    uxx = ndimage.uniform_filter(x * x, size=win)
    uyy = ndimage.uniform_filter(y * y, size=win)
    uxy = ndimage.uniform_filter(x * y, size=win)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    crop = s[tuple(slice(pad, dim - pad) for dim in s.shape)]
    return float(crop.mean())


# ---- the replayed round ---------------------------------------------------------------------


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
    from fedpriv.privacy.dp import plan_dp

    return plan_dp(
        num_records=max(1, records),
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
        rounds=config.rounds,
        one_step_per_round=config.strategy == "fedsgd",
        target_epsilon=config.epsilon,
        delta=config.delta,
        accountant=config.accountant,
        max_grad_norm=config.max_grad_norm,
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


# ---- the reconstruction ---------------------------------------------------------------------


class Simulator:
    """The attacker's model of the observed message: the update that records ``x`` (with
    ``labels``, one block per participant, in order) would produce from the global model
    ``initial``; differentiable in ``x`` (local SGD steps unrolled, create_graph)."""

    def __init__(
        self,
        model_name: str,
        model_args: Mapping[str, Any],
        initial: Mapping[str, np.ndarray],
        observation: Observation,
        labels: np.ndarray,
        config: RunConfig,
    ) -> None:
        from fedpriv.models import build

        model = build(model_name, **dict(model_args))
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in initial.items()})
        model.train()
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.theta0 = {
            n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()
        }
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.target = torch.cat(
            [
                torch.as_tensor(observation.target[n], dtype=torch.float32).reshape(-1)
                for n in self.names
            ]
        )
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.lr = 1.0 if observation.gradient else config.lr
        self.momentum = 0.0 if observation.gradient else config.momentum
        self.mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
        self.spans: list[tuple[int, int, Participant]] = []
        offset = 0
        for p in observation.participants:
            self.spans.append((offset, offset + p.records.size, p))
            offset += p.records.size
        self.count = offset
        self.criterion = torch.nn.CrossEntropyLoss()

    def _loss(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
        from torch.func import functional_call

        return self.criterion(functional_call(self.model, {**params, **self.buffers}, (x,)), y)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened parameter change (weighted over participants) ``x`` would send."""
        names, theta0 = self.names, self.theta0
        total = torch.zeros_like(self.target)
        for start, stop, p in self.spans:
            xs, ys = x[start:stop], self.labels[start:stop]
            params = dict(theta0)
            velocity: list[torch.Tensor] | None = None
            for step in p.schedule:
                if step.size == 0:
                    continue
                index = torch.as_tensor(step, dtype=torch.long)
                loss = self._loss(params, xs[index], ys[index])
                if self.mu > 0:
                    loss = loss + 0.5 * self.mu * sum(
                        (params[n] - theta0[n]).pow(2).sum() for n in names
                    )
                grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
                if self.momentum > 0:
                    velocity = (
                        list(grads)
                        if velocity is None
                        else [self.momentum * v + g for v, g in zip(velocity, grads, strict=True)]
                    )
                    grads = tuple(velocity)
                params = {n: params[n] - self.lr * g for n, g in zip(names, grads, strict=True)}
            delta = torch.cat([(params[n] - theta0[n]).reshape(-1) for n in names])
            total = total + p.weight * delta
        return total

    def mismatch(self, x: torch.Tensor, loss: str = "cosine") -> torch.Tensor:
        """1 - cosine similarity (``cosine``) or the squared error relative to the observed
        update's squared norm (``l2``) between ``x``'s update and the observed one."""
        guess = self.update(x)
        norm = self.target.norm() + 1e-12
        if loss == "cosine":
            return 1 - (guess @ self.target) / ((guess.norm() + 1e-12) * norm)
        return (guess - self.target).pow(2).sum() / norm**2


def reconstruct(
    model_name: str,
    model_args: Mapping[str, Any],
    initial: Mapping[str, np.ndarray],
    observation: Observation,
    labels: np.ndarray,
    feature_shape: tuple[int, ...],
    *,
    config: RunConfig,
    settings: InversionSettings,
    bounds: tuple[float, float] | None,
    image: bool,
    seed: int,
    tick: Callable[[], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Dummy records (one per record of the observation's participants, in their order,
    with ``labels``) optimised until the update they would produce matches
    ``observation.target``; returns them and their final matching loss."""
    simulator = Simulator(model_name, model_args, initial, observation, labels, config)

    def objective(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        match = simulator.mismatch(x, settings.loss)
        total = match
        if image and settings.tv > 0:
            total = total + settings.tv * _total_variation(x)
        return total, match

    # small problems run fastest on one thread (and do not fight other work for the cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, settings.threads))
    try:
        return _optimise(objective, simulator.count, feature_shape, settings, bounds, seed, tick)
    finally:
        torch.set_num_threads(threads)


def _optimise(
    objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    count: int,
    feature_shape: tuple[int, ...],
    settings: InversionSettings,
    bounds: tuple[float, float] | None,
    seed: int,
    tick: Callable[[], None] | None,
) -> tuple[np.ndarray, float]:
    """Restarts from random points: with several, each is probed for a quarter of the
    steps at the full learning rate and the one that matches best (the attacker sees only
    the match) runs the whole schedule (steps, learning rate / 10 at 3/8, 5/8 and 7/8)."""
    generator = torch.Generator().manual_seed(int(seed) % 2**63)

    def start() -> torch.Tensor:
        x = torch.randn((count, *feature_shape), generator=generator)
        if bounds is not None:
            low, high = bounds
            x = ((low + high) / 2 + x * (high - low) / 4).clamp(low, high)
        return x

    def descend(x: torch.Tensor, steps: int, decay: bool) -> tuple[torch.Tensor, float]:
        x = x.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=settings.lr)
        milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay else []
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        for _ in range(steps):
            total, _match = objective(x)
            (grad,) = torch.autograd.grad(total, [x])
            x.grad = grad.sign() if settings.signed else grad
            optimizer.step()
            schedule.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(bounds[0], bounds[1])
        _, final = objective(x)
        value = float(final.detach())
        return x.detach(), value if math.isfinite(value) else math.inf

    if settings.restarts == 1:
        x, value = descend(start(), settings.steps, decay=True)
        if tick is not None:
            tick()
        return x.numpy().copy(), value
    probe = max(1, settings.steps // 4)
    candidates = []
    for _ in range(settings.restarts):
        candidates.append(descend(start(), probe, decay=False))
        if tick is not None:
            tick()
    x, _ = min(candidates, key=lambda c: c[1])
    x, value = descend(x, settings.steps, decay=True)
    if tick is not None:
        tick()
    return x.numpy().copy(), value


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def match_records(
    truth: np.ndarray, truth_labels: np.ndarray, guesses: np.ndarray, guess_labels: np.ndarray
) -> np.ndarray:
    """For each true record, the reconstruction assigned to it (Hungarian method on the
    squared error; a reconstruction is only assigned to a record of its own label)."""
    a = truth.reshape(truth.shape[0], -1).astype(np.float64)
    b = guesses.reshape(guesses.shape[0], -1).astype(np.float64)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).mean(axis=2)
    cost = cost + 1e12 * (np.asarray(truth_labels)[:, None] != np.asarray(guess_labels)[None, :])
    rows, cols = linear_sum_assignment(cost)
    assigned = np.empty(a.shape[0], dtype=np.int64)
    assigned[rows] = cols
    return assigned


# ---- the audit ------------------------------------------------------------------------------


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
        return _result(
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


def _result(
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


# ---- the report's picture -------------------------------------------------------------------


def figure(entry: Mapping[str, Any]) -> Any:
    """A matplotlib figure of ``audit.json``'s ``attacks.inversion`` entry: one column per
    shown record; rows: the record, the reconstruction (its PSNR above), the public records'
    mean of its class, a random public record of its class. None for tables (no images)."""
    shown = entry.get("images") or []
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = entry.get("value_range", [0.0, 1.0])
    rows = (
        ("original", "record"),
        ("reconstruction", "rebuilt"),
        ("class-mean", "class mean"),
        ("random", "random"),
    )
    fig, axes = plt.subplots(
        len(rows), len(shown), figsize=(1.2 * len(shown) + 0.6, 1.2 * len(rows)), squeeze=False
    )
    per_record = {r["index"]: r for r in entry.get("records_attacked", [])}
    for j, item in enumerate(shown):
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            picture = np.asarray(item[key], dtype=np.float64)
            if picture.ndim == 3:
                picture = picture[0] if picture.shape[0] == 1 else np.moveaxis(picture, 0, -1)
            picture = np.clip((picture - low) / max(high - low, 1e-12), 0, 1)
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == 1 and item["index"] in per_record and "psnr" in per_record[item["index"]]:
                ax.set_title(f"{per_record[item['index']]['psnr']:.1f} dB", fontsize=7)
    fig.tight_layout()
    return fig
