"""Privacy/accuracy benchmark of fedmqtt's client-level DP (DP-FedAvg) on MNIST (not a test).

The federation is simulated IN PROCESS with the pure pieces the real coordinator and devices use, in the order they
use them; only MQTT is left out (it moves bytes and does not change them):

- data: ``fedmqtt.data.load_dataset`` and ``partition`` (IID, Dirichlet 0.5) of the MNIST training split;
- selection: ``fedmqtt.privacy.poisson_select`` with rate q (each device independently);
- the round's privacy: ``fedmqtt.privacy.policy.RoundPrivacy``, the policy the coordinator runs its rounds with
  (plan, uniform weights, fixed denominator m = round(qN), server noise, accounting), δ = 1e-5;
- each selected device: ``fedmqtt.training.train_local`` from the global model, update = trained − global,
  ``fedmqtt.privacy.clip_and_noise`` with the plan's ``device_noise_std`` (σC/√m in device mode, 0 in central
  mode), then ``fedmqtt.codecs.encode_frame`` with the int8 uplink and ``decode_frame`` on the coordinator's side;
- coordinator: a ``fedmqtt.coordinator.aggregation`` strategy, every update weighted ``policy.update_weight``
  (1.0), divided by ``policy.denominator`` (m), plus ``policy.server_noise`` (σC on the sum in central mode, the
  top-up σC·√(1 − k/m) in device mode when k < m);
- accounting: ``policy.record_round`` per aggregated round (the effective noise multiplier) and
  ``policy.record_empty_draw`` for an empty Poisson draw, as the coordinator charges them.

The non-private run of each configuration uses the same pieces without clip and noise, weighted by sample count
(plain FedAvg), as the coordinator does with DP off.

Models: ``cnn`` is the full McMahan et al. CNN (1,663,370 parameters) from a seeded random start. ``head`` trains
only its classifier (``fc2``: 512×10 + 10 = 5,130 parameters) on a backbone pretrained on a public slice that no
device holds (default: the first 5,000 images of the MNIST *test* split; accuracy is then measured on the other
5,000). The backbone is frozen and the CNN has no dropout or batch norm, so the devices train the classifier on
fixed 512-d features computed once; the benchmark checks at start that this equals ``train_local`` of the full
CNN with ``trainable=("fc2.weight", "fc2.bias")``. Clip and noise apply to the classifier's tensors only.

σ is chosen per run as the smallest noise multiplier that keeps ε below each of --epsilons after the run's rounds
(opacus's search), or given with --sigmas. Seeded generators stand in for the OS's CSPRNG, for reproducibility.

    .venv/bin/python benchmarks/privacy.py --quick          # about 2 minutes on 2 CPU cores (privacy-quick.json)
    .venv/bin/python benchmarks/privacy.py --models head    # the head half of the sweep: about 9 minutes here
    .venv/bin/python benchmarks/privacy.py --device cuda --workers 8    # the full sweep (the cnn half takes hours)

MNIST IDX files come from fedmqtt.data.resolve_data_dir: --data-dir, else $FEDMQTT_DATA, else the download
cache (~/.cache/fedmqtt/mnist). The pretrained backbone and its features are cached (--cache-dir). Results: a
table on stdout and JSON at --json (default benchmarks/results/privacy.json), rewritten after every run.
See docs/privacy-benchmark.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import _runner as R
from fedmqtt import arrays as A
from fedmqtt.checkpoint import load_state, save_state
from fedmqtt.codecs import decode_frame, encode_frame
from fedmqtt.coordinator.aggregation import build_strategy, parse_strategy_params
from fedmqtt.data import ImageDataset, load_dataset, partition, resolve_data_dir
from fedmqtt.models import build_model, get_arrays, head_parameter_names, set_arrays
from fedmqtt.privacy import check_dp_compatible, clip_and_noise, noise_multiplier_for_budget, poisson_select
from fedmqtt.privacy.policy import RoundPrivacy
from fedmqtt.schema import CodecSpec, DPAnnouncement, FrameKind
from fedmqtt.training import TrainingDiverged, evaluate, train_local

REPO = Path(__file__).resolve().parent.parent
DELTA = 1e-5
UPLINK = "int8"
FEATURES = 512  # the input width of the CNN's classifier fc2
ANCHORS = (
    {
        "source": "Abadi et al. 2016 (DP-SGD, record level, PCA + 1000-unit MLP)",
        "epsilon": 2.0,
        "delta": 1e-5,
        "accuracy": 0.95,
    },
    {
        "source": "Abadi et al. 2016 (DP-SGD, record level, PCA + 1000-unit MLP)",
        "epsilon": 8.0,
        "delta": 1e-5,
        "accuracy": 0.97,
    },
    {"source": "opacus MNIST example (DP-SGD, record level)", "epsilon": 3.0, "delta": 1e-5, "accuracy": 0.968},
)
GOAL = {"accuracy": 0.97, "epsilon": 8.0, "delta": DELTA, "devices": 1000}


# ---------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One federated run. ``mode`` "off" is the non-private run (no clip, no noise, updates weighted by samples)."""

    model: str  # "cnn" | "head"
    devices: int
    partition: str
    mode: str  # "off" | "device" | "central"
    sigma: float
    clip: float
    q: float
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    strategy: str
    strategy_params: tuple[tuple[str, float], ...]
    seed: int

    @property
    def private(self) -> bool:
        return self.mode != "off"

    @property
    def expected_updates(self) -> int:
        """m: the fixed denominator, the expected number of devices per round."""
        return max(1, round(self.q * self.devices))

    def label(self) -> str:
        dp = f"{self.mode} σ={self.sigma:g} C={self.clip:g}" if self.private else "non-private"
        return f"{self.model} N={self.devices} {self.partition} {dp}"


