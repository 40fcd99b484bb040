"""Local training and evaluation, shared by devices (local epochs) and the coordinator (evaluation).

Plain mini-batch SGD on one model, in place: no per-round deep copies. FedProx (Li et al. 2020) adds
``mu/2 · ||w − w₀||²`` to each step's loss and keeps one frozen copy of the starting parameters.
Batches are drawn straight from the dataset's tensors (no DataLoader: its worker and collation
overhead dominates on small IoT-sized data sets).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedmqtt.arrays import ModelArrays
from fedmqtt.data import ImageDataset
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.models import check_arrays_fit, get_arrays


class TrainingDiverged(FedmqttError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, lr: float) -> None:
        super().__init__(
            f"training diverged (non-finite loss) in epoch {epoch}, step {step}; "
            f"lower the learning rate (now {lr:g}) or clip updates"
        )
        self.epoch = epoch
        self.step = step


@dataclass(frozen=True)
class TrainResult:
    num_samples: int  # samples in the local data set (the FedAvg weight), not samples × epochs
    num_steps: int  # optimizer steps taken over all epochs
    loss: float  # mean cross-entropy over the last epoch's samples (without the FedProx term)
    seconds: float  # wall-clock time of the training loop


def _check_positive(field: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(field, f"must be a positive number, got {value}")


def _check_non_negative(field: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(field, f"must be zero or positive, got {value}")


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _memory_format_of(model: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` when the model's image weights are stored so (convolutions are fastest when
    their inputs match), else ``torch.contiguous_format``."""
    for tensor in model.parameters():
        if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
    return torch.contiguous_format


@contextlib.contextmanager
def _frozen_except(model: nn.Module, trainable: Sequence[str] | None) -> Iterator[list[nn.Parameter]]:
    """Set ``requires_grad`` from ``trainable`` (None: everything), yield the trainable parameters,
    and restore each parameter's previous flag afterwards."""
    named = dict(model.named_parameters())
    if trainable is not None:
        # A plan's trainable set (fedmqtt.models.expand_trainable) also names the float buffers of the modules it
        # trains (BatchNorm statistics): they are not parameters, and change with their module's training mode.
        buffers = {key for key, _ in model.named_buffers()}
        unknown = sorted(set(trainable) - set(named) - buffers)
        if unknown:
            known = ", ".join(list(named)[:12]) + (", ..." if len(named) > 12 else "")
            raise ConfigError("trainable", f"unknown parameter name(s) {', '.join(unknown[:5])}; the model has {known}")
        if not set(trainable) & set(named):
            raise ConfigError("trainable", "names no parameter: nothing would be trained")
    wanted = set(named) if trainable is None else set(trainable)
    previous = {key: p.requires_grad for key, p in named.items()}
    try:
        for key, p in named.items():
            p.requires_grad_(key in wanted)
        yield [p for key, p in named.items() if key in wanted]
    finally:
        for key, p in named.items():
            p.requires_grad_(previous[key])


@contextlib.contextmanager
def _training_mode(model: nn.Module, freeze_norm_statistics: bool) -> Iterator[None]:
    """Train mode; when part of the model is frozen, normalisation layers with no trainable parameter
    stay in eval mode, so their running statistics stay bit-identical too (the usual practice when
    fine-tuning a head)."""
    was_training = model.training
    model.train()
    if freeze_norm_statistics:
        for module in model.modules():
            if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
    try:
        yield
    finally:
        model.train(was_training)


