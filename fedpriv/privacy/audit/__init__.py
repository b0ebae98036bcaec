"""Privacy audits of a finished run: membership, inversion, attribute inference, linkage."""

from fedpriv.privacy.audit import inversion  # noqa: F401  (registers audit "inversion")
from fedpriv.privacy.audit.attacks import (
    Attack,
    AttackInputs,
    available_attacks,
    create_attack,
    register_attack,
)
from fedpriv.privacy.audit.attribute import AttributeAudit
from fedpriv.privacy.audit.base import (
    Audit,
    AuditInputs,
    AuditResult,
    available_audits,
    create_audit,
    register_audit,
)
from fedpriv.privacy.audit.run import (
    DEFAULT_ATTACKS,
    AuditError,
    AuditFailure,
    all_attacks,
    audit_run,
    load_run,
)

__all__ = [
    "DEFAULT_ATTACKS",
    "Attack",
    "AttackInputs",
    "AttributeAudit",
    "Audit",
    "AuditError",
    "AuditFailure",
    "AuditInputs",
    "AuditResult",
    "all_attacks",
    "audit_run",
    "available_attacks",
    "available_audits",
    "create_attack",
    "create_audit",
    "load_run",
    "register_attack",
    "register_audit",
]
