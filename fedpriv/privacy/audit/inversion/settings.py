"""The inversion audit's settings: its options, parsed once, and the constants they name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedpriv.errors import ConfigError

#: whose view is attacked: what the server can read, or the round's new global model
VIEWS = ("server", "model")
LOSSES = ("cosine", "l2")
#: image arrays kept in audit.json for the report
SHOWN = 8
#: the no-information guesses (see ``audit._baselines``); the best on average is the baseline
BASELINES = ("mean", "class-mean", "random")


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
