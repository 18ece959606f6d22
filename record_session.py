"""Record a toroidal dot session: observe, act, observe, ... into ``saved/sessions/toroidal_dot/<name>/``.

Usage:
    python record_session.py --pattern alternate --steps 200 --seed 0
    python record_session.py --pattern random --steps 1000 --seed 3 --name my_run --out /tmp/sessions

``--steps N`` records N actions and N + 1 observations. The session folder path is the last line printed
to stdout; errors print one line to stderr and exit non-zero. The app imports ``record_session()`` to
create its demo sessions.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import config
from config import RecordingConfig, ToroidalDotConfig
from recording_robot import RecordingError, RecordingRobot, SessionExistsError, SessionWriter
from toroidal_action_selectors import PATTERN_NAMES, make_selector
from toroidal_dot_robot import ToroidalDotRobot
from validation import whole_number

# -----------------------------------------------------------------------------
# constants

_ENV = ToroidalDotConfig()
_RECORDING = RecordingConfig()
_MAX_NAME_ATTEMPTS = 1000  # suffixes _2, _3, ... tried before giving up on a unique default name
PROGRESS_REPORTS = 4  # progress lines the CLI prints during a recording


# -----------------------------------------------------------------------------
# helpers


def default_session_name(pattern: str, seed: int, now: datetime | None = None) -> str:
    """Return ``toroidal_dot_<pattern>_<YYYYmmdd_HHMMSS>_<seed>``.

    Args:
        pattern: the action pattern name.
        seed: the recording seed.
        now: the time to stamp (defaults to now).
    """
    return f"toroidal_dot_{pattern}_{(now or datetime.now()).strftime('%Y%m%d_%H%M%S')}_{seed}"


def _open_writer(root: Path, name: str | None, pattern: str, seed: int, robot: ToroidalDotRobot,
                 max_bytes: int | None) -> SessionWriter:
    def writer(session_name: str) -> SessionWriter:
        return SessionWriter(
            root, session_name, robot_type=type(robot).__name__, action_space=robot.action_space,
            env_params=robot.params(), pattern=pattern, shard_size=_RECORDING.shard_size,
            max_session_bytes=max_bytes,
        )

    if name is not None:
        return writer(name)  # an explicit name that exists is refused, never reused
    base = default_session_name(pattern, seed)
    for attempt in range(1, _MAX_NAME_ATTEMPTS + 1):
        try:
            return writer(base if attempt == 1 else f"{base}_{attempt}")
        except SessionExistsError:
            continue  # a session recorded in the same second: try the next suffix
    raise RecordingError(f"Could not find a free session name starting with {base!r} in {root}")


# -----------------------------------------------------------------------------
# recording


def record_session(
    pattern: str,
    steps: int,
    seed: int,
    name: str | None = None,
    root: str | os.PathLike | None = None,
    dot_radius: int = _ENV.dot_radius,
    move_pixels: int = _ENV.move_pixels,
    max_bytes: int | None = _RECORDING.max_session_bytes,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Record one session of the toroidal dot and return its folder.

    Args:
        pattern: an action pattern from ``toroidal_action_selectors.PATTERN_NAMES``.
        steps: number of actions (the session holds ``steps + 1`` frames); at least 1.
        seed: seeds the dot's start position and the random pattern.
        name: the session folder name; None picks a unique ``toroidal_dot_<pattern>_<time>_<seed>``.
        root: the sessions folder; defaults to ``config.SESSIONS_ROOT``.
        dot_radius: dot radius in pixels.
        move_pixels: pixels moved right by action 1.
        max_bytes: stop once the session folder would exceed this many bytes; None = no limit.
        progress: called as ``progress(actions_done, steps)`` after each action.

    Returns:
        The session folder.

    Raises:
        ValueError: bad arguments (unknown pattern, steps < 1, bad name).
        RecordingLimitError: ``max_bytes`` reached; the partial session is valid and marked stopped.
        RecordingError: the session exists already or writing failed (e.g. disk full).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    selector = make_selector(pattern, seed)  # validates the pattern before anything touches the disk
    robot = ToroidalDotRobot(dot_radius=dot_radius, move_pixels=move_pixels, seed=seed)
    root = Path(config.SESSIONS_ROOT if root is None else root)
    writer = _open_writer(root, name, pattern, seed, robot, max_bytes)
    # the context manager marks the session stopped (never deleted) on any error or Ctrl-C
    with RecordingRobot(robot, writer) as recorder:
        observation = recorder.get_observation()
        for done in range(1, steps + 1):
            recorder.execute_action(selector(observation, recorder.action_space))
            observation = recorder.get_observation()
            if progress is not None:
                progress(done, steps)
    return writer.path


# -----------------------------------------------------------------------------
# command line


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line to stderr instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(minimum: int, what: str):
    """An argparse type: a whole number >= ``minimum`` (``validation.whole_number``), else a one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = text  # refused below, naming the text
        try:
            return whole_number(value, what, minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


_positive_int = _int_at_least(1, "the value")
_non_negative_int = _int_at_least(0, "the value")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``record_session.py``."""
    parser = _OneLineParser(prog="record_session.py", description="Record a toroidal dot session.")
    parser.add_argument("--pattern", required=True, choices=PATTERN_NAMES, help="action pattern")
    parser.add_argument("--steps", required=True, type=_positive_int, help="number of actions (frames = steps + 1)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seeds the start position and 'random'")
    parser.add_argument("--name", default=None, help="session folder name (default: toroidal_dot_<pattern>_<time>_<seed>)")
    parser.add_argument("--out", type=Path, default=None, help=f"sessions folder (default: {config.SESSIONS_ROOT})")
    parser.add_argument("--dot-radius", type=_non_negative_int, default=_ENV.dot_radius, help="dot radius in pixels")
    parser.add_argument("--move-pixels", type=_non_negative_int, default=_ENV.move_pixels, help="pixels per move")
    parser.add_argument("--max-bytes", type=_positive_int, default=_RECORDING.max_session_bytes,
                        help="stop before the session folder exceeds this many bytes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recording CLI; return the exit code (0 on success).

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    config.from_env()  # $CWM_SAVED_ROOT moves the default sessions folder
    args = build_parser().parse_args(argv)
    every = max(1, args.steps // PROGRESS_REPORTS)

    def report(done: int, total: int) -> None:
        if done % every == 0 and done < total:
            print(f"recorded {done}/{total} actions", flush=True)

    try:
        path = record_session(
            args.pattern, args.steps, args.seed, name=args.name, root=args.out, dot_radius=args.dot_radius,
            move_pixels=args.move_pixels, max_bytes=args.max_bytes, progress=report,
        )
    except RecordingError as e:
        print(f"record_session.py: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad name or environment parameters
        print(f"record_session.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("record_session.py: interrupted; the partial session is kept and marked stopped", file=sys.stderr)
        return 130
    print(f"recorded {args.steps} actions and {args.steps + 1} frames", flush=True)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
