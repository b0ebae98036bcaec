"""Membership-inference audits: attacks, metrics, empirical-epsilon bounds, canaries; and
the registry of audits (:mod:`fedpriv.privacy.audit.base`), with gradient inversion."""

from fedpriv.privacy.audit import inversion  # noqa: F401  (registers audit "inversion")
from fedpriv.privacy.audit.attacks import (
    Attack,
    AttackInputs,
    available_attacks,
    create_attack,
    register_attack,
)
from fedpriv.privacy.audit.run import DEFAULT_ATTACKS, AuditError, AuditFailure, audit_run

__all__ = [
    "DEFAULT_ATTACKS",
    "Attack",
    "AttackInputs",
    "AuditError",
    "AuditFailure",
    "audit_run",
    "available_attacks",
    "create_attack",
    "register_attack",
]
