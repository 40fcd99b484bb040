"""``fedmqtt export``: turn a trained model into a file a device runs, optionally pruned and quantised to int8.

Sources: a coordinator's ``--checkpoint-dir`` (the global model of its last checkpoint, read with
:class:`fedmqtt.coordinator.durability.Durability`) or a ``--model-file`` (``fedmqtt pretrain``'s output, a
release, an earlier ``--format state`` export).

Steps, in order, each optional:

- ``--prune AMOUNT``: global magnitude pruning, :func:`torch.nn.utils.prune.global_unstructured` with
  ``L1Unstructured`` over every Conv2d and Linear weight (biases and norm layers are kept), then
  :func:`torch.nn.utils.prune.remove` so the zeros are plain weights.
- ``--int8``: torch's eager-mode quantisation (``torch.ao.quantization``, deprecated in torch 2.14 in favour of
  torchao, which is not a dependency). ``static`` (the default for cnn, seed-cnn and mlp): conv and linear layers
  and the activations between them in int8, activation ranges calibrated on ``--calibration-samples`` images of the
  evaluation set, the current quantised engine (x86/fbgemm here, qnnpack on ARM). ``dynamic`` (the default for
  mobilenet-v3-small, whose squeeze-excitation blocks eager static quantisation cannot convert): Linear weights in
  int8, activations quantised on the fly.

Formats: ``torchscript`` (``torch.jit.trace`` + ``torch.jit.save``, float or int8), ``onnx`` (float: torch's default
``torch.export``-based exporter, which needs onnxscript; int8 static: only the older TorchScript-based exporter can
write quantised operators (QLinearConv, QLinearMatMul), so it is used for that case alone; int8 dynamic cannot be
exported to ONNX and is refused), ``state`` (the project's model file, float32 tensors only: a pruned model is
written with its zeros and ``meta.pruned``; ``--int8 --format state`` is refused, since the model file holds no int8
tensors and dequantised weights would not be what an int8 runtime computes). Every export records the metadata
``fedmqtt predict`` needs (:class:`fedmqtt.predict.ModelMeta`).

The table compares the float32 source ("before", written in the same format to a temporary directory) with the
export ("after", loaded back from disk the way ``predict`` loads it and evaluated): size on disk, size after zstd -3
(pruned zeros show there), parameters, non-zero parameters (of the float weights, before int8) and test accuracy.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmqtt.arrays import ModelArrays
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.predict import FORMATS, ONNX_META_KEY, ModelMeta, load_exported, meta_for

__all__ = [
    "ExportError",
    "ExportReport",
    "ExportRow",
    "Source",
    "export_model",
    "load_source",
    "prune_model",
    "quantise_model",
    "register",
]

Int8Mode = Literal["static", "dynamic"]
# Models whose every layer eager static quantisation converts (functional relu, max-pool and flatten run on
# quantised tensors); the others get dynamic int8.
_STATIC_INT8_MODELS = frozenset({"cnn", "seed-cnn", "mlp"})
DEFAULT_CALIBRATION_SAMPLES = 500
_EVAL_BATCH = 500


class ExportError(FedmqttError):
    """The model cannot be exported as asked."""


@dataclass(frozen=True)
class Source:
    """The float32 model to export and where it came from."""

    model: str
    num_classes: int
    arrays: ModelArrays
    digest: str
    dataset: str | None
    origin: str


def _num_classes_of(model: str, arrays: ModelArrays, path: Path) -> int:
    from fedmqtt.models import model_info

    head = arrays.get(f"{model_info(model).head}.weight")
    if head is None or head.ndim < 1:
        raise ExportError(f"{path}: holds no {model_info(model).head}.weight tensor: it is not a {model} model")
    return int(head.shape[0])


def load_source(checkpoint_dir: Path | None, model_file: Path | None, model: str | None = None) -> Source:
    """The float32 model of a coordinator checkpoint directory or a model file; ``model`` (``--model``) must match."""
    from fedmqtt.checkpoint import CheckpointError
    from fedmqtt.codecs.downlink import arrays_digest
    from fedmqtt.coordinator.durability import Durability
    from fedmqtt.model_file import ModelFile, check_model, load_model_file
    from fedmqtt.models import model_info
    from fedmqtt.paths import input_dir_problem, input_file_problem

    if (checkpoint_dir is None) == (model_file is None):
        raise ConfigError("--checkpoint-dir/--model-file", "name exactly one source of the model")
    if model is not None:
        model_info(model)  # an unknown --model is a ConfigError listing the known ones
    if model_file is not None:
        problem = input_file_problem(model_file)
        if problem is not None:
            raise ConfigError("--model-file", f"{model_file} {problem}")
        held = load_model_file(model_file)
        arrays = check_model(held, model or held.model, path=model_file, num_classes=held.num_classes)
        dataset = held.meta.get("dataset")
        return Source(held.model, held.num_classes, arrays, held.digest, dataset, f"model file {model_file}")
    assert checkpoint_dir is not None
    problem = input_dir_problem(checkpoint_dir)
    if problem is not None:
        raise ConfigError("--checkpoint-dir", f"{checkpoint_dir} {problem}")
    files = Durability(Path(checkpoint_dir))
    path = files.checkpoint_path
    if not path.exists():
        raise ExportError(
            f"--checkpoint-dir {checkpoint_dir} holds no coordinator checkpoint ({path.name}): name the directory "
            "a coordinator ran with --checkpoint-dir, or a model file with --model-file"
        )
    try:
        state = files.load()
    except CheckpointError as exc:
        raise ExportError(f"{path} is not a readable coordinator checkpoint: {exc}") from None
    name, global_arrays = state.get("model"), state.get("global")
    if not isinstance(name, str) or not isinstance(global_arrays, dict) or not global_arrays:
        raise ExportError(f"{path} is damaged: it names no model or holds no global model")
    try:
        model_info(name)
    except ConfigError:
        raise ExportError(f"{path} holds an unknown model {name!r}") from None
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in global_arrays.items()}
    num_classes = _num_classes_of(name, arrays, path)
    held_file = ModelFile(name, num_classes, arrays, arrays_digest(arrays))
    fitted = check_model(held_file, model or name, path=path, num_classes=num_classes)
    opens = state.get("model_round")  # the round this global model opens: it is the result of the rounds before
    after = f"after round {int(opens) - 1}" if isinstance(opens, int) and opens > 1 else "initial model"
    return Source(name, num_classes, fitted, held_file.digest, None, f"coordinator checkpoint {path} ({after})")


# --------------------------------------------------------------------------------------------------
# Pruning and quantisation


def _prunable(model: Any) -> list[tuple[Any, str]]:
    from fedmqtt.pruning import prunable_modules  # the one rule of what is prunable (also the coordinator's)

    return [(m, "weight") for _, m in prunable_modules(model)]


def prune_model(model: Any, amount: float) -> None:
    """Zero the ``amount`` fraction of smallest-magnitude conv/linear weights, over all layers at once; permanent."""
    from torch.nn.utils import prune

    if not 0.0 <= amount < 1.0:
        raise ConfigError("--prune", f"must be in [0, 1), got {amount}")
    targets = _prunable(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch 2.14 warns on every eager-quantisation, quantised-tensor, jit.trace and legacy-ONNX call; the module
    # docstring and the README say which of these paths are deprecated.
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def quantise_model(model: Any, mode: Int8Mode, calibration: Any | None) -> tuple[Any, str]:
    """An int8 copy of ``model`` (eval mode) and the quantised engine it was made for."""
    import torch
    from torch.ao import quantization as tq

    engine = torch.backends.quantized.engine
    with _quiet_deprecations():
        if mode == "dynamic":
            return tq.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8), engine
        if calibration is None or len(calibration) == 0:
            raise ExportError("static int8 needs calibration images: give --eval-data and --calibration-samples > 0")
        wrapped = tq.QuantWrapper(copy.deepcopy(model)).eval()
        wrapped.qconfig = tq.get_default_qconfig(engine)
        prepared = tq.prepare(wrapped)
        with torch.inference_mode():
            for start in range(0, len(calibration), _EVAL_BATCH):
                prepared(calibration[start : start + _EVAL_BATCH])
        return tq.convert(prepared), engine


# --------------------------------------------------------------------------------------------------
# Writing each format


def _example(meta: ModelMeta) -> Any:
    import torch

    return torch.zeros((1, *meta.input_shape), dtype=torch.float32)


def _torchscript_bytes(module: Any, meta: ModelMeta) -> bytes:
    import torch

    with _quiet_deprecations(), torch.no_grad():
        traced = torch.jit.trace(module.eval(), _example(meta), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"fedmqtt.json": meta.to_json()})
    return buffer.getvalue()


def _onnx_bytes(module: Any, meta: ModelMeta) -> bytes:
    import torch

    from fedmqtt.extras import require

    onnx = require("export", "onnx", "ONNX export")
    with tempfile.TemporaryDirectory(prefix="fedmqtt-onnx-") as tmp:
        target = Path(tmp) / "model.onnx"
        with _quiet_deprecations(), contextlib.redirect_stdout(sys.stderr):
            if meta.int8 is None:
                require("export", "onnxscript", "ONNX export")
                torch.onnx.export(
                    module.eval(),
                    (_example(meta),),
                    str(target),
                    dynamo=True,
                    external_data=False,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    module.eval(),
                    (_example(meta),),
                    str(target),
                    dynamo=False,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
        proto = onnx.load(str(target))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, meta.to_json()
    return bytes(proto.SerializeToString())


def _state_bytes(arrays: ModelArrays, meta: ModelMeta) -> bytes:
    from fedmqtt.model_file import save_model_file

    extra: dict[str, Any] = {"dataset": meta.dataset, "exported_by": "fedmqtt export"}
    if meta.pruned is not None:
        extra["pruned"] = meta.pruned
    if meta.source_digest is not None:
        extra["source_digest"] = meta.source_digest
    with tempfile.TemporaryDirectory(prefix="fedmqtt-state-") as tmp:
        target = Path(tmp) / "model.npz"
        save_model_file(target, meta.model, arrays, num_classes=meta.num_classes, meta=extra)
        return target.read_bytes()


def _artifact_bytes(fmt: str, module: Any, meta: ModelMeta) -> bytes:
    from fedmqtt.models import get_arrays

    if fmt == "torchscript":
        return _torchscript_bytes(module, meta)
    if fmt == "onnx":
        return _onnx_bytes(module, meta)
    return _state_bytes(get_arrays(module), meta)


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class ExportRow:
    what: str  # "before" (the float32 source) or "after" (the export)
    format: str
    int8: str | None
    pruned: float | None
    size_bytes: int
    zstd_bytes: int
    parameters: int
    nonzero: int
    prunable_weights: int
    prunable_nonzero: int
    accuracy: float | None


@dataclass(frozen=True)
class ExportReport:
    out: str
    model: str
    num_classes: int
    dataset: str
    source: str
    eval_samples: int
    calibration_samples: int
    before: ExportRow
    after: ExportRow

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _zstd_size(data: bytes) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=3).compress(data))


def _counts(model: Any) -> tuple[int, int, int, int]:
    import torch

    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    weights = [getattr(m, n) for m, n in _prunable(model)]
    return total, nonzero, sum(w.numel() for w in weights), sum(int(torch.count_nonzero(w)) for w in weights)


def _accuracy(logits_of: Any, images: np.ndarray | None, labels: np.ndarray | None) -> float | None:
    if images is None or labels is None:
        return None
    correct = 0
    for start in range(0, len(labels), _EVAL_BATCH):
        logits = logits_of(images[start : start + _EVAL_BATCH])
        correct += int((np.argmax(logits, axis=1) == labels[start : start + _EVAL_BATCH]).sum())
    return correct / len(labels)


# --------------------------------------------------------------------------------------------------
# The whole export


def export_model(
    source: Source,
    out: Path,
    *,
    fmt: str = "torchscript",
    int8: Int8Mode | Literal["auto"] | None = None,
    prune: float | None = None,
    dataset: str | None = None,
    eval_data: str | Path | None = None,
    eval_samples: int | None = None,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    evaluate: bool = True,
) -> ExportReport:
    """Prune and/or quantise ``source`` as asked, write it to ``out`` in ``fmt``, measure before and after."""
    import torch

    from fedmqtt.atomic import PUBLIC, write_atomic
    from fedmqtt.data import IMAGE_SIZE, load_dataset, resolve_data_dir
    from fedmqtt.models import build_model, set_arrays
    from fedmqtt.paths import output_dir_problem
    from fedmqtt.predict import module_logits

    if fmt not in FORMATS:
        raise ConfigError("--format", f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if prune is not None and not 0.0 <= prune < 1.0:
        raise ConfigError("--prune", f"must be in [0, 1), got {prune}")
    mode: Int8Mode | None = None
    if int8 is not None:
        mode = ("static" if source.model in _STATIC_INT8_MODELS else "dynamic") if int8 == "auto" else int8
        if mode == "static" and source.model not in _STATIC_INT8_MODELS:
            raise ConfigError("--int8", f"static int8 cannot convert {source.model} (eager mode); use --int8 dynamic")
        if fmt == "state":
            raise ConfigError(
                "--int8",
                "the state format (a fedmqtt model file) holds float32 tensors only; write an int8 model with "
                "--format torchscript (or onnx), or drop --int8",
            )
        if fmt == "onnx" and mode == "dynamic":
            raise ConfigError(
                "--int8",
                "torch cannot export dynamic int8 (quantize_dynamic) to ONNX; use --format torchscript, or static "
                f"int8 (a {'/'.join(sorted(_STATIC_INT8_MODELS))} model)",
            )
    if calibration_samples < 0:
        raise ConfigError("--calibration-samples", f"must be at least 0, got {calibration_samples}")
    if eval_samples is not None and eval_samples < 1:
        raise ConfigError("--eval-samples", f"must be at least 1, got {eval_samples}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a directory; name the file to write")
    problem = output_dir_problem(out.parent)
    if problem is not None:
        raise ConfigError("--out", f"{out.parent} {problem}")
    dataset = dataset or source.dataset or "mnist"
    meta = meta_for(source.model, source.num_classes, dataset, source_digest=source.digest)
    if meta.input_shape != (1, IMAGE_SIZE, IMAGE_SIZE) and (evaluate or mode == "static"):
        raise ConfigError(
            "--eval-data",
            f"{source.model} takes {'x'.join(map(str, meta.input_shape))} input and the {dataset} test images are "
            f"1x{IMAGE_SIZE}x{IMAGE_SIZE}: export it with --no-eval (and --int8 dynamic)",
        )

    images = labels = None
    if evaluate or mode == "static":
        directory = resolve_data_dir(eval_data, dataset, split="test", flag_name="--eval-data")
        test = load_dataset(dataset, directory, train=False)
        count = len(test) if eval_samples is None else min(eval_samples, len(test))
        images, labels = test.images[:count].numpy(), test.labels[:count].numpy()

    torch.manual_seed(0)
    float_model = build_model(source.model, num_classes=source.num_classes).eval()
    set_arrays(float_model, source.arrays)
    before_counts = _counts(float_model)
    accuracy_before = _accuracy(module_logits(float_model), images, labels) if evaluate else None

    model = copy.deepcopy(float_model)
    if prune is not None:
        prune_model(model, prune)
    after_counts = _counts(model)
    engine = None
    shipped = model
    calibrated = 0
    if mode is not None:
        calibration = None
        if mode == "static" and images is not None:
            calibrated = min(calibration_samples, len(images))
            calibration = torch.from_numpy(images[:calibrated])
        shipped, engine = quantise_model(model, mode, calibration)
    after_meta = meta.model_copy(update={"int8": mode, "quant_engine": engine, "pruned": prune})

    data = _artifact_bytes(fmt, shipped, after_meta)
    write_atomic(out, data, mode=PUBLIC)
    exported = load_exported(out)
    if exported.meta != after_meta or exported.kind != fmt:
        raise ExportError(f"{out} did not read back as written ({exported.kind}, {exported.meta})")
    accuracy_after = _accuracy(exported.logits, images, labels) if evaluate else None
    baseline = data if mode is None and prune is None else _artifact_bytes(fmt, float_model, meta)

    def row(what: str, blob: bytes, counts: tuple[int, int, int, int], acc: float | None, m: ModelMeta) -> ExportRow:
        return ExportRow(what, fmt, m.int8, m.pruned, len(blob), _zstd_size(blob), *counts, acc)

    return ExportReport(
        out=str(out),
        model=source.model,
        num_classes=source.num_classes,
        dataset=dataset,
        source=source.origin,
        eval_samples=0 if labels is None or not evaluate else len(labels),
        calibration_samples=calibrated,
        before=row("before", baseline, before_counts, accuracy_before, meta),
        after=row("after", data, after_counts, accuracy_after, after_meta),
    )


# --------------------------------------------------------------------------------------------------
# Command line


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_table(report: ExportReport) -> str:
    def label(r: ExportRow) -> str:
        parts = ["float32" if r.int8 is None else f"int8 {r.int8}"]
        if r.pruned is not None:
            parts.append(f"pruned {r.pruned:g}")
        return f"{r.what} ({', '.join(parts)})"

    header = ("", "size on disk", "zstd -3", "parameters", "non-zero", "accuracy")
    rows = [
        (
            label(r),
            _mib(r.size_bytes),
            _mib(r.zstd_bytes),
            f"{r.parameters:,}",
            f"{r.nonzero:,}",
            "-" if r.accuracy is None else f"{100 * r.accuracy:.2f} %",
        )
        for r in (report.before, report.after)
    ]
    widths = [max(len(str(line[i])) for line in (header, *rows)) for i in range(len(header))]
    lines = [
        f"{report.model} ({report.source}) -> {report.out} [{report.after.format}]",
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))),
    ]
    for line in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        )
    notes = []
    if report.eval_samples:
        notes.append(f"accuracy on {report.eval_samples:,} {report.dataset} test images")
    if report.calibration_samples:
        notes.append(f"int8 ranges calibrated on the first {report.calibration_samples} of them")
    if report.after.int8 is not None:
        notes.append("counts are of the float weights before int8")
    if notes:
        lines.append("(" + "; ".join(notes) + ")")
    return "\n".join(lines)


def run_export(args: Any) -> int:
    from fedmqtt.model_file import ModelFileError
    from fedmqtt.paths import require_input_dir, require_output_file

    # Cheap checks of the paths first: a bad --out must not cost a model load and an evaluation.
    require_output_file("--out", args.out)
    require_input_dir("--eval-data", args.eval_data)
    try:
        source = load_source(args.checkpoint_dir, args.model_file, args.model)
    except ModelFileError as exc:
        raise ConfigError("--model-file", str(exc)) from None
    report = export_model(
        source,
        args.out,
        fmt=args.format,
        int8=args.int8,
        prune=args.prune,
        dataset=args.dataset,
        eval_data=args.eval_data,
        eval_samples=args.eval_samples,
        calibration_samples=args.calibration_samples,
        evaluate=not args.no_eval,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_table(report))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained model as TorchScript, ONNX or a model file, optionally pruned and int8",
        description="Export the global model of a coordinator checkpoint (or a model file) for devices: "
        "optionally pruned (global L1 magnitude over conv/linear weights, made permanent) and quantised to "
        "int8 (torch.ao.quantization), then written as TorchScript, ONNX or fedmqtt's model file with the "
        "metadata `fedmqtt predict` needs. Prints size on disk, parameters, non-zero parameters and test "
        "accuracy before and after.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint-dir", type=Path, help="a coordinator's --checkpoint-dir (its global model)")
    source.add_argument("--model-file", type=Path, help="a fedmqtt model file (pretrain output, release, export)")
    parser.add_argument("--out", required=True, type=Path, help="the file to write")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="default: %(default)s")
    parser.add_argument("--model", help="refuse a source that holds another model than this one")
    parser.add_argument(
        "--int8",
        nargs="?",
        const="auto",
        choices=("auto", "static", "dynamic"),
        help="quantise to int8: static (conv+linear, calibrated; cnn, seed-cnn, mlp) or dynamic (linear "
        "weights); bare --int8 picks static where it works",
    )
    parser.add_argument("--prune", type=float, metavar="AMOUNT", help="zero this fraction of weights, in [0, 1)")
    parser.add_argument(
        "--dataset", help="the data set the model was trained on (default: the model file's, else mnist)"
    )
    parser.add_argument("--eval-data", help="directory of the test split (default: $FEDMQTT_DATA, else the cache)")
    parser.add_argument("--eval-samples", type=int, help="evaluate on the first N test images (default: all)")
    parser.add_argument(
        "--calibration-samples",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLES,
        help="test images used to calibrate static int8 (default: %(default)s)",
    )
    parser.add_argument("--no-eval", action="store_true", help="measure sizes and counts only, no accuracy")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.set_defaults(func=run_export)
