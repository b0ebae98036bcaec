"""A real hospital's own settings: its SuperNode's node config (deploy/site.example.toml).

These are the hospital's decisions, not the researcher's: where its data and privacy
ledger live, its lifetime privacy cap, its device, its CKKS secret key, and whether it
trains without DP at all (by default it refuses). A run's configuration can never override
them. Every problem names the key to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpriv.config import DEVICES, read_toml
from fedpriv.errors import ConfigError

__all__ = ["SITE_KEYS", "SiteSettings", "check_site", "load_site_file"]

DATA_PATH = "data-path"
SITE_KEYS = (
    "hospital-name",
    DATA_PATH,
    "label-column",
    "ledger-path",
    "budget-epsilon",
    "device",
    "he-secret-context",
    "require-dp",
)


@dataclasses.dataclass(frozen=True)
class SiteSettings:
    hospital_name: str
    data_path: Path
    label_column: str
    ledger_path: Path | None
    budget_epsilon: float
    device: str
    he_secret_context: Path | None
    require_dp: bool

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSettings:
        values = dict(node_config)
        if DATA_PATH not in values:
            raise ConfigError(
                f"node config: '{DATA_PATH}' is missing: set it to this hospital's .csv or .npz"
            )
        data_path = Path(str(values[DATA_PATH])).expanduser()
        name = str(values.get("hospital-name") or data_path.stem)
        budget_raw = values.get("budget-epsilon", 10.0)
        try:
            budget = float(budget_raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"node config: 'budget-epsilon' must be a number (got {budget_raw!r})"
            ) from None
        if budget <= 0:
            raise ConfigError(f"node config: 'budget-epsilon' must be > 0 (got {budget})")
        device = str(values.get("device", "auto"))
        if device not in DEVICES:
            raise ConfigError(
                f"node config: 'device' must be one of {', '.join(DEVICES)} (got {device!r})"
            )
        require_raw = values.get("require-dp", True)
        if isinstance(require_raw, str):
            if require_raw.lower() not in ("true", "false"):
                raise ConfigError(
                    f"node config: 'require-dp' must be true or false ({require_raw!r})"
                )
            require_raw = require_raw.lower() == "true"
        ledger = values.get("ledger-path")
        he = values.get("he-secret-context")
        return cls(
            hospital_name=name,
            data_path=data_path,
            label_column=str(values.get("label-column", "label")),
            ledger_path=Path(str(ledger)).expanduser() if ledger else None,
            budget_epsilon=budget,
            device=device,
            he_secret_context=Path(str(he)).expanduser() if he else None,
            require_dp=bool(require_raw),
        )


def load_site_file(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    data = read_toml(file, what="site settings file")
    unknown = sorted(set(data) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(
            f"'{file}': unknown setting '{unknown[0]}' (known: {', '.join(SITE_KEYS)})"
        )
    return data


def check_site(node_config: Mapping[str, Any]) -> list[str]:
    """Everything a hospital's IT can check before starting its SuperNode; returns what was
    found, or raises a ConfigError naming the key."""
    from fedpriv.data import load_dataset
    from fedpriv.errors import DataError, FedprivError
    from fedpriv.privacy.ledger import Ledger

    site = SiteSettings.from_node_config(node_config)
    found = []
    try:
        data = load_dataset(str(site.data_path), label_column=site.label_column)
    except DataError as exc:
        raise ConfigError(f"node config: 'data-path': {exc}") from None
    found.append(
        f"data-path: {len(data)} records, {data.num_classes} classes, features "
        f"{tuple(data.features.shape[1:])}"
    )
    if site.ledger_path is None:
        if site.require_dp:
            raise ConfigError(
                "node config: 'ledger-path' is missing: a hospital that requires DP keeps a "
                "privacy ledger (any writable file path, e.g. /var/lib/fedpriv/ledger.sqlite)"
            )
        found.append("ledger-path: none (require-dp = false: this hospital may train without DP)")
    else:
        try:
            ledger = Ledger.open(site.ledger_path)
        except FedprivError as exc:
            raise ConfigError(f"node config: 'ledger-path': {exc}") from None
        spent = ledger.summary()
        found.append(
            f"ledger-path: {site.ledger_path} ({sum(r.rounds for r in spent)} rounds recorded)"
        )
    found.append(f"budget-epsilon: {site.budget_epsilon:g}")
    from fedpriv.training import resolve_device

    try:
        resolve_device(site.device)
    except FedprivError as exc:
        raise ConfigError(f"node config: 'device': {exc}") from None
    found.append(f"device: {site.device}")
    if site.he_secret_context is not None:
        from fedpriv.privacy.he import load_context

        try:
            context = load_context(site.he_secret_context, role="hospital")
        except FedprivError as exc:
            raise ConfigError(f"node config: 'he-secret-context': {exc}") from None
        found.append(f"he-secret-context: key {context.fingerprint}")
    found.append(f"require-dp: {str(site.require_dp).lower()}")
    return found
