"""One typed, validated run configuration.

Keys are kebab-case at the edges (CLI flags, TOML files, Flower's run config, config.json)
and snake_case inside. A configuration is parsed and validated once, here; everything below
receives a frozen :class:`RunConfig`, never a raw mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from fedpriv.errors import ConfigError

__all__ = [
    "DEVICES",
    "DP_RECIPE",
    "PARTITIONS",
    "PLAIN_RECIPE",
    "STATS_SHARE",
    "Recipe",
    "RunConfig",
    "load_toml",
]

PARTITIONS = ("iid", "dirichlet", "label-skew", "natural")
DEVICES = ("auto", "cpu", "cuda")
ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost")
#: the hidden activations fedpriv's models take (fedpriv.models.ACTIVATIONS)
ACTIVATIONS = ("relu", "elu", "tanh")
DP_LEVELS = ("sample", "client", "both")
AGGREGATIONS = ("plain", "ckks", "secagg")
NORMALISATIONS = ("auto", "schema", "federated", "file")
#: normalisation "federated": the share of the run's epsilon the feature-statistics release
#: gets alone when stats-epsilon is 0 (see fedpriv.privacy.statistics for why a quarter)
STATS_SHARE = 0.25


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training settings a run gets for the keys its user left at 0 ("the recipe's")."""

    rounds: int
    local_epochs: int
    batch_size: int
    lr: float