def round_seed(train_seed: int, device_id: str, round_number: int) -> int:
    """The seed of ``device_id``'s local training in round ``round_number`` of a run seeded with ``train_seed``
    (``--train-seed``): each device and round shuffles in its own order, and every run with that seed in the
    same orders, wherever the device runs (simulate, a device process, a benchmark's in-process loop)."""
    digest = hashlib.blake2b(f"{train_seed}/{device_id}/{round_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: any torch generator takes it


def train_local(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    prox_mu: float | None = None,
    trainable: Sequence[str] | None = None,
    seed: int | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place on ``dataset`` with mini-batch SGD (cross-entropy on logits).

    Every epoch visits each sample once in a fresh random order; the last batch may be smaller.
    ``trainable`` names the parameters to train (e.g. :func:`fedmqtt.models.head_parameter_names`);
    the rest are frozen for this call. With ``seed``, the result is a function of the inputs alone
    (shuffling and dropout draw from a seeded generator; torch's global random state is untouched).
    Raises :class:`TrainingDiverged` when the loss stops being finite.
    """
    if epochs < 1:
        raise ConfigError("epochs", f"must be at least 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")
    _check_positive("lr", lr)
    _check_non_negative("momentum", momentum)
    _check_non_negative("weight_decay", weight_decay)
    if prox_mu is not None:
        _check_non_negative("prox_mu", prox_mu)
    if len(dataset) == 0:
        raise ConfigError("dataset", "is empty: there is nothing to train on")

    device = _device_of(model)
    shuffler = torch.Generator()
    if seed is None:
        shuffler.seed()
    else:
        shuffler.manual_seed(seed)
    num_samples = len(dataset)
    started = time.perf_counter()
    steps = 0
    epoch_loss = 0.0
    with (
        _frozen_except(model, trainable) as parameters,
        _training_mode(model, freeze_norm_statistics=trainable is not None),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        if seed is not None:
            torch.manual_seed(seed)  # dropout masks (inside fork_rng: the global state is restored)
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
        anchors = [p.detach().clone() for p in parameters] if prox_mu else []
        for epoch in range(epochs):
            order = torch.randperm(num_samples, generator=shuffler)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, num_samples, batch_size):
                batch = order[start : start + batch_size]
                inputs = dataset.images[batch].to(device, non_blocking=True)
                targets = dataset.labels[batch].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                data_loss = nn.functional.cross_entropy(model(inputs), targets)
                loss = data_loss
                if prox_mu:
                    proximal = sum(((p - a) ** 2).sum() for p, a in zip(parameters, anchors, strict=True))
                    loss = data_loss + 0.5 * prox_mu * proximal
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += data_loss.detach().double() * batch.numel()
                if steps % 50 == 0 and not torch.isfinite(loss_sum):
                    raise TrainingDiverged(epoch + 1, steps, lr)
            epoch_loss = float(loss_sum) / num_samples
            if not math.isfinite(epoch_loss):
                raise TrainingDiverged(epoch + 1, steps, lr)
    return TrainResult(num_samples=num_samples, num_steps=steps, loss=epoch_loss, seconds=time.perf_counter() - started)


class EvaluationCancelled(FedmqttError):
    """:func:`evaluate` stopped before its next batch because its ``cancelled`` callback said so."""


def evaluate(
    model: nn.Module, dataset: ImageDataset, *, batch_size: int = 250, cancelled: Callable[[], bool] | None = None
) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on ``dataset``, in eval mode. ``cancelled`` is asked
    before each batch; when it returns True, :class:`EvaluationCancelled` is raised (a coordinator that stops
    does not wait for a whole evaluation whose result it would drop). Image batches follow the model's memory
    format: a model moved to ``torch.channels_last`` (as the coordinator's evaluator is) gets channels-last
    batches. The default batch of 250 keeps a CNN's activations in cache (on one thread, the
    McMahan CNN on 10,000 images took 3.4 s channels-last at 250 against 4.2 s at 1000 in the default layout)."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")
    if len(dataset) == 0:
        raise ConfigError("dataset", "is empty: there is nothing to evaluate on")
    device = _device_of(model)
    layout = _memory_format_of(model)
    was_training = model.training
    model.eval()
    correct = 0
    loss_sum = 0.0
    try:
        with torch.inference_mode():
            for start in range(0, len(dataset), batch_size):
                if cancelled is not None and cancelled():
                    raise EvaluationCancelled(f"evaluation cancelled after {start} of {len(dataset)} samples")
                inputs = dataset.images[start : start + batch_size].to(device)
                if inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=layout)
                targets = dataset.labels[start : start + batch_size].to(device)
                logits = model(inputs)
                loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
                correct += int((logits.argmax(dim=1) == targets).sum())
    finally:
        model.train(was_training)
    return correct / len(dataset), loss_sum / len(dataset)


def model_delta(model: nn.Module, start_arrays: Mapping[str, np.ndarray]) -> ModelArrays:
    """The update a device sends: its trained arrays minus the arrays it started from."""
    check_arrays_fit(model, start_arrays)
    return {
        key: (value - np.asarray(start_arrays[key], dtype=np.float32)).astype(np.float32, copy=False)
        for key, value in get_arrays(model).items()
    }
