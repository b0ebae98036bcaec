"""Membership-inference audits: attacks, metrics, empirical-epsilon bounds, canaries."""

from fedpriv.privacy.audit.attacks import (
    Attack,
    AttackInputs,
    available_attacks,
    create_attack,
    register_attack,
)
from fedpriv.privacy.audit.attribute import AttributeAudit
from fedpriv.privacy.audit.run import DEFAULT_ATTACKS, AuditError, AuditFailure, audit_run

__all__ = [
    "DEFAULT_ATTACKS",
    "Attack",
    "AttackInputs",
    "AttributeAudit",
    "AuditError",
    "AuditFailure",
    "audit_run",
    "available_attacks",
    "create_attack",
    "register_attack",
]
