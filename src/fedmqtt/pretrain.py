"""``fedmqtt pretrain``: train a model centrally and write it as a model file (the start of a federated job).

Central mini-batch SGD with fedmqtt's own training code (:func:`fedmqtt.training.train_local`, then
:func:`fedmqtt.training.evaluate`), on the training split of a data set or on a *public slice* of one of its splits;
the result is a model file (:mod:`fedmqtt.model_file`) that ``fedmqtt coordinator --init-checkpoint`` starts from.
Its metadata records the recipe, which images it saw (:func:`public_slice` owns that split: the indices are in the
file) and its accuracy on held-out images (the rest of the split the slice came from, else the test split), so a
federated job evaluated on the same rest stays disjoint from what the backbone saw.

``--augment`` (:class:`Augment`, :func:`random_affine`) trains every epoch on a fresh random view of each image:
a small rotation, shift and scale drawn per image (torch's ``affine_grid``/``grid_sample``, bilinear, the
background filled with the data set's blank pixel); with 1,000 public MNIST images it is what lifts the backbone
(see README, "From a pretrained model to the camera"). ``--weight-decay`` is SGD's L2 penalty.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmqtt.errors import ConfigError

__all__ = ["Augment", "PretrainResult", "pretrain", "public_slice", "random_affine", "register"]

Pick = Literal["first", "random"]


def public_slice(size: int, count: int, *, pick: Pick = "first", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices ``0..size-1`` of a split into (public, rest), both sorted.

    ``pick="first"``: the public slice is the first ``count`` images; ``"random"``: ``count`` images drawn by a
    permutation seeded with ``seed``. The one rule for which images a pretrained model saw: a job that evaluates
    on ``rest`` (or on another split) is disjoint from them."""
    if not 0 < count < size:
        raise ConfigError(
            "--public-slice", f"must be between 1 and {size - 1} (the split has {size} images), got {count}"
        )
    if pick == "first":
        public = np.arange(count, dtype=np.int64)
    elif pick == "random":
        public = np.sort(np.random.default_rng(seed).permutation(size)[:count]).astype(np.int64)
    else:
        raise ConfigError("--public-pick", f"must be first or random, got {pick!r}")
    mask = np.ones(size, dtype=bool)
    mask[public] = False
    return public, np.flatnonzero(mask).astype(np.int64)


