"""A real hospital's own settings: its SuperNode's node config (deploy/site.example.toml).

These are the hospital's decisions, not the researcher's: where its data and privacy
ledger live, its lifetime privacy cap, its device, its CKKS secret key, and whether it
trains without DP at all (by default it refuses). A run's configuration can never override
them. Every problem names the key to fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpriv.config import DEVICES, read_toml
from fedpriv.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fedpriv.data.schema import Schema
    from fedpriv.privacy.audit.linkage import LinkageReport

__all__ = [
    "SITE_KEYS",
    "SiteSettings",
    "check_site",
    "load_site_file",
    "site_linkage",
    "site_schema_problems",
]

DATA_PATH = "data-path"
SITE_KEYS = (
    "hospital-name",
    DATA_PATH,
    "label-column",
    "patient-column",
    "schema-path",
    "ledger-path",
    "budget-epsilon",
    "budget-delta",
    "device",
    "he-secret-context",
    "require-dp",
    "warm-worker",
    "warm-worker-idle",
)


@dataclasses.dataclass(frozen=True)
class SiteSettings:
    hospital_name: str
    data_path: Path
    label_column: str
    ledger_path: Path | None
    budget_epsilon: float
    #: the delta every run on this site's ledger is composed at (fixed with the ledger)
    budget_delta: float
    #: the column naming each record's patient; empty: each record is its own patient
    patient_column: str
    device: str
    he_secret_context: Path | None
    require_dp: bool
    #: the federation's schema.toml (this site's copy): features normalised by its public
    #: ranges, the file checked against it; None: standardised with this file's own statistics
    schema_path: Path | None = None
    #: serve this site's messages from one long-lived process (fedpriv.client.warm)
    warm_worker: bool = True
    #: seconds without a message before that process stops
    warm_worker_idle: float = 600.0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteSettings:
        values = dict(node_config)
        if DATA_PATH not in values:
            raise ConfigError(
                f"node config: '{DATA_PATH}' is missing: set it to this hospital's .csv or .npz"
            )
        data_path = Path(str(values[DATA_PATH])).expanduser()
        name = str(values.get("hospital-name") or data_path.stem)
        budget = _number(values, "budget-epsilon", 10.0)
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError(
                "node config: 'budget-epsilon' must be a finite number > 0 "
                f"(got {values.get('budget-epsilon')!r})"
            )
        budget_delta = _number(values, "budget-delta", 1e-5)
        if not (0 < budget_delta < 1):
            raise ConfigError(
                "node config: 'budget-delta' must be in (0, 1) "
                f"(got {values.get('budget-delta')!r})"
            )
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
        schema = values.get("schema-path")
        from fedpriv.client.warm import settings as warm_settings

        warm_worker, warm_worker_idle = warm_settings(values)
        return cls(
            hospital_name=name,
            data_path=data_path,
            label_column=str(values.get("label-column", "label")),
            ledger_path=Path(str(ledger)).expanduser() if ledger else None,
            budget_epsilon=budget,
            budget_delta=budget_delta,
            patient_column=str(values.get("patient-column", "") or ""),
            device=device,
            he_secret_context=Path(str(he)).expanduser() if he else None,
            require_dp=bool(require_raw),
            schema_path=Path(str(schema)).expanduser() if schema else None,
            warm_worker=warm_worker,
            warm_worker_idle=warm_worker_idle,
        )

    def load_schema(self) -> Schema | None:
        """The site's copy of the federation's schema; ConfigError naming the key."""
        if self.schema_path is None:
            return None
        from fedpriv.data.schema import load_schema

        try:
            return load_schema(self.schema_path)
        except ConfigError as exc:
            raise ConfigError(f"node config: 'schema-path': {exc}") from None


def _number(values: Mapping[str, Any], key: str, default: float) -> float:
    raw = values.get(key, default)
    if isinstance(raw, bool):
        raise ConfigError(f"node config: '{key}' must be a number (got {raw!r})")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"node config: '{key}' must be a number (got {raw!r})") from None


def load_site_file(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    data = read_toml(file, what="site settings file")
    unknown = sorted(set(data) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(
            f"'{file}': unknown setting '{unknown[0]}' (known: {', '.join(SITE_KEYS)})"
        )
    return data


def site_schema_problems(node_config: Mapping[str, Any], schema: Schema) -> list[str]:
    """Every column of the site's file that does not match ``schema``, one line each
    (empty: it matches); computed on this machine, nothing is sent."""
    from fedpriv.data.datasets import load_raw, schema_problems

    site = SiteSettings.from_node_config(node_config)
    try:
        raw = load_raw(
            str(site.data_path),
            label_column=site.label_column,
            patient_column=site.patient_column,
            feature_columns=schema.feature_names,
        )
    except DataError as exc:
        raise ConfigError(f"node config: 'data-path': {exc}") from None
    return schema_problems(raw, schema, label_column=site.label_column)


def _load_site_data(site: SiteSettings, schema: Schema | None) -> Any:
    from fedpriv.data import load_dataset

    try:
        return load_dataset(
            str(site.data_path),
            label_column=site.label_column,
            patient_column=site.patient_column,
            schema=schema,
        )
    except DataError as exc:
        raise ConfigError(f"node config: 'data-path': {exc}") from None


def check_site(node_config: Mapping[str, Any], schema: Schema | None = None) -> list[str]:
    """Everything a hospital's IT can check before starting its SuperNode; returns what was
    found, or raises a ConfigError naming the key. ``schema`` overrides the site's
    schema-path. Opening an existing ledger only reads it; a missing one is created with the
    site's cap and delta (and its key beside it)."""
    from fedpriv.errors import FedprivError
    from fedpriv.privacy.identity import identity_mode
    from fedpriv.privacy.ledger import Ledger, LedgerSettings

    site = SiteSettings.from_node_config(node_config)
    schema = schema if schema is not None else site.load_schema()
    found = []
    data = _load_site_data(site, schema)
    patients = (
        len({str(p).strip() for p in data.source.patient_ids})
        if data.source.patient_ids is not None
        else None
    )
    found.append(
        f"data-path: {len(data)} records"
        + (f" of {patients} patients (patient-column '{site.patient_column}')" if patients else "")
        + f", {data.num_classes} classes, features {tuple(data.features.shape[1:])}"
    )
    found.append(f"normalisation: {data.normalisation}")
    found.append(
        f"warm-worker: on (one process serves this site's messages; stops after "
        f"{site.warm_worker_idle:g} s idle)"
        if site.warm_worker
        else "warm-worker: off (each message imports PyTorch and reads the data again)"
    )
    if schema is None and data.kind == "tabular":
        found.append(
            "note: no schema-path: this file's features mean something different from another "
            "site's; a run with a schema will refuse this site (fedpriv schema init drafts one)"
        )
    if schema is not None:
        roles = {site.label_column, site.patient_column, "site"}
        ignored = sorted(set(data.source.columns) - set(schema.feature_names) - roles)
        found.append(
            f"schema: matches ({len(schema.features)} features, {schema.width} model inputs, "
            f"{schema.num_classes} label codes, "
            f"digest {schema.digest[:12]})"
            + (f"; columns not in it are ignored: {', '.join(ignored)}" if ignored else "")
        )
        if schema.derived_from:
            found.append(
                f"note: the schema is a draft derived from '{schema.derived_from}': agree on "
                "public ranges before the federation uses it"
            )
    if site.ledger_path is None:
        if site.require_dp:
            raise ConfigError(
                "node config: 'ledger-path' is missing: a hospital that requires DP keeps a "
                "privacy ledger (any writable file path, e.g. /var/lib/fedpriv/ledger.sqlite)"
            )
        found.append("ledger-path: none (require-dp = false: this hospital may train without DP)")
    else:
        settings = LedgerSettings(
            budget_epsilon=site.budget_epsilon,
            delta=site.budget_delta,
            identity=identity_mode(data.source),
        )
        existed = site.ledger_path.exists()
        try:
            ledger = Ledger.open(site.ledger_path, create=settings)
            notices = ledger.check_request(
                dataclasses.replace(settings, accountant=ledger.settings.accountant)
            )
            spent = ledger.summary()
        except FedprivError as exc:
            raise ConfigError(f"node config: 'ledger-path': {exc}") from None
        found.append(
            f"ledger-path: {site.ledger_path} ({'existing' if existed else 'created'}, writable; "
            f"{spent.patients} patients, {spent.events} rounds recorded, largest patient "
            f"epsilon {spent.max_epsilon:.3f}{'' if spent.max_exact else ' (upper bound)'})"
        )
        found.append(
            f"budget: epsilon {ledger.settings.budget_epsilon:g} per patient for life, at delta "
            f"{ledger.settings.delta:g} (fixed in the ledger), {ledger.settings.accountant.upper()}"
        )
        found.extend(f"note: {n}" for n in notices)
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


def site_linkage(
    node_config: Mapping[str, Any],
    quasi_identifiers: Sequence[str],
    sensitive: str | None = None,
    *,
    threshold: int | None = None,
) -> LinkageReport:
    """How re-identifiable the site's own records are from their quasi-identifiers
    (k-anonymity, l-diversity, unique records), computed on this machine from the raw file;
    the report names rows of that file and is never sent anywhere."""
    from fedpriv.privacy.audit.linkage import DEFAULT_THRESHOLD, linkage_report, read_csv_rows

    site = SiteSettings.from_node_config(node_config)
    rows = read_csv_rows(site.data_path)
    try:
        return linkage_report(
            rows,
            quasi_identifiers,
            sensitive,
            threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        )
    except DataError as exc:
        raise DataError(f"'{site.data_path}': {exc}") from None
