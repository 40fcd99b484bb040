"""Settings derived from a pydantic model: one field gives a CLI flag, a TOML key and a ``FEDMQTT_*`` variable.

A model's fields (and the fields of nested section models, such as ``CoordinatorConfig.dp``) are the only list of
settings. From each field this module derives

- the flag: ``--`` + the path joined by ``-`` (``dp.clip`` -> ``--dp-clip``), unless :class:`Opt` names another;
- the TOML key: the path joined by ``.`` (``[coordinator.dp] clip = 1.0``; flat ``dp_clip`` / ``dp-clip`` too);
- the environment variable: ``FEDMQTT_`` + the path joined by ``_``, upper case (``FEDMQTT_DP_CLIP``);
- the help text (the field's ``description``), its default, whether it is required, its choices.

Precedence: flags > environment > TOML > the model's defaults. :func:`validate` turns pydantic's errors into one
:class:`SettingsError` that names every bad or missing setting by its flag, all at once.
"""

from __future__ import annotations

import argparse
import enum
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.paths import input_file_problem

ENV_PREFIX = "FEDMQTT_"
#: One megabyte for every size setting (--max-update-mb of the coordinator, --max-packet-mb of the broker).
MB = 1_000_000
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Opt:
    """How one field appears outside Python (attached with :func:`opt`)."""

    flag: str | None = None  # another spelling than the derived one (kept for compatibility)
    group: str | None = None  # argparse group title
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # text of a flag or variable -> value (lists, tables)
    choices: Callable[[], Sequence[str]] | None = None  # computed when needed (registries import torch)
    default_text: str | None = None  # what an unset optional means, for --help and the docs
    section_switch: bool = False  # this field turns its section on; "off" means no section


def opt(**kwargs: Any) -> dict[str, Any]:
    """``Field(json_schema_extra=opt(...))``: attach an :class:`Opt` to a field."""
    return {"fedmqtt": Opt(**kwargs)}


def _opt_of(info: FieldInfo) -> Opt:
    extra = info.json_schema_extra
    found = extra.get("fedmqtt") if isinstance(extra, dict) else None
    return found if isinstance(found, Opt) else Opt()


@dataclass(frozen=True)
class Setting:
    """One leaf field of a settings model, with every name it has outside Python."""

    path: tuple[str, ...]
    info: FieldInfo
    opt: Opt
    section_required: bool = False  # required inside an optional section (needed when the section is on)
    switch_flag: str | None = None  # the flag that turns this field's section on (--dp-mode)

    @property
    def name(self) -> str:
        """The argparse ``dest``: the path joined by ``_`` (``dp_clip``)."""
        return "_".join(self.path)

    @property
    def flag(self) -> str:
        return self.opt.flag or "--" + "-".join(self.path).replace("_", "-")

    @property
    def toml_key(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return ENV_PREFIX + "_".join(self.path).upper()

    @property
    def help(self) -> str:
        return self.info.description or ""

    @property
    def required(self) -> bool:
        return self.info.is_required() and not self.section_required and not self.opt.section_switch

    @property
    def default(self) -> Any:
        if self.info.default_factory is not None:
            return self.info.default_factory()  # type: ignore[call-arg]
        return None if self.info.default is PydanticUndefined else self.info.default

    @property
    def is_bool(self) -> bool:
        return _core_type(self.info.annotation) is bool

    def choices(self) -> Sequence[str] | None:
        if self.opt.choices is not None:
            return _LazyChoices(self.opt.choices)
        return _choices_of(self.info.annotation)

    def default_display(self) -> str:
        """The default as --help and the docs show it."""
        if self.required:
            return "required"
        if self.opt.section_switch:
            return "off"
        if self.section_required:
            return f"required with {self.switch_flag or 'its section'}"
        if self.opt.default_text is not None:
            return self.opt.default_text
        value = self.default
        if value is None:
            return "off"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, enum.Enum):
            return str(value.value)
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, dict | list | tuple) and not value:
            return "none"
        return str(value)

    def parse_text(self, text: str) -> Any:
        """A flag's or variable's text -> a value pydantic validates (it coerces '3' to 3, 'true' to True)."""
        if self.opt.parse is not None:
            return self.opt.parse(text)
        return text


class _LazyChoices(Sequence[str]):
    """argparse choices computed on first use, so ``fedmqtt --help`` does not import torch for a registry."""

    def __init__(self, compute: Callable[[], Sequence[str]]) -> None:
        self._compute = compute
        self._values: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._compute())
        return self._values

    def __getitem__(self, index: Any) -> Any:
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _strip_optional(typing.get_args(annotation)[0])
    return annotation


def _core_type(annotation: Any) -> Any:
    return _strip_optional(annotation)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    core = _strip_optional(annotation)
    return core if isinstance(core, type) and issubclass(core, BaseModel) else None


def _choices_of(annotation: Any) -> tuple[str, ...] | None:
    core = _strip_optional(annotation)
    if typing.get_origin(core) is Literal:
        return tuple(str(a.value if isinstance(a, enum.Enum) else a) for a in typing.get_args(core))
    if isinstance(core, type) and issubclass(core, enum.Enum):
        return tuple(str(m.value) for m in core)
    return None


