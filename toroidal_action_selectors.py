"""Action selectors for the toroidal dot: constant, repeating sequence and seeded random.

Every selector has one signature, ``selector(observation, action_space) -> action dict``, so a recording
loop (and the world model) can swap them freely. Patterns name the sequences the recording CLI offers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from toroidal_dot_robot import action_dict

# -----------------------------------------------------------------------------
# constants

ActionDict = dict[str, int]
ActionSelector = Callable[[Any, Sequence[ActionDict]], ActionDict]

SEQUENCE_ALWAYS_MOVE = [1]  # move right every step
SEQUENCE_ALWAYS_STAY = [0]  # never move
SEQUENCE_ALTERNATE = [0, 1]  # stay, move, stay, move, ...
SEQUENCE_DOUBLE_MOVE = [1, 1, 0]  # move, move, stay
SEQUENCE_TRIPLE_MOVE = [1, 1, 1, 0]  # move, move, move, stay

PATTERNS: dict[str, list[int]] = {
    "always_move": SEQUENCE_ALWAYS_MOVE,
    "always_stay": SEQUENCE_ALWAYS_STAY,
    "alternate": SEQUENCE_ALTERNATE,
    "double_move": SEQUENCE_DOUBLE_MOVE,
    "triple_move": SEQUENCE_TRIPLE_MOVE,
}
RANDOM_PATTERN = "random"  # uniform over the action space, seeded
PATTERN_NAMES: tuple[str, ...] = (*PATTERNS, RANDOM_PATTERN)


# -----------------------------------------------------------------------------
# selectors


def create_constant_action_selector(action: ActionDict | int) -> ActionSelector:
    """Return a selector that always chooses ``action``.

    Args:
        action: an action dict such as ``{'action': 1}`` or a bare int.

    Raises:
        ValueError: not a toroidal dot action (``toroidal_dot_robot.parse_action``).
    """
    chosen = action_dict(action)

    def select(observation: Any, action_space: Sequence[ActionDict]) -> ActionDict:
        return dict(chosen)  # a copy, so a caller mutating it cannot change the next choice

    return select


def create_sequence_action_selector(sequence: Sequence[int]) -> ActionSelector:
    """Return a selector that cycles through ``sequence``, one entry per call, as ``{'action': a}``.

    Args:
        sequence: a non-empty list of action values, e.g. ``SEQUENCE_ALTERNATE``.

    Raises:
        ValueError: an empty sequence, or an entry that is not a toroidal dot action.
    """
    actions = [action_dict(a) for a in sequence]
    if not actions:
        raise ValueError("An action sequence needs at least one action")
    position = 0

    def select(observation: Any, action_space: Sequence[ActionDict]) -> ActionDict:
        nonlocal position
        chosen = actions[position]
        position = (position + 1) % len(actions)
        return dict(chosen)

    return select


def create_random_action_selector(seed: int | None = None) -> ActionSelector:
    """Return a selector choosing uniformly from the action space with its own numpy Generator.

    Args:
        seed: seeds the selector's ``np.random.default_rng``; the same seed gives the same choices.
    """
    rng = np.random.default_rng(seed)

    def select(observation: Any, action_space: Sequence[ActionDict]) -> ActionDict:
        if len(action_space) == 0:
            raise ValueError("Cannot choose an action from an empty action space")
        return dict(action_space[int(rng.integers(len(action_space)))])

    return select


def make_selector(pattern: str, seed: int | None = None) -> ActionSelector:
    """Return the selector for a named pattern.

    Args:
        pattern: one of ``PATTERN_NAMES``: a key of ``PATTERNS`` or ``'random'``.
        seed: seeds the random pattern; the sequences ignore it.

    Raises:
        ValueError: for an unknown pattern, listing the known ones.
    """
    if pattern == RANDOM_PATTERN:
        return create_random_action_selector(seed)
    if pattern not in PATTERNS:
        raise ValueError(f"Unknown pattern {pattern!r}: choose one of {', '.join(PATTERN_NAMES)}")
    return create_sequence_action_selector(PATTERNS[pattern])