#: Without DP: the recipe fedpriv always had.
PLAIN_RECIPE = Recipe(rounds=5, local_epochs=1, batch_size=32, lr=0.1)
#: With DP-SGD at the hospitals. Chosen on public data only (breast-cancer, digits, and the
#: generated sets of benchmarks/public_sets.py; benchmarks/dp_recipe.py, BENCHMARKS.md), never
#: on a user's data, so choosing it spends nobody's privacy. Why it wins at a fixed epsilon:
#: a larger batch means a larger sample rate but a smaller noise-to-signal ratio per step
#: (sigma C / B); a large learning rate makes the few steps the budget affords count; more
#: local epochs and rounds give DP-SGD the steps it needs (the noise is calibrated to all of
#: them). The clipping norm stays at 1.0: 0.1 lost 5-35 points on every set.
DP_RECIPE = Recipe(rounds=10, local_epochs=4, batch_size=128, lr=1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines a federated run; the defaults are the demo's."""

    # data
    dataset: str = "breast-cancer"
    label_column: str = "label"
    site_column: str = "site"
    #: CSV column naming each record's patient (the unit of privacy); empty: each record
    patient_column: str = ""
    hospitals: int = 5
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_hospital: int = 2
    #: the federation's schema.toml (features, public ranges, label codes); empty: an
    #: embedded dataset's own, or none for a user file
    schema: str = ""
    #: auto (by the schema if there is one, else per file, warned), schema (required),
    #: federated (centre and scale from the hospitals' DP-noised counts, sums and squares,
    #: within the schema's ranges) or file (per-file standardisation: a feature means
    #: something different at each site)
    normalisation: str = "auto"
    #: normalisation federated: the epsilon of the statistics release alone (at delta); the
    #: DP-SGD noise is calibrated so that release and training together stay at `epsilon`;
    #: 0: a quarter of `epsilon` (STATS_SHARE)
    stats_epsilon: float = 0.0
    #: normalisation federated: each numeric feature's centre and scale as the server
    #: combined them from the hospitals' noisy statistics (JSON {feature: [centre, scale]});
    #: set by the server before round 1, never by hand
    feature_statistics: str = ""
    #: the digest of the run's schema (set by the server from `schema`): a hospital whose
    #: schema differs refuses to take part
    schema_digest: str = ""
    held_out_fraction: float = 0.2
    test_fraction: float = 0.2
    # federation; rounds, local-epochs, batch-size and lr at 0 take the recipe's value
    # (DP_RECIPE with sample-level DP, else PLAIN_RECIPE); a value given always wins
    rounds: int = 0
    strategy: str = "fedavg"
    server_lr: float = 1.0
    proximal_mu: float = 0.01
    fraction_train: float = 1.0
    min_hospitals: int = 2
    round_timeout: float = 3600.0
    central_eval: bool = True
    # local training
    local_epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    momentum: float = 0.0
    model: str = ""
    model_width: int = 0
    #: the hidden layers' activation: relu, elu or tanh; empty: ELU for the MLP on images
    #: under DP-SGD, else ReLU (fedpriv.models.default_model)
    model_activation: str = ""
    seed: int = 0
    # differential privacy (sample level: DP-SGD at every hospital)
    dp: bool = True
    epsilon: float = 4.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    budget_epsilon: float = 10.0
    ledger_dir: str = ""
    #: a hospital declines a round when fewer of its patients than this are under the cap
    min_patients: int = 10
    fix_model: bool = False
    #: >= 0 makes DP noise and sampling reproducible: INSECURE, for tests and benchmarks
    insecure_dp_seed: int = -1
    # differential privacy (client level: the server protects whole hospitals)
    dp_level: str = "sample"
    client_clip_norm: float = 1.0
    client_noise_multiplier: float = 1.0
    client_adaptive_clip: bool = False
    client_target_quantile: float = 0.5
    client_clip_lr: float = 0.2
    client_count_noise: float = 1.0
    # how updates are combined: plain, ckks (the server adds ciphertexts it cannot read;
    # `he` is its shorthand) or secagg (pairwise masking: no key anyone holds alone)
    aggregation: str = "plain"
    he: bool = False
    keys: str = ""
    #: secure aggregation: hospitals needed to unmask a round's sum (0: a majority)
    secagg_threshold: int = 0
    #: secure aggregation without client-level DP: the largest update norm a hospital may
    #: send; 0: derived from the DP-SGD settings (fedpriv.protocols.secagg.max_norm)
    secagg_max_norm: float = 0.0
    #: secure aggregation: a round in one exchange while every hospital answers (masked
    #: without self masks; a round someone misses is discarded, then recoverable
    #: two-exchange rounds until three in a row complete, twice as many after each further
    #: discarded round); false: always two exchanges
    secagg_one_exchange: bool = True
    #: secure aggregation + FedSGD + DP-SGD: each hospital adds only its share of the
    #: record-level noise, so that the honest survivors' shares in any sum the server can
    #: unmask add up to the full noise (fedpriv.privacy.distributed_noise); off by default
    distributed_noise: bool = False
    #: distributed noise: hospitals assumed at most to collude with the server (they know
    #: their own shares); -1: a minority of the federation, below the secagg threshold
    noise_colluders: int = -1
    #: the most training examples any hospital may claim in a round
    max_examples: int = 1_000_000
    # audits
    audit: bool = False
    canaries: int = 0
    reference_models: int = 4
    # resources
    device: str = "auto"
    gpus_per_hospital: float = 0.0
    cpus_per_hospital: float = 1.0
    # deployment: the hospitals hold their own data (node config data-path); the server
    # learns the model's input shape and classes from them before round 1
    deployment: bool = False
    # output
    out: str = "runs"
    run_name: str = ""
    resume: str = ""

    def __post_init__(self) -> None:
        for name in ("rounds", "local_epochs", "batch_size", "lr"):
            value = getattr(self, name)
            _check(value >= 0, f"{name.replace('_', '-')} must be > 0, or 0 for the recipe's")
            if value == 0:  # config.json and the hospitals then see the value used
                object.__setattr__(self, name, getattr(self.recipe, name))
        _check(self.hospitals >= 1, "hospitals must be at least 1")
        _check(self.rounds >= 1, f"rounds must be at least 1 (got {self.rounds})")
        _check(
            self.partition in PARTITIONS,
            f"unknown partition '{self.partition}': use one of {', '.join(PARTITIONS)}",
        )
        _check(
            self.alpha > 0,
            f"alpha must be > 0 (got {self.alpha}); smaller means more skewed hospitals, e.g. 0.5",
        )
        _check(self.classes_per_hospital >= 1, "classes-per-hospital must be at least 1")
        _check(
            self.normalisation in NORMALISATIONS,
            f"unknown normalisation '{self.normalisation}': use one of {', '.join(NORMALISATIONS)}",
        )
        _check(
            not (self.schema and self.normalisation == "file"),
            "a schema and normalisation = file contradict: the schema normalises by its public "
            "ranges; drop one",
        )
        _check(
            0 < self.held_out_fraction < 1,
            f"held-out-fraction must be strictly between 0 and 1 (got {self.held_out_fraction})",
        )
        _check(
            0 < self.test_fraction < 1,
            f"test-fraction must be strictly between 0 and 1 (got {self.test_fraction})",
        )
        _check(self.server_lr > 0, f"server-lr must be > 0 (got {self.server_lr})")
        _check(self.proximal_mu >= 0, "proximal-mu must be >= 0")
        _check(
            0 < self.fraction_train <= 1,
            f"fraction-train must be in (0, 1] (got {self.fraction_train})",
        )
        _check(self.min_hospitals >= 1, "min-hospitals must be at least 1")
        _check(self.round_timeout > 0, "round-timeout must be > 0 seconds")
        _check(self.local_epochs >= 1, f"local-epochs must be at least 1 (got {self.local_epochs})")
        _check(self.canaries >= 0, f"canaries must be >= 0 (got {self.canaries})")
        _check(self.reference_models >= 0, "reference-models must be >= 0")
        _check(self.model_width >= 0, "model-width must be >= 0 (0: the model's default)")
        _check(
            self.model_activation in ("", *ACTIVATIONS),
            f"model-activation must be one of {', '.join(ACTIVATIONS)} (empty: by DP)",
        )
        _check(self.batch_size >= 1, f"batch-size must be at least 1 (got {self.batch_size})")
        _check(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1) (got {self.momentum})")
        _check(self.epsilon > 0, f"epsilon must be > 0 (got {self.epsilon})")
        _check(0 < self.delta < 1, f"delta must be in (0, 1) (got {self.delta})")
        _check(
            math.isfinite(self.stats_epsilon) and self.stats_epsilon >= 0,
            f"stats-epsilon must be a finite number >= 0 (got {self.stats_epsilon})",
        )
        if self.normalisation == "federated" and self.stats_epsilon == 0:
            object.__setattr__(self, "stats_epsilon", self.epsilon * STATS_SHARE)
        _check(
            self.normalisation != "federated"
            or not self.sample_level_dp
            or self.stats_epsilon < self.epsilon,
            f"stats-epsilon {self.stats_epsilon:g} must be below epsilon {self.epsilon:g}: the "
            "statistics release and DP-SGD share the run's epsilon",
        )
        _check(self.max_grad_norm > 0, f"max-grad-norm must be > 0 (got {self.max_grad_norm})")
        _check(self.noise_multiplier >= 0, "noise-multiplier must be >= 0 (0: calibrate)")
        _check(
            self.accountant in ACCOUNTANTS,
            f"unknown accountant '{self.accountant}': use {' or '.join(ACCOUNTANTS)}",
        )
        _check(
            self.grad_sample_mode in GRAD_SAMPLE_MODES,
            f"unknown grad-sample-mode '{self.grad_sample_mode}': use "
            f"{', '.join(GRAD_SAMPLE_MODES)}",
        )
        _check(
            math.isfinite(self.budget_epsilon) and self.budget_epsilon > 0,
            f"budget-epsilon must be a finite number > 0 (got {self.budget_epsilon})",
        )
        _check(self.min_patients >= 1, f"min-patients must be at least 1 (got {self.min_patients})")
        for name in ("epsilon", "delta", "lr", "max_grad_norm", "server_lr", "alpha"):
            value = getattr(self, name)
            _check(math.isfinite(value), f"{name.replace('_', '-')} must be finite (got {value})")
        _check(
            self.dp_level in DP_LEVELS,
            f"unknown dp-level '{self.dp_level}': use {', '.join(DP_LEVELS)}",
        )
        _check(
            self.dp or self.dp_level == "sample",
            f"--dp-level {self.dp_level} asks for DP but --no-dp switches it off: drop one",
        )
        _check(self.client_clip_norm > 0, "client-clip-norm must be > 0")
        _check(self.client_noise_multiplier >= 0, "client-noise-multiplier must be >= 0")
        _check(0 < self.client_target_quantile < 1, "client-target-quantile must be in (0, 1)")
        _check(self.client_clip_lr > 0, "client-clip-lr must be > 0")
        _check(
            not self.client_adaptive_clip
            or self.client_noise_multiplier == 0
            or 2 * self.client_count_noise > self.client_noise_multiplier,
            "adaptive clipping needs client-count-noise > client-noise-multiplier / 2 "
            f"(got {self.client_count_noise:g} and {self.client_noise_multiplier:g})",
        )
        _check(
            self.device in DEVICES,
            f"unknown device '{self.device}': use one of {', '.join(DEVICES)}",
        )
        _check(
            self.aggregation in AGGREGATIONS,
            f"unknown aggregation '{self.aggregation}': use one of {', '.join(AGGREGATIONS)}",
        )
        _check(
            not (self.he and self.aggregation not in ("plain", "ckks")),
            f"--he is the shorthand for --aggregation ckks; it cannot go with {self.aggregation}",
        )
        if self.he or self.aggregation == "ckks":  # one spelling inside: both set
            object.__setattr__(self, "he", True)
            object.__setattr__(self, "aggregation", "ckks")
        _check(
            self.secagg_threshold == 0 or self.secagg_threshold >= 2,
            f"secagg-threshold must be 0 (a majority) or at least 2 (got {self.secagg_threshold})",
        )
        _check(
            math.isfinite(self.secagg_max_norm) and self.secagg_max_norm >= 0,
            "secagg-max-norm must be a finite number > 0, or 0 to derive it from the DP-SGD "
            "settings",
        )
        _check(self.max_examples >= 1, "max-examples must be at least 1")
        self._check_distributed_noise()
        _check(self.gpus_per_hospital >= 0, "gpus-per-hospital must be >= 0")
        _check(self.cpus_per_hospital > 0, "cpus-per-hospital must be > 0")
        _check(bool(self.out), "out must name a directory")

    def _check_distributed_noise(self) -> None:
        _check(
            self.noise_colluders >= -1,
            f"noise-colluders must be -1 (a minority) or >= 0 (got {self.noise_colluders})",
        )
        if not self.distributed_noise:
            return
        _check(
            self.strategy == "fedsgd"
            and self.aggregation == "secagg"
            and self.dp
            and self.dp_level == "sample",
            "distributed-noise needs strategy fedsgd, aggregation secagg and sample-level DP "
            f"(got strategy {self.strategy}, aggregation {self.aggregation}, "
            f"dp {'on' if self.dp else 'off'}, dp-level {self.dp_level})",
        )
        threshold = self.secagg_threshold or (0 if self.deployment else self.hospitals // 2 + 1)
        _check(
            not threshold or self.noise_colluders < threshold,
            f"noise-colluders {self.noise_colluders} must be below the secure-aggregation "
            f"threshold {threshold}: that many colluders could unmask a hospital's update",
        )

    # ---- the edges -------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (TOML, Flower run config); unknown keys are refused."""
        fields = _field_types()
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = [f.replace("_", "-") for f in fields]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown setting '{key}'{hint}")
            kwargs[name] = _coerce(key, raw, fields[name])
        return cls(**kwargs)

    @property
    def recipe(self) -> Recipe:
        """Where unset training settings come from: DP-SGD needs its own (see DP_RECIPE)."""
        return DP_RECIPE if self.sample_level_dp else PLAIN_RECIPE

    @property
    def sample_level_dp(self) -> bool:
        """DP-SGD at every hospital (the default)."""
        return self.dp and self.dp_level in ("sample", "both")

    @property
    def client_level_dp(self) -> bool:
        """Clipping and noise on whole hospitals' updates (at the server, or under secure
        aggregation at the hospitals)."""
        return self.dp and self.dp_level in ("client", "both")

    @property
    def protocol(self) -> str:
        """The registered aggregation protocol this run uses."""
        if self.aggregation == "plain" and self.client_level_dp:
            return "client-dp"  # the trusted server clips and adds the noise
        return self.aggregation

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys, JSON/TOML/Flower-compatible scalar values."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@functools.cache
def _field_types() -> dict[str, type]:
    hints = get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Accept what TOML or Flower hand us; refuse anything that would silently change meaning."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(f"setting '{key}' must be true or false (got {raw!r})")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"setting '{key}' must be an integer (got {raw!r})")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
        raise ConfigError(f"setting '{key}' must be an integer (got {raw!r})")
    if kind is float:
        if isinstance(raw, bool):
            raise ConfigError(f"setting '{key}' must be a number (got {raw!r})")
        if isinstance(raw, int | float):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(f"setting '{key}' must be a number (got {raw!r})")
    if isinstance(raw, str):
        return raw
    raise ConfigError(f"setting '{key}' must be a string (got {raw!r})")


def read_toml(path: str | Path, *, what: str) -> dict[str, Any]:
    """A TOML file's contents; ConfigError naming ``what`` the file is if it is missing or
    not TOML."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} '{file}' does not exist")
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} '{file}' is not valid TOML: {exc}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run-config TOML file: top-level keys, or a [tool.flwr.app.config] table."""
    data = read_toml(path, what="config file")
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if isinstance(table, dict):
        return table
    return data