@dataclass(frozen=True)
class Augment:
    """Random affine views for ``--augment``: rotation in ±``rotate`` degrees, shift in ±``shift`` of the image's
    width and height (each axis drawn separately), scale in 1 ± ``scale``; each drawn uniformly, per image."""

    rotate: float = 10.0
    shift: float = 0.1
    scale: float = 0.1

    DEFAULT = "rotate=10,shift=0.1,scale=0.1"

    def __post_init__(self) -> None:
        for name, value, high in (
            ("rotate", self.rotate, 180.0),
            ("shift", self.shift, 1.0),
            ("scale", self.scale, 0.9),
        ):
            if not (math.isfinite(value) and 0.0 <= value <= high):
                raise ConfigError("--augment", f"{name} must be between 0 and {high:g}, got {value}")

    @classmethod
    def parse(cls, text: str) -> Augment:
        """``rotate=DEG,shift=FRACTION,scale=FRACTION`` (any subset; the rest keep their defaults)."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("rotate", "shift", "scale"):
                raise ConfigError(
                    "--augment", f"expected rotate=DEG,shift=F,scale=F (e.g. {cls.DEFAULT}), got {item!r}"
                )
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise ConfigError("--augment", f"{key.strip()} must be a number, got {value!r}") from None
        return cls(**values)


def random_affine(images: Any, augment: Augment, generator: Any, *, fill: float = 0.0) -> Any:
    """A random affine view of each image of ``images`` (a float N×C×H×W tensor), drawn from ``generator``.

    Pixels that come from outside the image take the value ``fill`` (the data set's blank pixel once normalised).
    The same generator state gives the same views."""
    import torch
    from torch.nn import functional

    n = images.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2.0 - 1.0

    angle = uniform(n) * math.radians(augment.rotate)
    zoom = 1.0 + uniform(n) * augment.scale
    shift = uniform(n, 2) * augment.shift * 2.0  # grid coordinates span [-1, 1]: a width is 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # the grid maps output to input: the inverse
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    )
    grid = functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    moved = functional.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (moved + fill).contiguous()


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    digest: str
    accuracy: float
    loss: float
    train_images: int
    eval_images: int
    meta: dict[str, Any]


def pretrain(
    *,
    model: str,
    dataset: str,
    data_dir: str | Path | None,
    out: Path,
    epochs: int,
    batch_size: int = 50,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    public_count: int | None = None,
    public_from: Literal["test", "train"] = "test",
    public_pick: Pick = "first",
    augment: Augment | None = None,
    weight_decay: float = 0.0,
) -> PretrainResult:
    """Train ``model`` centrally on ``dataset`` and write it to ``out`` (see the module docstring)."""
    from fedmqtt.data import load_dataset, resolve_data_dir
    from fedmqtt.model_file import save_model_file
    from fedmqtt.models import MODEL_NAMES, build_model, get_arrays, model_input_shape

    if model not in MODEL_NAMES:
        raise ConfigError("--model", f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    from fedmqtt.paths import require_input_dir, require_output_file

    require_output_file("--out", out)  # before any data is found, downloaded or trained on
    require_input_dir("--data-dir", data_dir)
    from fedmqtt.training import evaluate, train_local

    if model_input_shape(model) != (1, 28, 28):
        raise ConfigError("--model", f"{model} takes {model_input_shape(model)} images; pretrain reads 28x28 IDX data")
    if epochs < 1:
        raise ConfigError("--epochs", f"must be at least 1, got {epochs}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError("--weight-decay", f"must be 0 or more, got {weight_decay}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError("--out", f"{out.parent} is not a directory")
    meta: dict[str, Any] = {
        "made_by": "fedmqtt pretrain",
        "dataset": dataset,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "augment": asdict(augment) if augment is not None else None,
        "seed": seed,
    }
    if public_count is None:
        # The whole training split; held out: the whole test split.
        directory = resolve_data_dir(data_dir, dataset, split="all")
        train = load_dataset(dataset, directory, train=True)
        held_out = load_dataset(dataset, directory, train=False)
        meta |= {"trained_on": f"{dataset} train (all {len(train)})", "evaluated_on": f"{dataset} test (all)"}
    else:
        directory = resolve_data_dir(data_dir, dataset, split="test" if public_from == "test" else "all")
        source = load_dataset(dataset, directory, train=public_from == "train")
        public, rest = public_slice(len(source), public_count, pick=public_pick, seed=seed)
        train = source.subset(public)
        if public_from == "test":
            held_out = source.subset(rest)
            evaluated_on = f"{dataset} test, the {len(rest)} images outside the public slice"
        else:
            held_out = load_dataset(dataset, directory, train=False)
            evaluated_on = f"{dataset} test (all)"
        meta |= {
            "trained_on": f"{dataset} {public_from}, public slice of {public_count} ({public_pick})",
            "evaluated_on": evaluated_on,
            "public_from": public_from,
            "public_slice": public_count,
            "public_pick": public_pick,
            "public_indices": public.tolist(),
        }
    net = build_model(model, seed=seed)
    started = time.perf_counter()
    if augment is None:
        result = train_local(
            net, train, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
            seed=seed,
        )  # fmt: skip
    else:
        result = _train_augmented(
            net, train, augment, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
            weight_decay=weight_decay, seed=seed,
        )  # fmt: skip
    accuracy, loss = evaluate(net, held_out)
    meta |= {
        "train_images": len(train),
        "eval_images": len(held_out),
        "accuracy": accuracy,
        "loss": loss,
        "train_loss": result.loss,
        "seconds": round(time.perf_counter() - started, 3),
    }
    written = save_model_file(out, model, get_arrays(net), meta=meta)
    return PretrainResult(out, written.digest, accuracy, loss, len(train), len(held_out), meta)


VIEWS_PER_BLOCK = 50_000  # augmented images held in memory at once (~150 MB of 28x28 float32)


def _train_augmented(
    net: Any, train: Any, augment: Augment, *, dataset: str, epochs: int, batch_size: int, lr: float,
    momentum: float, weight_decay: float, seed: int,
) -> Any:  # fmt: skip
    """``epochs`` passes over ``train``, each over a fresh random view of every image (:func:`random_affine`).

    The views of several epochs are trained on as one shuffled set of up to :data:`VIEWS_PER_BLOCK` images (one
    ``train_local`` call: one optimizer, so SGD's momentum carries across those epochs)."""
    import torch

    from fedmqtt.data import NORMALISATION, ImageDataset
    from fedmqtt.training import train_local

    mean, std = NORMALISATION[dataset]
    generator = torch.Generator().manual_seed(seed)
    per_block = max(1, VIEWS_PER_BLOCK // len(train))
    done, block, result = 0, 0, None
    while done < epochs:
        count = min(per_block, epochs - done)
        views = [random_affine(train.images, augment, generator, fill=-mean / std) for _ in range(count)]
        block_set = ImageDataset(torch.cat(views), train.labels.repeat(count), num_classes=train.num_classes)
        result = train_local(
            net, block_set, epochs=1, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
            seed=seed + block,
        )  # fmt: skip
        done, block = done + count, block + 1
    return result


def register(subparsers: Any) -> None:
    # Model and data set names are checked when the command runs: their registries import torch (help stays fast).
    p = subparsers.add_parser(
        "pretrain",
        help="train a model centrally and write a model file (a job's --init-checkpoint)",
        description="Train a model centrally with fedmqtt's own training code and write it as a model file (no "
        "pickle) for `fedmqtt coordinator --init-checkpoint`. With --public-slice N it trains only on N images of "
        "one split (a public slice) and reports its accuracy on the rest of that split; the file records which "
        "images it saw.",
    )
    p.add_argument(
        "--model", default="cnn", metavar="NAME", help="a model of fedmqtt's registry (default: %(default)s)"
    )
    p.add_argument("--dataset", default="mnist", metavar="NAME", help="mnist or fashion-mnist (default: %(default)s)")
    p.add_argument("--data-dir", help="directory of the IDX files (default: $FEDMQTT_DATA, else the cache)")
    p.add_argument("--public-slice", type=int, metavar="N", help="train on N images of one split only")
    p.add_argument(
        "--public-from", choices=("test", "train"), default="test",
        help="the split the public slice comes from (default: %(default)s; the rest of it is the held-out set)",
    )  # fmt: skip
    p.add_argument(
        "--public-pick", choices=("first", "random"), default="first",
        help="the first N images, or N drawn with --seed (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, required=True, help="passes over the training images (required)")
    p.add_argument("--batch-size", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="SGD weight decay (L2 penalty; default: %(default)s)"
    )
    p.add_argument(
        "--augment", nargs="?", const=Augment.DEFAULT, metavar="SPEC",
        help="train each epoch on a fresh random affine view of every image: rotation, shift (fraction of the size) "
        f"and scale drawn per image; SPEC is rotate=DEG,shift=F,scale=F (alone: {Augment.DEFAULT})",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="initial weights, order, views and --public-pick random")
    p.add_argument("--out", type=Path, required=True, help="the model file to write (required)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.public_slice is None and (args.public_from != "test" or args.public_pick != "first"):
        raise ConfigError("--public-from/--public-pick", "need --public-slice N")
    result = pretrain(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        seed=args.seed,
        public_count=args.public_slice,
        public_from=args.public_from,
        public_pick=args.public_pick,
        augment=Augment.parse(args.augment) if args.augment is not None else None,
        weight_decay=args.weight_decay,
    )
    if args.json:
        shown = {k: v for k, v in result.meta.items() if k != "public_indices"}
        print(json.dumps({"path": str(result.path), "digest": result.digest, **shown}))
    else:
        print(
            f"pretrained {args.model} on {result.meta['trained_on']}, {args.epochs} epoch(s): accuracy "
            f"{result.accuracy:.4f} (loss {result.loss:.4f}) on {result.meta['evaluated_on']}; wrote {result.path} "
            f"(digest {result.digest[:12]})",
            file=sys.stdout,
        )
    return 0
