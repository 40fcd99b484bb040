"""The models fedmqtt can train, by name, and the bridge between torch modules and ``ModelArrays``.

A model is named in the plan (``cnn``, ``seed-cnn``, ``mlp``, ``mobilenet-v3-small``); coordinator and
devices build the same architecture from that name and exchange only its tensors. The tensors are the
*floating-point* entries of the ``state_dict`` in its order: parameters and float buffers such as
BatchNorm's running mean and variance. Integer buffers (BatchNorm's ``num_batches_tracked``) are not
part of the arrays: they are bookkeeping, not something to average, and stay local to each copy.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmqtt.arrays import ModelArrays
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.schema import ManifestEntry


class ModelMismatch(FedmqttError):
    """Arrays do not fit a model: different tensor names or shapes."""

    def __init__(self, model: str, differences: list[str]) -> None:
        shown = "; ".join(differences[:5])
        more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
        super().__init__(
            f"the arrays do not fit {model}: {shown}{more}. Coordinator and device must use the same "
            f"model name and number of classes."
        )
        self.differences = tuple(differences)


class McMahanCNN(nn.Module):
    """The MNIST CNN of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks
    from Decentralized Data": two 5×5 convolutions (32, 64 channels) each followed by 2×2 max-pooling,
    a 512-unit fully connected layer and the classifier. 1,663,370 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2)
        x = nn.functional.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class SeedCNN(nn.Module):
    """The network of the project's design document (PyTorch's MNIST example): two unpadded 3×3
    convolutions (32, 64), one 2×2 max-pool, dropout 0.25, a 128-unit layer, dropout 0.5, classifier.
    1,199,882 parameters.

    Two differences from the document, neither changing a tensor: it returns logits (training applies
    ``cross_entropy``, which is the document's ``log_softmax`` + NLL), and it uses element dropout
    (``nn.Dropout``) where the document used ``nn.Dropout2d``, which torch warns about on the 2-D
    input of the second dropout and which drops whole channels rather than units.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.conv1(x))
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv2(x)), 2)
        x = self.dropout1(x)
        x = nn.functional.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout2(x))


class MLP(nn.Module):
    """The "2NN" of McMahan et al. (2017): 784 → 200 → 200 → classes, ReLU. 199,210 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.fc1(torch.flatten(x, 1)))
        x = nn.functional.relu(self.fc2(x))
        return self.fc3(x)


def _mobilenet_v3_small(num_classes: int) -> nn.Module:
    from fedmqtt.extras import require

    mobilenet_v3_small = require("vision", "torchvision.models", "the mobilenet-v3-small model").mobilenet_v3_small
    # weights=None: random initialisation; fedmqtt never downloads weights.
    return mobilenet_v3_small(weights=None, num_classes=num_classes)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    input_shape: tuple[int, int, int]  # C×H×W of one sample
    head: str  # the final classifier layer's module name (its parameters are the "head")
    build: Callable[[int], nn.Module]


