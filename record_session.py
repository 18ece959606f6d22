"""Record a toroidal dot session: observe, act, observe, ... into ``saved/sessions/toroidal_dot/<name>/``.

Usage:
    python record_session.py --pattern alternate --steps 200 --seed 0
    python record_session.py --pattern random --steps 1000 --seed 3 --name my_run --out /tmp/sessions

``--steps N`` records N actions and N + 1 observations. The session folder path is the last line printed
to stdout; errors print one line to stderr and exit non-zero. The app imports ``record_session()`` to
create its demo sessions and to record from the page, where a ``RecordingGate`` decides whether a
recording may start (recordings at once, one per client, a disk budget) and a stop event ends one.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import config
from config import RecordingConfig, ToroidalDotConfig
from recording_robot import RecordingError, RecordingRobot, SessionExistsError, SessionWriter
from session_explorer_lib import MIN_FRAMES  # a stopped recording keeps at least this many frames
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
                 max_bytes: int | None, count_blocks: bool = False) -> SessionWriter:
    def writer(session_name: str) -> SessionWriter:
        return SessionWriter(
            root, session_name, robot_type=type(robot).__name__, action_space=robot.action_space,
            env_params=robot.params(), pattern=pattern, shard_size=_RECORDING.shard_size,
            max_session_bytes=max_bytes, count_blocks=count_blocks,
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
    stop: threading.Event | None = None,
    count_blocks: bool = False,
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
        stop: when set, the recording ends after the current action (once the session has the
            ``MIN_FRAMES`` frames a session needs): the session is kept, valid and marked stopped.
        count_blocks: ``max_bytes`` bounds the disk the session takes (each file in whole file-system
            blocks, as ``du`` counts), not the sum of its files' sizes.

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
    writer = _open_writer(root, name, pattern, seed, robot, max_bytes, count_blocks)
    # the context manager marks the session stopped (never deleted) on any error or Ctrl-C
    with RecordingRobot(robot, writer) as recorder:
        observation = recorder.get_observation()
        for done in range(1, steps + 1):
            if stop is not None and done >= MIN_FRAMES and stop.is_set():
                writer.close("stopped", reason=f"stopped after {done - 1} of {steps} actions")
                break
            recorder.execute_action(selector(observation, recorder.action_space))
            observation = recorder.get_observation()
            if progress is not None:
                progress(done, steps)
    return writer.path


# -----------------------------------------------------------------------------
# recordings a server starts for its clients


BYTES_PER_STEP_ESTIMATE = 8 * 1024  # a PNG frame of the dot and two event lines take about 4 KB; twice that, to be safe
MIN_RECORDING_BYTES = 64 * 1024  # room a recording needs to start (its first frames and the metadata)


class RecordingRefused(Exception):
    """A recording a server will not start now; the message says why in one sentence."""


class RecordingTicket:
    """One running recording of a ``RecordingGate``: its client, the most bytes its session may take
    (``allowance``) and the event that stops it. ``done()`` (when its thread ends) frees its place."""

    def __init__(self, gate: RecordingGate, client: object, allowance: int | None, session: str | None = None):
        self.gate, self.client, self.allowance, self.session = gate, client, allowance, session
        self.stop = threading.Event()
        self._done = False

    def done(self) -> None:
        self.gate._finish(self)

    @property
    def finished(self) -> bool:
        return self._done


class RecordingGate:
    """What a server lets its clients record: at most ``max_running`` recordings at once and one per
    client, and the sessions folder grown by them to at most ``budget_bytes``.

    ``start(client, steps)`` either hands out a ``RecordingTicket`` (its ``allowance`` is the most bytes
    that recording may write: what the steps need, or less when the budget is nearly spent, and the
    recording then stops there, its session kept) or raises ``RecordingRefused``. A ticket keeps its
    place until ``done()``, i.e. until its recording has really ended, not when its client went away.
    What the running recordings may still write counts against the budget.

    Args:
        max_running: recordings at once, all clients together (>= 1).
        budget_bytes: the size the sessions folder may reach through these recordings; 0 refuses every one.
        root: the sessions folder (default: ``config.SESSIONS_ROOT`` when ``start`` is called).
    """

    def __init__(self, max_running: int, budget_bytes: int, root: str | os.PathLike | None = None):
        if max_running < 1 or budget_bytes < 0:
            raise ValueError(f"max_running must be >= 1 and budget_bytes >= 0 (got {max_running}, {budget_bytes})")
        self.max_running, self.budget_bytes, self.root = int(max_running), int(budget_bytes), root
        self._lock = threading.Lock()
        self._running: list[RecordingTicket] = []

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def ticket_of(self, client: object) -> RecordingTicket | None:
        """The running recording of ``client``, or None."""
        with self._lock:
            return next((t for t in self._running if t.client is client), None)

    def start(self, client: object, steps: int, session: str | None = None) -> RecordingTicket:
        """A place for ``client``'s recording of ``steps`` actions, or ``RecordingRefused`` saying why;
        ``session``: the client's connection id, for ``stop_session``."""
        if self.budget_bytes == 0:
            raise RecordingRefused("Recording from the page is turned off on this server (its disk budget, "
                                   "CWM_RECORD_BUDGET_MB, is 0). Record with record_session.py instead.")
        root = Path(config.SESSIONS_ROOT if self.root is None else self.root)
        with self._lock:
            if any(t.client is client for t in self._running):
                raise RecordingRefused("This tab is already recording a session: wait for it to finish, or press "
                                       "Stop to end it (the frames recorded so far are kept).")
            if len(self._running) >= self.max_running:
                raise RecordingRefused(f"{len(self._running)} recordings are already running on this server, the most "
                                       "it runs at once: try again when one has finished.")
            used = folder_bytes(root)
            promised = sum(t.allowance or 0 for t in self._running)
            room = self.budget_bytes - used - promised
            if room < MIN_RECORDING_BYTES:
                running = f" and the recordings running now may add {_mb(promised)}" if promised else ""
                raise RecordingRefused(
                    f"Recording refused: the sessions folder holds {_mb(used)}{running}, and recordings from the page "
                    f"may fill it to {_mb(self.budget_bytes)} (CWM_RECORD_BUDGET_MB). Delete sessions you no longer "
                    "need, or ask the operator to raise the budget.")
            ticket = RecordingTicket(self, client, min(room, steps * BYTES_PER_STEP_ESTIMATE + MIN_RECORDING_BYTES),
                                     session)
            self._running.append(ticket)
            return ticket

    def stop(self, client: object) -> bool:
        """Stop ``client``'s running recording (after its current action); True when there was one."""
        ticket = self.ticket_of(client)
        if ticket is None:
            return False
        ticket.stop.set()
        return True

    def stop_session(self, session: str) -> int:
        """Stop the recordings started for the connection ``session`` (it closed); returns how many."""
        with self._lock:
            tickets = [t for t in self._running if session is not None and t.session == session]
        for ticket in tickets:
            ticket.stop.set()
        return len(tickets)

    def _finish(self, ticket: RecordingTicket) -> None:
        with self._lock:
            ticket._done = True
            if ticket in self._running:
                self._running.remove(ticket)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def folder_bytes(folder: str | os.PathLike) -> int:
    """Disk bytes of the files below ``folder``: each file's allocated blocks (or its size, when larger:
    a sparse file), as ``du`` counts; symlinks are not followed, a missing folder holds 0."""
    total = 0
    stack = [Path(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    st = entry.stat(follow_symlinks=False)
                    total += max(st.st_size, st.st_blocks * 512) if entry.is_file(follow_symlinks=False) else 0
            except OSError:
                continue
    return total


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
