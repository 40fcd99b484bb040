"""Error feedback: carry what compression dropped into the next update.

Top-k and int8 are lossy. With error feedback the sender keeps the residual ``corrected - transmitted``
and adds it to its next update before encoding, so nothing is lost for good: over any run of updates,
``sum(transmitted) + residual == sum(raw updates)`` (Seide et al. 2014; Karimireddy et al. 2019,
"Error Feedback Fixes SignSGD"). :func:`fedmqtt.codecs.encode_frame` does both steps when given
``feedback=``; the object itself is pure state, so a device can save and restore it between runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmqtt.arrays import ModelArrays, manifest_of
from fedmqtt.codecs.errors import FeedbackError

STATE_FORMAT = 1


class ErrorFeedback:
    """The residual of one sender. Starts empty; :meth:`reset` it when the model architecture changes."""

    def __init__(self) -> None:
        self._residual: ModelArrays | None = None

    @property
    def residual(self) -> ModelArrays | None:
        """A copy of the current residual (None before the first update)."""
        if self._residual is None:
            return None
        return {k: v.copy() for k, v in self._residual.items()}

    def reset(self) -> None:
        self._residual = None

    def apply(self, update: Mapping[str, np.ndarray]) -> ModelArrays:
        """``update + residual`` (a new dict; the residual is unchanged until :meth:`record`)."""
        if self._residual is None:
            return {k: np.array(v, dtype=np.float32) for k, v in update.items()}
        if manifest_of(update) != manifest_of(self._residual):
            raise FeedbackError(
                "the error-feedback residual was kept for tensors "
                f"{_describe(self._residual)} but this update has {_describe(update)}; call reset() "
                "when the model changes"
            )
        # np.asarray again: arithmetic on 0-d arrays returns numpy scalars.
        return {k: np.asarray(np.asarray(v, dtype=np.float32) + self._residual[k]) for k, v in update.items()}

    def record(self, corrected: Mapping[str, np.ndarray], transmitted: Mapping[str, np.ndarray]) -> None:
        """Keep ``corrected - transmitted``: what the receiver did not get this time."""
        if manifest_of(corrected) != manifest_of(transmitted):
            raise FeedbackError("corrected and transmitted updates have different tensors")
        self._residual = {
            k: np.asarray(np.asarray(v, dtype=np.float32) - np.asarray(transmitted[k], dtype=np.float32))
            for k, v in corrected.items()
        }

    def state_dict(self) -> dict[str, object]:
        """``{"format": 1, "residual": None | {name: float32 ndarray}}`` (copies; np.savez-able)."""
        return {"format": STATE_FORMAT, "residual": self.residual}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore a :meth:`state_dict`; nested lists (from JSON) are accepted for the arrays."""
        if not isinstance(state, Mapping) or set(state) != {"format", "residual"}:
            raise FeedbackError("an error-feedback state must be a mapping with keys 'format' and 'residual'")
        if state["format"] != STATE_FORMAT:
            raise FeedbackError(f"unknown error-feedback state format {state['format']!r}; expected {STATE_FORMAT}")
        raw = state["residual"]
        if raw is None:
            self._residual = None
            return
        if not isinstance(raw, Mapping):
            raise FeedbackError("'residual' must be None or a mapping of tensor name to array")
        residual: ModelArrays = {}
        for name, value in raw.items():
            if not isinstance(name, str) or not name:
                raise FeedbackError(f"residual tensor names must be non-empty strings, got {name!r}")
            try:
                array = np.array(value, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise FeedbackError(f"residual {name!r} is not a numeric array: {exc}") from None
            if not np.isfinite(array).all():
                raise FeedbackError(f"residual {name!r} contains NaN or infinity")
            residual[name] = array
        self._residual = residual


def _describe(arrays: Mapping[str, np.ndarray]) -> str:
    items = [f"{k}{tuple(np.shape(v))}" for k, v in arrays.items()]
    shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
    return f"[{shown}]"
