"""Gradient inversion audit (moved into a package; split by job in the next commit)."""

from fedpriv.privacy.audit.inversion.replay import (
    VIEWS,
    InversionAudit,
    InversionSettings,
    Observation,
    Participant,
    Simulator,
    figure,
    psnr,
    reconstruct,
    replay_round,
    ssim,
)

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