def settings_of(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[Setting]:
    """Every leaf setting of ``model``, nested sections flattened, in declaration order."""
    out: list[Setting] = []
    for name, info in model.model_fields.items():
        section = _section_model(info.annotation)
        if section is not None:
            inner = settings_of(section, (*prefix, name))
            switch = next((s.flag for s in inner if s.opt.section_switch), None)
            for s in inner:
                out.append(Setting(s.path, s.info, s.opt, section_required=s.info.is_required(), switch_flag=switch))
            continue
        out.append(Setting((*prefix, name), info, _opt_of(info)))
    return out


# ---------------------------------------------------------------------------------------------------
# Sources: flags, environment, TOML
# ---------------------------------------------------------------------------------------------------


def add_flags(
    parser: argparse.ArgumentParser,
    settings: Iterable[Setting],
    *,
    help_override: Mapping[str, str] | None = None,
    default_override: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per setting (dest = ``setting.name``, default None = not given). Help shows the default;
    required flags are marked. Groups follow ``Opt.group``."""
    groups: dict[str | None, Any] = {None: parser}
    for s in settings:
        group_name = s.opt.group
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        text = (help_override or {}).get(s.name, s.help).replace("%", "%%")
        shown = (default_override or {}).get(s.name, s.default_display())
        suffix = "required" if shown == "required" else f"default: {shown}".replace("%", "%%")
        choices = s.choices()
        if choices is not None and s.opt.choices is not None:
            text = f"{text}; one of %(choices)s" if text else "one of %(choices)s"
        kwargs: dict[str, Any] = {"dest": s.name, "default": None, "help": f"{text} ({suffix})" if text else suffix}
        if s.is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = s.opt.metavar or (None if choices is not None else _metavar(s))
            if choices is not None:
                kwargs["choices"] = choices
        target.add_argument(s.flag, **kwargs)


def _metavar(s: Setting) -> str:
    core = _core_type(s.info.annotation)
    return {int: "N", float: "X", Path: "PATH"}.get(core, s.path[-1].upper())


def from_flags(args: argparse.Namespace, settings: Iterable[Setting]) -> dict[tuple[str, ...], Any]:
    """The settings given as flags (dest = ``setting.name``; flags another module adds count too)."""
    out: dict[tuple[str, ...], Any] = {}
    for s in settings:
        value = getattr(args, s.name, None)
        if value is None:
            continue
        out[s.path] = s.parse_text(value) if isinstance(value, str) else value
    return out


def from_env(env: Mapping[str, str], settings: Iterable[Setting]) -> dict[tuple[str, ...], Any]:
    """The settings given as ``FEDMQTT_*`` variables (an empty variable counts as unset)."""
    out: dict[tuple[str, ...], Any] = {}
    for s in settings:
        text = env.get(s.env)
        if text is None or text == "":
            continue
        try:
            out[s.path] = s.parse_text(text)
        except ConfigError as exc:
            raise SettingsError([(s.env, exc.message)]) from None
    return out


def read_toml(path: Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (or its top level when it has no such table). Raises ConfigError."""
    problem = input_file_problem(path)
    if problem is not None:
        raise ConfigError("--config", f"{path} {problem}")
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", f"{path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not valid TOML: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    found = raw.get(table, raw)
    if not isinstance(found, dict):
        raise ConfigError("--config", f"{path}: '{table}' must be a table ([{table}])")
    return found


def from_toml(table: Mapping[str, Any], settings: Sequence[Setting], where: str) -> dict[tuple[str, ...], Any]:
    """Keys of a TOML table: nested (``[dp] clip``) or flat (``dp_clip``, ``dp-clip``, the flag's name)."""
    by_key: dict[str, Setting] = {}
    for s in settings:
        for key in (s.toml_key, s.name, s.flag[2:], s.flag[2:].replace("-", "_")):
            by_key.setdefault(key.replace("-", "_"), s)
    sections = {s.path[0] for s in settings if len(s.path) > 1}
    out: dict[tuple[str, ...], Any] = {}
    unknown: list[str] = []

    def visit(prefix: str, items: Mapping[str, Any]) -> None:
        for key, value in items.items():
            full = f"{prefix}{key}".replace("-", "_")
            if isinstance(value, dict) and not prefix and full in sections:
                visit(full + ".", value)
                continue
            s = by_key.get(full)
            if s is None:
                unknown.append(f"{prefix}{key}")
                continue
            out[s.path] = value

    visit("", table)
    if unknown:
        raise SettingsError([(f"{where}: {key}", "is not a setting (see docs/configuration.md)") for key in unknown])
    return out


def merge(*sources: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """Nested model input from path -> value sources, the LAST source winning (defaults .. flags)."""
    flat: dict[tuple[str, ...], Any] = {}
    for source in sources:
        flat.update(source)
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


# ---------------------------------------------------------------------------------------------------
# Validation with errors in flag spelling
# ---------------------------------------------------------------------------------------------------


class SettingsError(ConfigError):
    """One or more settings are missing or invalid; ``problems`` lists (flag, message) pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        first_field, first_message = self.problems[0]
        FedmqttError.__init__(self, self._text())
        self.field = first_field
        self.message = first_message if len(self.problems) == 1 else self._text()

    def _text(self) -> str:
        lines = [f"{f}: {m}" if f else m for f, m in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} settings are missing or invalid:\n  " + "\n  ".join(lines)


def flag_spelling(text: str, settings: Iterable[Setting]) -> str:
    """Replace field names (``dp_clip``, ``min_updates``) in a message by their flags (``--dp-clip``)."""
    names: dict[str, str] = {}
    for s in settings:  # only names with an underscore: "strategy" or "model" in a sentence are words
        for name in (s.name, s.flag[2:].replace("-", "_")):
            if "_" in name:
                names[name] = s.flag
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda m: names[m.group(1)], text)


def _explain(error: Mapping[str, Any]) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    given = error.get("input")
    ops = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind == "missing":
        return "required"
    if kind in ops:
        limit = next(iter(ctx.values()), "?")
        return f"must be {ops[kind]} {limit}, got {given!r}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected', '?')}, got {given!r}"
    if kind == "extra_forbidden":
        return "is not a setting"
    if kind == "value_error":
        return str(error.get("msg", "")).removeprefix("Value error, ")
    return f"{error.get('msg', 'invalid')}, got {given!r}"


def validate(
    model: type[M], data: Mapping[str, Any], settings: Sequence[Setting] | None = None, *, context: Any = None
) -> M:
    """``model.model_validate(data)``; every error is reported at once, named by its flag."""
    settings = settings_of(model) if settings is None else settings
    by_path = {s.path: s for s in settings}
    by_name = {s.name: s for s in settings}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error.get("loc", ()))
            message = _explain(error)
            named = re.match(r"^(\w+): (.*)$", message, re.S)
            if not loc and named and named.group(1) in by_name:  # a check across fields names the one it blames
                loc, message = by_name[named.group(1)].path, named.group(2)
            message = flag_spelling(message, settings)
            setting = next((by_path[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in by_path), None)
            if message.startswith("--"):  # a check across settings names the flag it blames itself
                problems.append(("", message))
            elif setting is not None:
                if message == "required" and setting.section_required:
                    message = setting.default_display()
                problems.append((setting.flag, message))
            else:
                problems.append((".".join(loc) or "configuration", message))
        raise SettingsError(problems) from None


def load(
    model: type[M],
    *,
    flags: Mapping[tuple[str, ...], Any] | None = None,
    env: Mapping[str, str] | None = None,
    toml: Path | None = None,
    toml_table: str = "coordinator",
    settings: Sequence[Setting] | None = None,
    env_skip: Iterable[str] = (),
) -> M:
    """Validate ``model`` from its sources: flags > environment (``FEDMQTT_*``) > TOML file > defaults.
    ``env_skip``: settings whose variable the model reads itself (the validation context carries ``env``)."""
    settings = settings_of(model) if settings is None else settings
    environ = os.environ if env is None else env
    file_values = from_toml(read_toml(toml, toml_table), settings, f"--config {toml}") if toml is not None else {}
    skip = set(env_skip)
    env_values = from_env(environ, [s for s in settings if s.name not in skip])
    return validate(model, merge(file_values, env_values, flags or {}), settings, context={"env": environ})


# ---------------------------------------------------------------------------------------------------
# Writing a TOML file (simulate writes the coordinator's job) and the reference table
# ---------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _toml_value(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value)
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: BaseModel, table: str, *, exclude: Iterable[str] = ()) -> str:
    """``[table]`` with every set (non-None) field of ``config``, nested sections as ``[table.section]``."""
    skip = set(exclude)
    data = config.model_dump(mode="python", exclude_none=True)
    head = [f"[{table}]"]
    tails: list[str] = []
    for key, value in data.items():
        if key in skip:
            continue
        if isinstance(value, dict) and _section_model(type(config).model_fields[key].annotation) is not None:
            tails.append(f"\n[{table}.{key}]")
            tails += [f"{k} = {_toml_value(v)}" for k, v in value.items() if f"{key}.{k}" not in skip]
            continue
        head.append(f"{key} = {_toml_value(value)}")
    return "\n".join(head + tails) + "\n"


def reference_table(settings: Iterable[Setting]) -> str:
    """The Markdown table docs/configuration.md holds: flag | TOML key | environment variable | default | meaning."""
    rows = [
        "| flag | TOML key | environment variable | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in settings:
        meaning = s.help.replace("|", "\\|")
        choices = s.choices()
        if choices is not None:
            meaning += f" (one of {', '.join(choices)})"
        rows.append(f"| `{s.flag}` | `{s.toml_key}` | `{s.env}` | {s.default_display()} | {meaning} |")
    return "\n".join(rows) + "\n"
