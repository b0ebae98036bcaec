"""Client-level DP by a trusted server: it clips each hospital's whole update and noises the
aggregate (``dp-level client|both`` with plaintext aggregation).

The server sees every raw update and adds the noise itself, so it must be trusted with both;
with ``aggregation secagg`` the hospitals clip and add the noise instead (distributed DP,
:mod:`fedpriv.protocols.secagg`), and the server never sees an un-noised aggregate.

This protects a hospital as a whole (all its records at once), against whoever sees the
final model. Each update ``u_k = w_k - w`` (or the gradient under FedSGD) is clipped to L2
norm ``S``; the clipped updates are averaged *uniformly* over the ``m`` sampled hospitals
(example-count weighting would make one hospital's influence unbounded); Gaussian noise of
standard deviation ``z * S / m`` is added. With sampling rate ``q`` = hospitals per round /
hospitals, a run of ``T`` rounds is ``T`` Poisson-subsampled Gaussian mechanisms of noise
multiplier ``z``, accounted like any other :class:`~fedpriv.privacy.dp.DpEvent`.

Clipping is fixed by default. Adaptive clipping (Andrew et al. 2021, ``adaptive=True``)
tracks a target quantile ``gamma`` of the update norms: with ``b`` the noisy fraction of
updates whose norm was at most ``S``, ``S <- S * exp(-eta * (b - gamma))``. The count is
noised with standard deviation ``sigma_b`` (in hospitals), and the updates with
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so that the two together are exactly as private
as one Gaussian mechanism of multiplier ``z`` (their Theorem 1): the accounting is unchanged.
This is fedpriv's own: Flower's adaptive-clipping wrapper applies the update with the
fraction of *clipped* updates in place of ``b``, which drives the clip norm away from the
target (tests/unit/test_client_dp.py demonstrates both).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpriv.protocols.base import Contribution, Protocol, ServerSide, register_protocol
from fedpriv.protocols.checks import Limits, Rejected, check_arrays
from fedpriv.protocols.plain import PlainHospital

__all__ = ["ClientLevelDpAggregator", "clip_update", "update_noise_multiplier"]

logger = logging.getLogger(__name__)


def clip_update(
    update: dict[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` to L2 norm at most ``clip_norm`` (over all arrays); returns its norm."""
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
    )
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """``z_delta`` for the updates when the clipped count also consumes privacy."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise_std <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs count noise std > z/2 = {noise_multiplier / 2:g} "
            f"(got {count_noise_std:g})"
        )
    return float((noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5)


class ClientLevelDpAggregator(ServerSide):
    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_noise_std: float = 1.0,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__()
        self.server_lr = server_lr
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.count_noise_std = count_noise_std
        self.update_noise = (
            update_noise_multiplier(noise_multiplier, count_noise_std)
            if adaptive
            else noise_multiplier
        )
        self.rounds = 0
        self.last_norms: list[float] = []
        self.clip_history: list[float] = [clip_norm]
        # Noise from the OS entropy pool: never reproducible from the run's seed.
        self._rng = np.random.default_rng(secrets.randbits(128))

    def aggregate(
        self,
        contributions: Sequence[Contribution],
        *,
        reference: ArrayRecord | None = None,
        gradient: bool = False,
        server_round: int = 0,
    ) -> ArrayRecord | None:
        """Uniform mean of the clipped updates (weights minus the global model; under FedSGD
        the gradients) plus noise; example counts play no part (they would make one
        hospital's influence unbounded)."""
        self.rejected = []
        if reference is None:
            raise ValueError("the global model the hospitals started from is needed")
        if not contributions:
            return None
        base = {k: v.numpy().astype(np.float64) for k, v in reference.items()}
        keys = list(base)
        total = {k: np.zeros(base[k].shape) for k in keys}
        norms = []
        used = 0
        for contribution in contributions:
            try:
                checked = check_arrays(contribution.arrays, reference)
            except Rejected as why:
                self.reject(contribution.hospital, str(why))
                continue
            values = {k: v.astype(np.float64) for k, v in checked.items()}
            update = values if gradient else {k: values[k] - base[k] for k in keys}
            clipped, norm = clip_update(update, self.clip_norm)
            norms.append(norm)
            for k in keys:
                total[k] += clipped[k]
            used += 1
        if used == 0:
            return None
        # m: the hospitals sampled for the round (public), so the sensitivity is S / m
        m = len(contributions)
        std = self.update_noise * self.clip_norm / m
        result = {}
        for k in keys:
            mean = total[k] / m + self._rng.normal(0.0, std, size=total[k].shape)
            value = base[k] - self.server_lr * mean if gradient else base[k] + mean
            result[k] = Array(np.asarray(value, dtype=reference[k].numpy().dtype))
        self.rounds += 1
        self.last_norms = norms
        if self.adaptive:
            unclipped = sum(1 for n in norms if n <= self.clip_norm)
            noisy = (unclipped + self._rng.normal(0.0, self.count_noise_std)) / m
            self.clip_norm *= float(np.exp(-self.clip_lr * (noisy - self.target_quantile)))
            self.clip_history.append(self.clip_norm)
        logger.info(
            "client-level DP: %d updates clipped to %.3g (norms %s), noise std %.3g",
            used,
            self.clip_norm,
            ", ".join(f"{n:.3g}" for n in norms),
            std,
        )
        return ArrayRecord(result)


def _server(config: Any, *, limits: Limits, **_: Any) -> ClientLevelDpAggregator:
    return ClientLevelDpAggregator(
        clip_norm=config.client_clip_norm,
        noise_multiplier=config.client_noise_multiplier,
        adaptive=config.client_adaptive_clip,
        target_quantile=config.client_target_quantile,
        clip_lr=config.client_clip_lr,
        count_noise_std=config.client_count_noise,
        server_lr=config.server_lr,
    )


def _hospital(config: Any, node_config: Any) -> PlainHospital:
    return PlainHospital()


CLIENT_DP = register_protocol(
    Protocol(
        name="client-dp",
        server=_server,
        hospital=_hospital,
        summary="plaintext updates; the server (trusted) clips each and adds the noise",
    )
)