@dataclass
class Outcome:
    setting: Setting
    rounds_run: int
    epsilon: float | None
    epsilon_participation_known: float | None
    delta: float | None
    accuracy: float
    loss: float
    curve: list[tuple[int, float]]  # (round, accuracy) every eval_every rounds
    mean_selected: float
    empty_rounds: int
    dropped_updates: int  # selected devices whose local training diverged (they send nothing)
    diverged_at: int | None  # the round in which every selected device diverged (the run stops before it)
    clipped_fraction: float | None  # share of updates whose norm exceeded C before clipping
    median_update_norm: float | None  # before clipping
    seconds: float

    def record(self) -> dict[str, Any]:
        s = self.setting
        out = {
            "model": s.model,
            "devices": s.devices,
            "partition": s.partition,
            "mode": s.mode,
            "sigma": s.sigma,
            "clip": s.clip if s.private else None,
            "q": s.q,
            "expected_updates": s.expected_updates,
            "rounds": self.rounds_run,
            "rounds_planned": s.rounds,
            "epsilon": self.epsilon,
            "epsilon_participation_known": self.epsilon_participation_known,
            "delta": self.delta,
            "accuracy": self.accuracy,
            "loss": self.loss if math.isfinite(self.loss) else None,
            "local_epochs": s.local_epochs,
            "batch_size": s.batch_size,
            "lr": s.lr,
            "strategy": s.strategy,
            "strategy_params": dict(s.strategy_params),
            "seed": s.seed,
            "mean_selected": self.mean_selected,
            "empty_rounds": self.empty_rounds,
            "dropped_updates": self.dropped_updates,
            "diverged_at": self.diverged_at,
            "clipped_fraction": self.clipped_fraction,
            "median_update_norm": self.median_update_norm,
            "seconds": self.seconds,
            "curve": self.curve,
        }
        return out


# ---------------------------------------------------------------------------------------------------
# The head-only model: the CNN's classifier on fixed backbone features
# ---------------------------------------------------------------------------------------------------


