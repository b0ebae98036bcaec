"""Model registry. Every model here is DP-SGD compatible as built: GroupNorm, never BatchNorm.

``build(name, **kwargs)`` with the name and arguments that ``config.json`` records
(``model`` and ``model-args``) rebuilds the exact architecture of a run, so ``model.pt``
loads without any other fedpriv state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fedpriv.errors import ConfigError

__all__ = [
    "available_models",
    "build",
    "default_model",
    "initial_state",
    "register_model",
]

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory; a second registration of a name raises."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model.

    ``replace_batchnorm=True`` (recorded in ``model-args`` by ``--fix-model``) swaps every
    BatchNorm layer for a GroupNorm over the same channels, as DP-SGD requires.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}': use one of {', '.join(available_models())}")
    replace = bool(kwargs.pop("replace_batchnorm", False))
    model = _REGISTRY[name](**kwargs)
    if replace:
        replace_batchnorm(model)
    return model


def replace_batchnorm(model: nn.Module) -> list[str]:
    """Swap BatchNorm layers for GroupNorm in place; returns what was replaced, by name."""
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                channels = child.num_features
                groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
                setattr(parent, child_name, nn.GroupNorm(groups, channels, affine=child.affine))
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                kind = type(child).__name__
                replaced.append(f"{full} ({kind}({channels}) -> GroupNorm({groups}, {channels}))")
    return replaced


def initial_state(name: str, seed: int, **kwargs: Any) -> dict[str, Any]:
    """The initial global model of a run: a function of the architecture and the seed only
    (so under HE the hospitals can build it themselves and the server never holds it)."""
    import torch

    torch.manual_seed(seed)
    model = build(name, **kwargs)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


#: the hidden activation of the MLP that stands in for an image model under DP-SGD, when
#: none is asked for (everywhere else ReLU)
DP_ACTIVATION = "elu"
#: the hidden layers' activations a model can be built with
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh}


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{name}': use {', '.join(ACTIVATIONS)}")


def _activation(name: str) -> nn.Module:
    _check_activation(name)
    return ACTIVATIONS[name]()


def default_model(
    *,
    kind: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    name: str = "",
    width: int = 0,
    dp: bool = False,
    activation: str = "",
) -> tuple[str, dict[str, Any]]:
    """The model name and arguments for a dataset: the MLP for tables, the CNN for images,
    except under DP-SGD for images smaller than 16x16.

    On 8x8 digits at epsilon 4 the CNN reached 0.53-0.67 and the MLP 0.82-0.84 (public data,
    benchmarks/dp_recipe.py); on 28x28 images the CNN won (0.83 vs 0.80). A tiny image
    leaves the convolutions little to share, and DP-SGD's noise grows with the steps the
    slower-learning CNN needs. ``width`` (if > 0) is the MLP's hidden size or the CNN's
    first-layer channels. ``activation`` (if given) is the hidden layers'; else ELU for the
    MLP on images under DP-SGD and ReLU everywhere else. Through ``fedpriv simulate`` at
    epsilon 4 (public data, 3 seeds, BENCHMARKS.md) ELU took digits' MLP from 0.827 to 0.857
    (epsilon 2: 0.618 to 0.729) but the MLP on the generated 12k table from 0.841 to 0.832,
    and the 28x28 CNN from 0.81 to 0.78 (in-process): so only the image MLP gets it.
    """
    if activation:
        _check_activation(activation)
    small_image = (
        kind == "image" and len(input_shape) == 3 and input_shape[1] * input_shape[2] < 256
    )
    chosen = name or ("cnn" if kind == "image" and not (dp and small_image) else "mlp")
    if chosen == "cnn":
        if len(input_shape) != 3:
            raise ConfigError("model 'cnn' needs image data; use --model mlp for tables")
        args: dict[str, Any] = {"in_channels": int(input_shape[0]), "num_classes": num_classes}
        if width:
            args["width"] = width
        if activation:
            args["activation"] = activation
        return chosen, args
    features = 1
    for dim in input_shape:
        features *= int(dim)
    if chosen == "mlp":
        args = {"in_features": features, "num_classes": num_classes}
        if width:
            args["hidden"] = width
        if activation or (dp and kind == "image"):
            args["activation"] = activation or DP_ACTIVATION
        return chosen, args
    return chosen, {"in_features": features, "num_classes": num_classes}


@register_model("mlp")
class MLP(nn.Module):
    """Two hidden layers (ReLU unless ``activation`` says otherwise); flattens its input, so
    it also takes small images."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: int = 64, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            _activation(activation),
            nn.Linear(hidden, hidden),
            _activation(activation),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Any) -> Any:
        return self.net(x)


@register_model("cnn")
class CNN(nn.Module):
    """Two conv blocks (conv, GroupNorm, ReLU, pool) and a linear head; any image size >= 4."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        groups: int = 4,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.GroupNorm(groups, width),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.GroupNorm(groups, 2 * width),
            _activation(activation),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, num_classes))

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x))
