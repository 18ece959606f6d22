"""The toroidal dot world: a white dot on a black square whose edges wrap around.

The environment behind the robot interface the rest of the explorer expects
(``get_observation()``, ``execute_action(action)``, ``action_space``, ``cleanup()``).
Action 0 keeps the dot where it is; action 1 moves it ``move_pixels`` to the right, wrapping past the
right edge back to the left. The frame is a torus in both directions, so a dot near any edge is drawn
split across the opposite edges. Same seed, same start, same frames.
"""

from __future__ import annotations

from typing import Any, Collection

import numpy as np

from config import ToroidalDotConfig
from validation import is_int, whole_number

# -----------------------------------------------------------------------------
# constants

_DEFAULTS = ToroidalDotConfig()
DOT_COLOUR = (255, 255, 255)  # white dot
STAY, MOVE_RIGHT = 0, 1  # the two action values
ACTION_VALUES = (STAY, MOVE_RIGHT)
ACTION_NAMES = {STAY: "stay", MOVE_RIGHT: "move right"}
ACTION_SPACE: tuple[dict[str, int], ...] = tuple({"action": v} for v in ACTION_VALUES)


# -----------------------------------------------------------------------------
# helpers


def parse_action(action: Any, valid: Collection[int] | None = ACTION_VALUES) -> int:
    """Return the integer value of an action given as a bare int or as an action dict ``{'action': a}``.

    The one action parser of the project: the robot, the selectors, the recorder, the session reader
    and the canvas builder all call it.

    Args:
        action: ``{'action': a}`` (that one key, nothing else) or a bare ``a``; numpy integers are accepted.
        valid: the values allowed, the dot's stay (0) and move right (1) by default; None allows any integer.

    Raises:
        ValueError: ``Invalid action ...`` for a bool, float, string, None, a dict without exactly the key
            ``'action'``, or a value outside ``valid``.
    """
    value = action.get("action") if isinstance(action, dict) and set(action) == {"action"} else action
    # is_int refuses bools (an int subclass): True is not a sensible action
    if is_int(value):
        if valid is None or value in valid:
            return int(value)
    expected = (
        "an integer or {'action': <integer>}" if valid is None
        else " or ".join(f"{{'action': {v}}}" + (f" ({ACTION_NAMES[v]})" if v in ACTION_NAMES else "") for v in valid)
    )
    raise ValueError(f"Invalid action {action!r}: expected {expected}"[:300])


def action_dict(action: Any, valid: Collection[int] | None = ACTION_VALUES) -> dict[str, int]:
    """Return an action as a new plain dict ``{'action': a}`` (the form events and selectors use).

    Args:
        action: as for ``parse_action``.
        valid: as for ``parse_action``.

    Raises:
        ValueError: as for ``parse_action``.
    """
    return {"action": parse_action(action, valid)}


# -----------------------------------------------------------------------------
# environment


class ToroidalDotRobot:
    """A white filled disc on a black ``img_size`` x ``img_size`` RGB frame that wraps at every edge.

    Args:
        img_size: frame height and width in pixels.
        dot_radius: disc radius in pixels; a pixel is white when its toroidal distance to the centre is <= this.
        move_pixels: how far action 1 shifts the dot to the right, in pixels.
        seed: seeds the start position (``np.random.default_rng(seed)``); None draws a fresh one.
        start: optional explicit ``(x, y)`` start position (wrapped into the frame); overrides the seeded draw.
    """

    def __init__(
        self,
        img_size: int = _DEFAULTS.img_size,
        dot_radius: int = _DEFAULTS.dot_radius,
        move_pixels: int = _DEFAULTS.move_pixels,
        seed: int | None = None,
        *,
        start: tuple[int, int] | None = None,
    ) -> None:
        self.img_size = whole_number(img_size, "img_size", 1)
        self.dot_radius = whole_number(dot_radius, "dot_radius", 0)
        self.move_pixels = whole_number(move_pixels, "move_pixels", 0)
        self.seed = None if seed is None else whole_number(seed, "seed", 0)
        if start is None:
            rng = np.random.default_rng(self.seed)
            start = tuple(int(v) for v in rng.integers(0, self.img_size, size=2))
        self._start = (int(start[0]) % self.img_size, int(start[1]) % self.img_size)
        self._x, self._y = self._start
        # pixel coordinates along one axis, reused by every render (the frame is square)
        self._coords = np.arange(self.img_size)  # (N,)

    # ---- robot interface ------------------------------------------------------

    @property
    def action_space(self) -> list[dict[str, int]]:
        """The two actions: ``[{'action': 0}, {'action': 1}]`` (stay, move right); a fresh list each call."""
        return [dict(a) for a in ACTION_SPACE]

    def get_observation(self) -> np.ndarray:
        """Return the current frame as a new uint8 array of shape (img_size, img_size, 3); no side effects."""
        n, r = self.img_size, self.dot_radius
        # toroidal distance along each axis: the shorter way round, so the dot splits across opposite edges
        dx = np.abs(self._coords - self._x)  # (N,)
        dx = np.minimum(dx, n - dx)
        dy = np.abs(self._coords - self._y)  # (N,)
        dy = np.minimum(dy, n - dy)
        inside = dy[:, None] ** 2 + dx[None, :] ** 2 <= r * r  # (H, W) by broadcasting
        frame = np.zeros((n, n, 3), dtype=np.uint8)  # (H, W, 3) black
        frame[inside] = DOT_COLOUR
        return frame

    def execute_action(self, action: dict[str, int] | int) -> None:
        """Apply one action: 0 stays, 1 moves right by ``move_pixels`` (wrapping past the right edge).

        Args:
            action: ``{'action': 0|1}`` or a bare ``0``/``1``.

        Raises:
            ValueError: for any other action; the dot does not move.
        """
        if parse_action(action) == MOVE_RIGHT:
            self._x = (self._x + self.move_pixels) % self.img_size

    def cleanup(self) -> None:
        """Nothing to release; present for the robot interface."""

    # ---- helpers for tests and session metadata ---------------------------------

    def reset(self) -> None:
        """Return the dot to its seeded start position."""
        self._x, self._y = self._start

    def get_position(self) -> tuple[int, int]:
        """Return the dot centre as ``(x, y)`` pixel coordinates (x grows right, y grows down)."""
        return self._x, self._y

    def params(self) -> dict[str, Any]:
        """Return the environment parameters recorded in a session's metadata."""
        return {
            "img_size": self.img_size,
            "dot_radius": self.dot_radius,
            "move_pixels": self.move_pixels,
            "seed": self.seed,
            "start_x": self._start[0],
            "start_y": self._start[1],
        }