class ClassifierHead(nn.Module):
    """The McMahan CNN's last layer alone, named as in the CNN (``fc2``), fed with its 512-d input features.

    Features are stored as N×512×1×1 so that they fit :class:`ImageDataset` (which wants N×C×H×W).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc2 = nn.Linear(FEATURES, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.flatten(x, 1))


def head_arrays(full: A.ModelArrays) -> A.ModelArrays:
    names = head_parameter_names("cnn")
    return {name: full[name].copy() for name in names}


@torch.inference_mode()
def classifier_inputs(model: nn.Module, dataset: ImageDataset, batch_size: int = 1000) -> ImageDataset:
    """What the CNN feeds its classifier ``fc2`` for every sample (captured with a forward pre-hook)."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = model.get_submodule("fc2").register_forward_pre_hook(lambda _m, args: captured.append(args[0].cpu()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            model(dataset.images[start : start + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    features = torch.cat(captured).reshape(len(dataset), FEATURES, 1, 1).contiguous()
    return ImageDataset(features, dataset.labels.clone(), num_classes=dataset.num_classes)


def check_head_equivalence(backbone: A.ModelArrays, images: ImageDataset, features: ImageDataset, lr: float) -> float:
    """Train the full CNN with only ``fc2`` trainable, and the head alone on the features, from the same start
    with the same seed; return the largest difference between the two updates (it must be float noise)."""
    full = build_model("cnn")
    set_arrays(full, backbone)
    start = get_arrays(full)
    names = head_parameter_names("cnn")
    train_local(full, images, epochs=1, batch_size=20, lr=lr, trainable=names, seed=5)
    full_update = A.subtract(get_arrays(full), start)
    head = ClassifierHead()
    set_arrays(head, head_arrays(start))
    train_local(head, features, epochs=1, batch_size=20, lr=lr, seed=5)
    head_update = A.subtract(get_arrays(head), head_arrays(start))
    frozen = max(float(np.abs(v).max()) for k, v in full_update.items() if k not in names)
    if frozen != 0.0:
        raise AssertionError(f"the frozen backbone moved by {frozen} in trainable=fc2 training")
    return max(float(np.abs(full_update[k] - head_update[k]).max()) for k in names)


# ---------------------------------------------------------------------------------------------------
# The world: data, partitions, the public backbone
# ---------------------------------------------------------------------------------------------------


@dataclass
class World:
    """The devices' data (MNIST training split), the evaluation images and, for ``head``, the backbone."""

    train_images: ImageDataset
    eval_images: ImageDataset
    public_description: str
    eval_description: str
    backbone: A.ModelArrays | None = None
    public_accuracy: float | None = None  # the pretrained CNN with its own (public) classifier, on the eval set
    train_features: ImageDataset | None = None
    eval_features: ImageDataset | None = None
    head_check: float | None = None

    def __post_init__(self) -> None:
        self._parts: dict[tuple[int, str, int], list[np.ndarray]] = {}

    def parts(self, devices: int, spec: str, seed: int) -> list[np.ndarray]:
        key = (devices, spec, seed)
        if key not in self._parts:
            self._parts[key] = partition(self.train_images.labels.numpy(), spec, devices, seed)
        return self._parts[key]

    def data_for(self, model: str) -> tuple[ImageDataset, ImageDataset]:
        if model == "cnn":
            return self.train_images, self.eval_images
        assert self.train_features is not None and self.eval_features is not None
        return self.train_features, self.eval_features


