"""Configuration: one validated object, kebab-case at the edges, defaults in one place."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedpriv.config import DP_RECIPE, PLAIN_RECIPE, RunConfig, load_toml
from fedpriv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_matches_the_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower_defaults = pyproject["tool"]["flwr"]["app"]["config"]
    # the fields' own defaults (0 = "the recipe's"), not the values a run resolves them to
    ours = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}
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
        ({"rounds": -1}, "rounds must be > 0, or 0 for the recipe's"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"alpha": -1.5}, "alpha must be > 0"),
        ({"hospitals": 0}, "hospitals must be at least 1"),
        ({"partition": "zipf"}, "unknown partition 'zipf'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"lr": -0.1}, "lr must be > 0, or 0"),
        ({"batch-size": -1}, "batch-size must be > 0, or 0"),
        ({"local-epochs": -2}, "local-epochs must be > 0, or 0"),
        ({"held-out-fraction": 1.0}, "held-out-fraction"),
        ({"rounds": "many"}, "'rounds' must be an integer"),
        ({"rounds": 2.5}, "'rounds' must be an integer"),
        ({"rounds": True}, "'rounds' must be an integer"),
        ({"roundz": 3}, "unknown setting 'roundz' \\(did you mean 'rounds'\\?\\)"),
        ({"dp": False, "dp-level": "client"}, "--dp-level client asks for DP but --no-dp"),
        ({"model-activation": "sigmoid"}, "model-activation must be one of relu, elu, tanh"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_dp_recipe_fills_only_unset_keys_and_only_under_dp_sgd() -> None:
    dp = RunConfig()
    assert (dp.rounds, dp.local_epochs, dp.batch_size, dp.lr) == (10, 4, 128, 1.0)
    assert dp.recipe is DP_RECIPE
    plain = RunConfig(dp=False)
    assert (plain.rounds, plain.local_epochs, plain.batch_size, plain.lr) == (5, 1, 32, 0.1)
    # client-level DP only: the hospitals run plain SGD, so theirs is the plain recipe
    client = RunConfig(dp_level="client")
    assert client.recipe is PLAIN_RECIPE and client.batch_size == 32
    # a value the user gives wins, even where it equals the other recipe's
    given = RunConfig.from_mapping({"rounds": 5, "lr": 0.1})
    assert (given.rounds, given.lr, given.local_epochs, given.batch_size) == (5, 0.1, 4, 128)
    # the resolved values are what travels (to hospitals, into config.json): nothing re-resolves
    assert RunConfig.from_mapping(dp.to_mapping()) == dp
    assert dp.replace(dp=False).rounds == 10


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


def test_config_json_records_the_recipe_values_used(tmp_path: Path) -> None:
    import json

    from fedpriv.server.simulation import prepare_simulation

    plan = prepare_simulation(RunConfig(dataset="digits", out=str(tmp_path), device="cpu"))
    recorded = json.loads((plan.run_dir.path / "config.json").read_text())
    assert (recorded["rounds"], recorded["local-epochs"]) == (10, 4)
    assert (recorded["batch-size"], recorded["lr"]) == (128, 1.0)
    assert recorded["model"] == "mlp"  # 8x8 images under DP-SGD
    assert recorded["model-args"]["activation"] == "elu"  # the image MLP's under DP
    plain = prepare_simulation(
        RunConfig(dataset="digits", dp=False, out=str(tmp_path), run_name="plain", device="cpu")
    )
    recorded = json.loads((plain.run_dir.path / "config.json").read_text())
    assert (recorded["rounds"], recorded["batch-size"], recorded["model"]) == (5, 32, "cnn")


def test_the_activation_is_elu_for_the_image_mlp_under_dp_sgd_and_as_asked_otherwise() -> None:
    from torch import nn

    from fedpriv.models import build, default_model

    digits = {"kind": "image", "input_shape": (1, 8, 8), "num_classes": 10}
    name, args = default_model(**digits, dp=True)
    assert (name, args["activation"]) == ("mlp", "elu")
    assert any(isinstance(m, nn.ELU) for m in build(name, **args).modules())
    # tables under DP, and everything without DP, are what they always were: ReLU, and no
    # activation argument
    table = {"kind": "tabular", "input_shape": (30,), "num_classes": 2}
    for kind, dp in ((table, True), (table, False), (digits, False)):
        name, args = default_model(**kind, dp=dp)
        assert "activation" not in args
        assert not any(isinstance(m, nn.ELU) for m in build(name, **args).modules())
    # asked for: honoured with or without DP, for the CNN too (whose default stays ReLU)
    assert default_model(**table, dp=True, activation="tanh")[1]["activation"] == "tanh"
    image = {"kind": "image", "input_shape": (1, 28, 28), "num_classes": 4}
    assert "activation" not in default_model(**image, dp=True)[1]
    name, args = default_model(**image, dp=False, activation="elu")
    assert any(isinstance(m, nn.ELU) for m in build(name, **args).modules())
    # a state saved without the argument loads into the MLP built with it (no parameters)
    relu = build("mlp", in_features=30, num_classes=2)
    build("mlp", in_features=30, num_classes=2, activation="elu").load_state_dict(relu.state_dict())
    with pytest.raises(ConfigError, match="unknown activation 'gelu': use relu, elu, tanh"):
        default_model(**table, activation="gelu")
    # the config's list (it cannot import the models, which import torch) is the models' own
    from fedpriv import config, models

    assert tuple(models.ACTIVATIONS) == config.ACTIVATIONS
