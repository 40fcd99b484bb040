"""Optional dependencies: one place that imports them and says which extra to install when one is missing.

``pip install fedmqtt`` is what a device needs (torch, numpy, paho-mqtt, zstandard, pydantic). Everything else
is an extra declared in pyproject.toml:

- ``dp``: opacus (and scipy through it): the privacy accountant of a DP coordinator, a device's
  ``--privacy-budget`` ledger.
- ``broker``: amqtt, the embedded pure-Python broker (``fedmqtt broker --embedded``, ``simulate`` without Mosquitto).
- ``sim``: rich and matplotlib: ``fedmqtt simulate``, ``fedmqtt watch``'s live view and ``--once`` snapshot,
  the report plot.
- ``vision``: torchvision, for the ``mobilenet-v3-small`` model and ``fedmqtt predict``'s image decoders.
- ``export``: onnx, onnxscript and onnxruntime: ``fedmqtt export --format onnx`` and ``fedmqtt predict`` of an ONNX
  model.
- ``all``: every one of them.

Code imports an optional package only through :func:`require` (the feature cannot work without it: a missing
package is a :class:`MissingExtra`, which the command line prints as one line) or :func:`optional` (a nicety,
such as a progress bar, that is left out when the package is missing).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fedmqtt.errors import FedmqttError

EXTRAS = ("dp", "broker", "sim", "vision", "export")


class MissingExtra(FedmqttError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""

    def __init__(self, extra: str, module: str, feature: str | None = None) -> None:
        what = f"{feature} needs" if feature else "this needs"
        package = module.split(".")[0]
        super().__init__(
            f"{what} {package}, which is not installed: pip install 'fedmqtt[{extra}]' (or 'fedmqtt[all]')"
        )
        self.extra = extra
        self.module = module
        self.name = package  # ImportError's attribute: the missing top-level module


def _check_extra(extra: str) -> None:
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")


def _missing(exc: ModuleNotFoundError, module: str) -> bool:
    """True when ``exc`` says ``module`` itself (or a package above it) is absent, not one of its own imports."""
    name = exc.name or ""
    return name == module or module.startswith(name + ".")


def require(extra: str, module: str, feature: str | None = None) -> ModuleType:
    """Import and return ``module`` (dotted), or raise :class:`MissingExtra` naming ``extra``.

    ``feature`` (e.g. ``"the embedded broker"``) starts the message. A module that is installed but fails in its
    own imports raises as it would anywhere: that is a broken install, not a missing extra.
    """
    _check_extra(extra)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if _missing(exc, module):
            raise MissingExtra(extra, module, feature) from None
        raise


def optional(extra: str, module: str) -> ModuleType | None:
    """Import and return ``module``, or ``None`` when the package is not installed (a nicety goes without)."""
    try:
        return require(extra, module)
    except MissingExtra:
        return None