def load_world(args: argparse.Namespace, models: Sequence[str], torch_device: torch.device) -> World:
    mnist = resolve_data_dir(args.data_dir, "mnist")
    train = load_dataset("mnist", mnist, train=True)
    test = load_dataset("mnist", mnist, train=False)
    if args.public == "mnist-test-half":
        if not 0 < args.public_size <= 5000:
            raise SystemExit("--public-size must be in 1..5000 (the first half of the test split)")
        public = test.subset(np.arange(0, args.public_size))
        evaluation = test.subset(np.arange(5000, len(test)))
        public_text = (
            f"MNIST test split, images 0-{args.public_size - 1} (from the first half, which LeCun et al. "
            "drew from NIST's SD-3, the cleaner writers)"
        )
        eval_text = "MNIST test split, images 5000-9999 (the second half, from SD-1, the harder one)"
    else:
        fashion = resolve_data_dir(args.fashion_dir, "fashion-mnist", split="train", flag_name="--fashion-dir")
        public = load_dataset("fashion-mnist", fashion, train=True)
        evaluation = test
        public_text = "Fashion-MNIST training split, all 60,000 images (another domain: clothes, not digits)"
        eval_text = "MNIST test split, all 10,000 images"
    world = World(train, evaluation, public_text, eval_text)
    if "head" not in models:
        return world

    cache = None if args.no_cache else Path(args.cache_dir)
    recipe: list[Any] = [args.public, args.pretrain_epochs, args.pretrain_lr, args.seed, torch.__version__]
    if args.public == "mnist-test-half" and args.public_size != 5000:
        recipe.append(args.public_size)
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    path = cache / f"backbone-{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        backbone = {k: np.asarray(v, dtype=np.float32) for k, v in load_state(path)["backbone"].items()}
        print(f"backbone: loaded {path}", file=sys.stderr)
    else:
        model = build_model("cnn", seed=args.seed + 1000).to(torch_device)
        started = time.perf_counter()
        result = train_local(
            model, public, epochs=args.pretrain_epochs, batch_size=50, lr=args.pretrain_lr, momentum=0.9, seed=args.seed
        )
        print(
            f"backbone: pretrained on {len(public)} public images, {args.pretrain_epochs} epochs, "
            f"loss {result.loss:.4f}, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
        backbone = get_arrays(model)
        if path is not None:
            save_state(path, {"backbone": backbone, "recipe": recipe})
    model = build_model("cnn").to(torch_device)
    set_arrays(model, backbone)
    world.backbone = backbone
    world.public_accuracy, _ = evaluate(model, evaluation)
    started = time.perf_counter()
    features_path = cache / f"features-{key}.npz" if cache is not None else None
    if features_path is not None and features_path.exists():
        saved = load_state(features_path)
        world.train_features = ImageDataset(torch.from_numpy(saved["train"]), train.labels.clone())
        world.eval_features = ImageDataset(torch.from_numpy(saved["eval"]), evaluation.labels.clone())
    else:
        world.train_features = classifier_inputs(model, train)
        world.eval_features = classifier_inputs(model, evaluation)
        if features_path is not None:
            save_state(
                features_path,
                {"train": world.train_features.images.numpy(), "eval": world.eval_features.images.numpy()},
            )
    print(
        f"features: {len(train) + len(evaluation)} images in {time.perf_counter() - started:.0f} s; "
        f"public-only CNN accuracy {world.public_accuracy:.4f}",
        file=sys.stderr,
    )
    sample = np.arange(60)
    world.head_check = check_head_equivalence(
        backbone, train.subset(sample), world.train_features.subset(sample), lr=args.lr_head
    )
    print(f"head-only training == full CNN with trainable=fc2: max difference {world.head_check:.2e}", file=sys.stderr)
    if world.head_check > 1e-4:
        raise SystemExit("the head-only shortcut does not match train_local(trainable=fc2); results would be wrong")
    return world


# ---------------------------------------------------------------------------------------------------
# One federated run
# ---------------------------------------------------------------------------------------------------


def initial_arrays(setting: Setting) -> A.ModelArrays:
    fresh = get_arrays(build_model("cnn", seed=setting.seed))
    # head: a fresh classifier as build_model initialises it; the pretrained backbone's own classifier (trained
    # on the public slice) is NOT reused, so every bit of accuracy above chance in fc2 comes from the devices.
    return fresh if setting.model == "cnn" else head_arrays(fresh)


def simulate(
    setting: Setting,
    world: World,
    torch_device: torch.device,
    eval_every: int,
    progress: Callable[[str], None],
    uplink: str = UPLINK,
) -> Outcome:
    s = setting
    train, evaluation = world.data_for(s.model)
    parts = world.parts(s.devices, s.partition, s.seed)
    device_ids = [f"d{i:04d}" for i in range(s.devices)]
    local_data = [train.subset(p) for p in parts]
    model: nn.Module = (build_model("cnn") if s.model == "cnn" else ClassifierHead()).to(torch_device)
    global_arrays = initial_arrays(s)
    manifest = A.manifest_of(global_arrays)
    strategy = build_strategy(s.strategy, **dict(s.strategy_params))
    codec = CodecSpec.parse(uplink)
    m = s.expected_updates
    # Reproducible draws for a benchmark. The real coordinator and devices draw from the OS's CSPRNG
    # (secure_rng / secure_generator); the distributions are the same.
    rng = np.random.default_rng([s.seed, 1])
    noise_generator = torch.Generator()
    noise_generator.manual_seed(s.seed * 7919 + 17)
    policy: RoundPrivacy | None = None
    announcement = None
    per_device_std = 0.0
    if s.private:
        check_dp_compatible(s.strategy, s.mode)
        policy = RoundPrivacy(
            mode=s.mode, clip=s.clip, noise_multiplier=s.sigma, sample_rate=s.q, expected_updates=m, delta=DELTA
        )
        per_device_std = policy.plan().device_noise_std
        announcement = DPAnnouncement(mode=s.mode, clip=s.clip, noise_std=per_device_std)  # type: ignore[arg-type]
    accountant = policy.accountant if policy is not None else None

    started = time.perf_counter()
    curve: list[tuple[int, float]] = []
    selected_total = 0
    empty = 0
    norms: list[float] = []
    dropped = 0
    diverged_at: int | None = None
    rounds_run = 0
    accuracy = loss = float("nan")
    for round_number in range(1, s.rounds + 1):
        rounds_run = round_number
        selected = poisson_select(device_ids, s.q, rng)
        selected_total += len(selected)
        if not selected:
            empty += 1
            if policy is not None:
                policy.record_empty_draw()  # as the coordinator charges it
            continue
        strategy.begin_round(global_arrays)
        for device in selected:
            index = int(device[1:])
            set_arrays(model, global_arrays)
            try:
                result = train_local(
                    model,
                    local_data[index],
                    epochs=s.local_epochs,
                    batch_size=s.batch_size,
                    lr=s.lr,
                    seed=(s.seed * 1_000_003 + round_number * 10_007 + index) % 2**31,
                )
            except TrainingDiverged:
                dropped += 1  # a real device sends nothing (and the round goes on without it)
                continue
            update = A.subtract(get_arrays(model), global_arrays)
            if s.private:
                update, norm = clip_and_noise(update, clip=s.clip, noise_std=per_device_std, generator=noise_generator)
                norms.append(norm)
            frame = encode_frame(
                update,
                kind=FrameKind.UPDATE,
                job="privacy-benchmark",
                round=round_number,
                sender=device,
                codec=codec,
                num_samples=result.num_samples,
                dp=announcement,
            )
            received = decode_frame(frame, expected_manifest=manifest).arrays
            strategy.add(received, policy.update_weight if policy is not None else float(result.num_samples))
        if strategy.count == 0:
            # Every selected device diverged: the global model no longer trains (the coordinator would fail the
            # round, unaccounted, and retry it forever). Record where it happened and stop.
            diverged_at = round_number
            rounds_run = round_number - 1  # the rounds that were aggregated (or charged as empty draws)
            progress(f"  {s.label()}: every selected device diverged in round {round_number}; stopping the run")
            break
        if policy is not None:
            k = strategy.count
            noise = policy.server_noise(k, global_arrays, generator=noise_generator)
            global_arrays = strategy.aggregate(denominator=policy.denominator, noise=noise)
            policy.record_round(k)
        else:
            global_arrays = strategy.aggregate()
        if round_number % eval_every == 0 or round_number == s.rounds:
            set_arrays(model, global_arrays)
            accuracy, loss = evaluate(model, evaluation)
            curve.append((round_number, round(accuracy, 4)))
            eps = f" ε {accountant.epsilon:.2f}" if accountant is not None else ""
            progress(
                f"  {s.label()}: round {round_number}/{s.rounds} accuracy {accuracy:.4f}{eps} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    if not curve or curve[-1][0] != rounds_run:  # the last rounds were empty draws or the run diverged
        set_arrays(model, global_arrays)
        accuracy, loss = evaluate(model, evaluation)
        curve.append((rounds_run, round(accuracy, 4)))
    return Outcome(
        setting=s,
        rounds_run=rounds_run,
        epsilon=accountant.epsilon if accountant is not None else None,
        epsilon_participation_known=accountant.epsilon_participation_known if accountant is not None else None,
        delta=DELTA if accountant is not None else None,
        accuracy=accuracy,
        loss=loss,
        curve=curve,
        mean_selected=selected_total / s.rounds,
        empty_rounds=empty,
        dropped_updates=dropped,
        diverged_at=diverged_at,
        clipped_fraction=float(np.mean(np.asarray(norms) > s.clip)) if norms else None,
        median_update_norm=float(np.median(norms)) if norms else None,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------------------------------------------
# The sweep, the table, the JSON
# ---------------------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> list[Setting]:
    params = tuple(sorted(parse_strategy_params(args.strategy_params).items()))
    out: list[Setting] = []
    for model in args.models:
        per_model = {
            "cnn": (args.rounds_cnn, args.clip_cnn, args.lr_cnn, args.batch_size_cnn),
            "head": (args.rounds_head, args.clip_head, args.lr_head, args.batch_size_head),
        }
        rounds, clip, lr, batch = per_model[model]
        populations = args.devices_cnn if model == "cnn" and args.devices_cnn else args.devices
        for devices, spec, seed in itertools.product(populations, args.partitions, args.seeds):
            base = Setting(
                model=model,
                devices=devices,
                partition=spec,
                mode="off",
                sigma=0.0,
                clip=clip,
                q=args.q,
                rounds=rounds,
                local_epochs=args.local_epochs,
                batch_size=batch,
                lr=lr,
                strategy=args.strategy,
                strategy_params=params,
                seed=seed,
            )
            if not args.no_baseline:
                out.append(base)
            sigmas = args.sigmas or [sigma_for(eps, args.q, rounds) for eps in args.epsilons]
            for mode, sigma in itertools.product(args.modes, sigmas):
                out.append(replace(base, mode=mode, sigma=sigma))
    return out


def sigma_for(target_epsilon: float, q: float, rounds: int) -> float:
    """The smallest σ (opacus's search, rounded up to 3 decimals) with ε ≤ target after ``rounds`` full rounds."""
    return math.ceil(noise_multiplier_for_budget(target_epsilon, DELTA, q, rounds) * 1000) / 1000


def format_table(records: list[dict[str, Any]]) -> str:
    baselines = {
        (r["model"], r["devices"], r["partition"], r["rounds_planned"], r["seed"]): r["accuracy"]
        for r in records
        if r["mode"] == "off"
    }
    header = (
        f"{'model':5} {'N':>5} {'partition':13} {'mode':8} {'σ':>5} {'C':>6} {'q':>5} {'rounds':>6} "
        f"{'ε':>7} {'δ':>7} {'accuracy':>8} {'non-DP':>7} {'seed':>4} {'s':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        eps = "∞" if r["mode"] == "off" else f"{r['epsilon']:.2f}"
        delta = "-" if r["delta"] is None else f"{r['delta']:.0e}"
        base = baselines.get((r["model"], r["devices"], r["partition"], r["rounds_planned"], r["seed"]))
        rounds = f"{r['rounds']}" + ("†" if r["diverged_at"] is not None else "")
        lines.append(
            f"{r['model']:5} {r['devices']:>5} {r['partition']:13} {r['mode']:8} {r['sigma']:>5g} "
            f"{(r['clip'] or 0):>6g} {r['q']:>5g} {rounds:>6} {eps:>7} {delta:>7} {r['accuracy']:>8.4f} "
            f"{'' if base is None else f'{base:.4f}':>7} {r['seed']:>4} {r['seconds']:>6.0f}"
        )
    if any(r["diverged_at"] is not None for r in records):
        lines.append(
            "† the run stopped after these rounds: every device selected for the next one diverged in training"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced sweep that finishes in minutes on 2 CPU cores")
    p.add_argument("--data-dir", help="directory with the MNIST IDX files")
    p.add_argument("--fashion-dir", help="directory with the Fashion-MNIST IDX files (for --public fashion-mnist)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "privacy.json")
    p.add_argument("--device", default="cpu", help="torch device for training and evaluation: cpu, cuda, cuda:1")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the head's small tensors gain nothing from more, and 2 spin-wait badly on a "
        "busy machine; try 2+ for cnn on an idle one)",
    )
    p.add_argument("--models", nargs="+", choices=["cnn", "head"], default=["head", "cnn"])
    p.add_argument("--devices", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--devices-cnn", nargs="+", type=int, default=None, help="populations for cnn (default --devices)")
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet:0.5"])
    p.add_argument("--modes", nargs="+", choices=["device", "central"], default=["device", "central"])
    p.add_argument(
        "--epsilons",
        nargs="+",
        type=float,
        default=[8.0, 3.0, 2.0],
        help="target ε values: each run's σ is the smallest that keeps ε below it after its rounds",
    )
    p.add_argument(
        "--sigmas", nargs="+", type=float, default=None, help="noise multipliers to use instead of --epsilons"
    )
    p.add_argument("--q", type=float, default=0.1, help="Poisson sampling rate of devices per round")
    p.add_argument("--rounds-head", type=int, default=50)
    p.add_argument("--rounds-cnn", type=int, default=100)
    p.add_argument("--clip-head", type=float, default=1.0)
    p.add_argument("--clip-cnn", type=float, default=1.0)
    p.add_argument("--lr-head", type=float, default=0.5)
    p.add_argument("--lr-cnn", type=float, default=0.1)
    p.add_argument("--batch-size-head", type=int, default=20)
    p.add_argument("--batch-size-cnn", type=int, default=50)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--strategy", default="fedavgm", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"])
    p.add_argument("--strategy-params", default="server_lr=1.0,momentum=0.9", help="e.g. server_lr=1.0,momentum=0.9")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-private runs")
    p.add_argument(
        "--public",
        choices=["mnist-test-half", "fashion-mnist"],
        default="mnist-test-half",
        help="the public slice the head model's backbone is pretrained on",
    )
    p.add_argument(
        "--public-size",
        type=int,
        default=5000,
        help="mnist-test-half: pretrain on the first this many test images (at most 5000)",
    )
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--pretrain-lr", type=float, default=0.02)
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")) + "/fedmqtt/privacy-benchmark",
        help="where the pretrained backbone is kept between runs",
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run this many configurations at once in separate processes (each with --threads threads)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the backbone pretraining")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the runs (init, selection, noise)")
    p.add_argument("--uplink", default=UPLINK, help="the devices' update codec (default int8, as deployed)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: skip the remaining runs once this much time has passed (they are listed as skipped)",
    )
    return p


QUICK = {
    "models": ["head", "cnn"],
    "devices": [100, 1000],
    "partitions": ["iid"],
    "modes": ["device", "central"],
    "epsilons": [8.0],
    "rounds_head": 20,
    "rounds_cnn": 2,
    "devices_cnn": [100],
}


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--quick replaces the sweep's defaults (flags given explicitly still win)."""
    for name, value in QUICK.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


_WORKER_WORLD: World | None = None


def _start_worker(args: argparse.Namespace) -> None:
    global _WORKER_WORLD
    torch.set_num_threads(args.threads)
    _WORKER_WORLD = load_world(args, args.models, torch.device(args.device))  # from the cache the parent filled


def _run_in_worker(setting: Setting, device: str, eval_every: int, uplink: str) -> Outcome:
    assert _WORKER_WORLD is not None
    return simulate(setting, _WORKER_WORLD, torch.device(device), eval_every, _progress, uplink)


def run_in_workers(args: argparse.Namespace, settings: list[Setting], write: Callable[[bool], None]) -> list[Outcome]:
    """Independent runs in ``args.workers`` processes (spawned: safe with CUDA), results in the sweep's order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if args.no_cache and "head" in args.models:
        raise SystemExit("--workers needs the cache (each worker loads the pretrained backbone from it)")
    done: dict[int, Outcome] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_start_worker, initargs=(args,)) as pool:
        futures = {
            pool.submit(_run_in_worker, s, args.device, args.eval_every, args.uplink): i for i, s in enumerate(settings)
        }
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            print(f"[{len(done)}/{len(settings)}] done: {settings[futures[future]].label()}", file=sys.stderr)
    return [done[i] for i in sorted(done)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        apply_quick(args, parser)
        R.quick_json(args, parser)
    torch.set_num_threads(args.threads)
    torch_device = torch.device(args.device)
    began = time.perf_counter()
    world = load_world(args, args.models, torch_device)
    settings = settings_from(args)
    print(f"{len(settings)} runs", file=sys.stderr)
    outcomes: list[Outcome] = []
    skipped: list[dict[str, Any]] = []

    def document(complete: bool) -> dict[str, Any]:
        return {
            "benchmark": "fedmqtt client-level DP (DP-FedAvg) on MNIST, simulated in process with fedmqtt's pieces",
            "command": " ".join(["benchmarks/privacy.py", *(argv if argv is not None else sys.argv[1:])]),
            "complete": complete,
            "quick": args.quick,
            "goal": GOAL,
            "anchors": list(ANCHORS),
            "delta": DELTA,
            "uplink": args.uplink,
            "public_slice": world.public_description if "head" in args.models else None,
            "evaluation_set": world.eval_description,
            "public_only_accuracy": world.public_accuracy,
            "pretrain": {"epochs": args.pretrain_epochs, "lr": args.pretrain_lr, "momentum": 0.9, "batch_size": 50},
            "head_equivalence_max_difference": world.head_check,
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "device": str(torch_device),
                "threads": args.threads,
                "cpus": os.cpu_count(),
            },
            "seconds": time.perf_counter() - began,
            "records": [o.record() for o in outcomes],
            "skipped": skipped,
        }

    def write(complete: bool) -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document(complete), indent=1, allow_nan=False) + "\n")

    if args.workers > 1:
        outcomes.extend(run_in_workers(args, settings, write))
    else:
        for i, setting in enumerate(settings, 1):
            if args.time_budget is not None and time.perf_counter() - began > args.time_budget:
                skipped.append({"label": setting.label(), **asdict(setting)})
                continue
            print(f"[{i}/{len(settings)}] {setting.label()}", file=sys.stderr)
            outcomes.append(simulate(setting, world, torch_device, args.eval_every, _progress, args.uplink))
            write(complete=False)  # partial results survive an interrupted sweep
    write(complete=True)
    print(format_table([o.record() for o in outcomes]))
    for anchor in ANCHORS:
        print(f"anchor: {anchor['source']}: {anchor['accuracy']:.1%} at ε={anchor['epsilon']:g}, δ={anchor['delta']:g}")
    if world.public_accuracy is not None:
        print(f"reference: the pretrained CNN with its public classifier: {world.public_accuracy:.4f}")
    if skipped:
        print(f"skipped (time budget): {len(skipped)} runs", file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
