"""Configuration: one validated object, kebab-case at the edges, defaults in one place."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedpriv.config import RunConfig, load_toml
from fedpriv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_matches_the_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower_defaults = pyproject["tool"]["flwr"]["app"]["config"]
    ours = RunConfig().to_mapping()
    # `flwr run --run-config` accepts only keys pyproject lists, so it must list them all
    assert set(flower_defaults) == set(ours)
    for key, value in flower_defaults.items():
        assert key in ours, f"pyproject key {key} is not a RunConfig setting"
        assert ours[key] == value, f"{key}: pyproject {value!r} != RunConfig {ours[key]!r}"


def test_round_trip_through_mapping() -> None:
    config = RunConfig(dataset="digits", hospitals=7, alpha=0.3, partition="dirichlet")
    assert RunConfig.from_mapping(config.to_mapping()) == config


def test_kebab_case_and_coercion() -> None:
    config = RunConfig.from_mapping({"local-epochs": "3", "lr": 1, "server-lr": "0.5"})
    assert config.local_epochs == 3 and config.lr == 1.0 and config.server_lr == 0.5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": 0}, "rounds must be at least 1"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha": -1.5}, "alpha must be > 0"),
        ({"hospitals": 0}, "hospitals must be at least 1"),
        ({"partition": "zipf"}, "unknown partition 'zipf'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"lr": 0}, "lr must be > 0"),
        ({"batch-size": 0}, "batch-size must be at least 1"),
        ({"held-out-fraction": 1.0}, "held-out-fraction"),
        ({"rounds": "many"}, "'rounds' must be an integer"),
        ({"rounds": 2.5}, "'rounds' must be an integer"),
        ({"rounds": True}, "'rounds' must be an integer"),
        ({"roundz": 3}, "unknown setting 'roundz' \\(did you mean 'rounds'\\?\\)"),
        ({"dp": False, "dp-level": "client"}, "--dp-level client asks for DP but --no-dp"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_toml_file_top_level_or_flower_table(tmp_path: Path) -> None:
    flat = tmp_path / "flat.toml"
    flat.write_text('dataset = "digits"\nrounds = 4\n')
    assert RunConfig.from_mapping(load_toml(flat)).rounds == 4
    nested = tmp_path / "pyproject.toml"
    nested.write_text("[tool.flwr.app.config]\nhospitals = 3\n")
    assert RunConfig.from_mapping(load_toml(nested)).hospitals == 3
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