_REGISTRY: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("cnn", "McMahan et al. 2017 MNIST CNN (1.66 M parameters)", (1, 28, 28), "fc2", McMahanCNN),
        ModelInfo("seed-cnn", "design-document CNN with dropout (1.20 M parameters)", (1, 28, 28), "fc2", SeedCNN),
        ModelInfo("mlp", "McMahan et al. 2017 2NN, 784-200-200-10 (199 k parameters)", (1, 28, 28), "fc3", MLP),
        ModelInfo(
            "mobilenet-v3-small",
            "torchvision MobileNetV3-Small for 3-channel images, random init (1.53 M parameters)",
            (3, 224, 224),
            "classifier.3",
            _mobilenet_v3_small,
        ),
    )
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError("model", f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def model_input_shape(name: str) -> tuple[int, int, int]:
    """The C×H×W shape one input sample must have."""
    return model_info(name).input_shape


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ConfigError("num_classes", f"must be at least 2, got {num_classes}")


def build_model(name: str, *, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """A freshly initialised model. With ``seed``, the initial weights depend on the seed alone (the
    global torch random state is left as it was); without, on torch's global random state."""
    info = model_info(name)
    _check_num_classes(num_classes)
    if seed is None:
        return info.build(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return info.build(num_classes)


@functools.lru_cache(maxsize=32)
def _meta_model(name: str, num_classes: int) -> nn.Module:
    # On the meta device nothing is allocated or initialised: shapes only, in microseconds.
    with torch.device("meta"):
        return model_info(name).build(num_classes)


def model_manifest(name: str, *, num_classes: int = 10) -> tuple[ManifestEntry, ...]:
    """Names and shapes of the model's arrays (the floating ``state_dict`` entries, in order)."""
    _check_num_classes(num_classes)
    return _manifest(name, num_classes)


@functools.lru_cache(maxsize=32)
def _manifest(name: str, num_classes: int) -> tuple[ManifestEntry, ...]:
    state = _meta_model(name, num_classes).state_dict()
    return tuple(
        ManifestEntry(name=key, shape=tuple(int(d) for d in value.shape))
        for key, value in state.items()
        if value.is_floating_point()
    )


def parameter_count(name: str, *, num_classes: int = 10) -> int:
    """Number of learnable parameters (buffers such as BatchNorm statistics not included)."""
    _check_num_classes(num_classes)
    return sum(p.numel() for p in _meta_model(name, num_classes).parameters())


def head_parameter_names(name: str, *, num_classes: int = 10) -> tuple[str, ...]:
    """The parameters of the final classifier layer: pass them as ``trainable`` to train only a head."""
    _check_num_classes(num_classes)
    prefix = model_info(name).head + "."
    return tuple(key for key, _ in _meta_model(name, num_classes).named_parameters() if key.startswith(prefix))


def expand_trainable(name: str, patterns: Sequence[str], *, num_classes: int = 10) -> tuple[str, ...]:
    """The tensors ``--trainable`` trains: every manifest name that matches one of ``patterns`` (fnmatch globs
    such as ``fc2.*``; an exact name matches itself), in the model's order. Float buffers (BatchNorm statistics)
    of a module whose parameters match come along: they change when that module trains. These names are the
    plan's ``trainable`` set and exactly the tensors an update frame (and a trainable-only delta) carries.

    Raises :class:`~fedmqtt.errors.ConfigError` (field ``trainable``) when the patterns are empty, a pattern
    matches nothing, or no learnable parameter matches; the message lists the model's tensors."""
    manifest = [entry.name for entry in model_manifest(name, num_classes=num_classes)]
    parameters = {key for key, _ in _meta_model(name, num_classes).named_parameters()}
    listing = ", ".join(manifest[:40]) + (f", ... ({len(manifest)} in all)" if len(manifest) > 40 else "")
    globs = [p.strip() for p in patterns if p.strip()]
    if not globs:
        raise ConfigError("trainable", f"names no tensor; {name}'s tensors are: {listing}")
    unmatched = [g for g in globs if not any(fnmatch.fnmatchcase(t, g) for t in manifest)]
    if unmatched:
        raise ConfigError(
            "trainable",
            f"{', '.join(repr(g) for g in unmatched)} {'matches' if len(unmatched) == 1 else 'match'} no tensor of "
            f"{name}; its tensors are: {listing}",
        )
    chosen = {t for t in manifest if any(fnmatch.fnmatchcase(t, g) for g in globs)}
    trained_modules = {t.rpartition(".")[0] for t in chosen if t in parameters}
    if not trained_modules:
        raise ConfigError(
            "trainable", f"matches only buffers ({', '.join(sorted(chosen))}): nothing would be trained; its "
            f"parameters are: {', '.join(t for t in manifest if t in parameters)}"
        )  # fmt: skip
    chosen |= {t for t in manifest if t not in parameters and t.rpartition(".")[0] in trained_modules}
    return tuple(t for t in manifest if t in chosen)


def get_arrays(model: nn.Module) -> ModelArrays:
    """Float32 numpy copies of the model's floating ``state_dict`` entries, in order."""
    return {
        key: value.detach().to("cpu", torch.float32).numpy().copy()
        for key, value in model.state_dict().items()
        if value.is_floating_point()
    }


def _differences(model_shapes: Mapping[str, tuple[int, ...]], array_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    found = []
    for key, shape in model_shapes.items():
        if key not in array_shapes:
            found.append(f"missing {key} {shape}")
        elif array_shapes[key] != shape:
            found.append(f"{key} has shape {array_shapes[key]}, the model needs {shape}")
    found.extend(f"unexpected {key} {shape}" for key, shape in array_shapes.items() if key not in model_shapes)
    return found


def check_arrays_fit(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`ModelMismatch` unless ``arrays`` has exactly the model's array names and shapes."""
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    array_shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    differences = _differences(model_shapes, array_shapes)
    if differences:
        raise ModelMismatch(type(model).__name__, differences)


def set_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model in place (optimizers holding its parameters stay valid).

    Strict: the names and shapes must be exactly the model's (order aside), else :class:`ModelMismatch`
    lists the first differences and the model is left unchanged.
    """
    check_arrays_fit(model, arrays)
    state = model.state_dict()
    with torch.no_grad():
        for key, value in arrays.items():
            state[key].copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
