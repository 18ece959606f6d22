"""Recording sessions to disk: ``SessionWriter`` and the ``RecordingRobot`` wrapper.

A session is a folder ``<root>/<session_name>/`` holding (README.md, "Recording sessions", describes it for users):

- ``session_meta.json``: names, action space, times, counts, environment parameters and ``status``;
  always written atomically (temp file in the same folder, flush, fsync, ``os.replace``).
- ``events_shard_NNN.jsonl``: one event a line, ``{"step", "type", "data", "timestamp"}``; every line is
  flushed as soon as it is written, and nothing is buffered beyond one line.
- ``frames/frame_NNNNNN.png``: lossless RGB frames, each fully on disk before the event naming it.

So a recording killed at any instant loads, minus at most a torn last line. The writer only ever creates
files inside a folder it created itself, never overwrites an existing session, and deletes nothing but its
own temp files (and its own still-empty folders when the very first write fails).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from atomic_files import write_atomic
from config import RecordingConfig
from session_explorer_lib import META_FILENAME, check_name
from toroidal_dot_robot import action_dict, parse_action

# -----------------------------------------------------------------------------
# constants

_RECORDING = RecordingConfig()
FORMAT_VERSION = 1  # bump when the on-disk layout changes
FRAMES_DIRNAME = "frames"
SHARD_TEMPLATE = "events_shard_{:03d}.jsonl"
FRAME_TEMPLATE = "frame_{:06d}.{}"
FRAME_FORMATS = {"png": "PNG", "jpg": "JPEG"}  # suffix -> Pillow format; png is lossless, jpg only for old tools
STATUSES = ("recording", "complete", "stopped")
# keys the writer owns; environment parameters may not shadow them
RESERVED_META_KEYS = frozenset(
    {
        "session_name", "robot_type", "action_space", "start_time", "end_time", "total_steps", "shard_size",
        "total_shards", "pattern", "status", "stop_reason", "format_version",
    }
)
# room kept under max_session_bytes for the final metadata rewrite (end time, status, stop reason)
_META_HEADROOM = 1024


# -----------------------------------------------------------------------------
# errors


class RecordingError(RuntimeError):
    """Writing a session failed; what was written before stays a valid (stopped) session.

    Attributes:
        session_dir: the session folder, when one was created.
    """

    def __init__(self, message: str, session_dir: Path | None = None) -> None:
        super().__init__(message)
        self.session_dir = session_dir


class RecordingLimitError(RecordingError):
    """The session folder would grow past ``max_session_bytes``; the recording stopped before that."""


class SessionExistsError(RecordingError, FileExistsError):
    """A session folder of that name already exists; nothing was written."""


# -----------------------------------------------------------------------------
# helpers


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays sneak in from robots and selectors; JSON wants plain Python values
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=False, **kwargs)


def _encode_frame(frame: np.ndarray, suffix: str) -> bytes:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"A frame must be a uint8 array of shape (H, W, 3), got {frame.dtype} {frame.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format=FRAME_FORMATS[suffix])
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# writer


class SessionWriter:
    """Write one session folder, event by event, crash-safely.

    Args:
        root: folder holding sessions; created if missing.
        session_name: the new session's folder name (``session_explorer_lib.check_name``); refused if it exists.
        robot_type: recorded as ``robot_type`` (e.g. ``'ToroidalDotRobot'``).
        action_space: the robot's action dicts (the toroidal dot's 0 and 1), recorded as ``action_space``.
        env_params: environment parameters stored as top-level metadata keys (e.g. ``robot.params()``).
        pattern: the action pattern that drives the recording (``None`` if unknown).
        shard_size: events per ``events_shard_NNN.jsonl`` file.
        max_session_bytes: stop (never delete) before the files written would exceed this many bytes; None = no limit.
        count_blocks: count each file as the whole file-system blocks it takes (what ``du`` shows; a small
            frame file takes a 4 KB block) instead of its size, so ``max_session_bytes`` bounds the disk used.
        frame_format: ``'png'`` (lossless, the default) or ``'jpg'``.
        fsync_frames: also fsync each frame (survives power loss, slower); a flush is always done.

    Raises:
        ValueError: a bad name, setting or action space; nothing is written.
        SessionExistsError: the session folder already exists.
        RecordingError: the folder or its metadata could not be written.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        session_name: str,
        robot_type: str,
        action_space: Sequence[dict[str, Any]],
        env_params: dict[str, Any] | None = None,
        pattern: str | None = None,
        shard_size: int = _RECORDING.shard_size,
        max_session_bytes: int | None = _RECORDING.max_session_bytes,
        frame_format: str = _RECORDING.frame_format,
        fsync_frames: bool = False,
        count_blocks: bool = False,
    ) -> None:
        check_name(session_name, "session", root)
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
        if max_session_bytes is not None and (not isinstance(max_session_bytes, int) or max_session_bytes < 1):
            raise ValueError(f"max_session_bytes must be a positive integer or None, got {max_session_bytes!r}")
        if frame_format not in FRAME_FORMATS:
            raise ValueError(f"frame_format must be one of {sorted(FRAME_FORMATS)}, got {frame_format!r}")
        env_params = dict(env_params or {})
        clashes = RESERVED_META_KEYS.intersection(env_params)
        if clashes:
            raise ValueError(f"env_params may not set metadata keys {sorted(clashes)}")

        self.root = Path(root)
        self.path = self.root / session_name
        self.frames_dir = self.path / FRAMES_DIRNAME
        self.shard_size = shard_size
        self.max_session_bytes = max_session_bytes
        self.frame_format = frame_format
        self.fsync_frames = fsync_frames

        self._next_step = 0  # steps count every event: observation 0, action 1, observation 2, ...
        self._num_frames = 0
        self._num_actions = 0
        self._shard_index = 0  # index of the shard the next event goes to
        self._shard_file: io.BufferedWriter | None = None
        self._events_in_shard = 0
        self._shards_created = 0
        self._data_bytes = 0  # bytes of frames and event lines written (frames in whole blocks when counting blocks)
        self._meta_bytes = 0  # size of session_meta.json as last written (likewise)
        self._block = 1  # the file-system block size when counting blocks
        self._closed = False
        self._meta: dict[str, Any] = {
            "session_name": session_name,
            "robot_type": str(robot_type),
            "action_space": [action_dict(a) for a in action_space],
            "start_time": _now_iso(),
            "end_time": None,
            "total_steps": 0,
            "shard_size": shard_size,
            "total_shards": 0,
            **env_params,
            "pattern": pattern,
            "status": "recording",
            "format_version": FORMAT_VERSION,
        }
        _dumps(self._meta)  # fail now, before any folder exists, if something is not JSON serialisable

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordingError(f"Cannot create the sessions folder {self.root}: {e.strerror or e}") from e
        if count_blocks:
            try:
                self._block = max(1, os.statvfs(self.root).f_frsize)
            except (OSError, AttributeError):
                self._block = 4096
        try:
            self.path.mkdir()  # exclusive: an existing session is never touched
        except FileExistsError as e:
            raise SessionExistsError(
                f"Session {session_name!r} already exists in {self.root}; choose another name (nothing was written)"
            ) from e
        except OSError as e:
            raise RecordingError(f"Cannot create the session folder {self.path}: {e.strerror or e}") from e
        try:
            self.frames_dir.mkdir()
            self._write_meta()
        except OSError as e:
            # remove only the folders we just made, and only while they are still empty
            for folder in (self.frames_dir, self.path):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise RecordingError(f"Cannot start session {self.path}: {e.strerror or e}") from e

    # ---- properties -----------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the metadata as last written (or about to be written)."""
        return json.loads(_dumps(self._meta))

    @property
    def status(self) -> str:
        """``'recording'``, ``'complete'`` or ``'stopped'``."""
        return self._meta["status"]

    @property
    def total_steps(self) -> int:
        """Events written so far (observations and actions)."""
        return self._next_step

    @property
    def num_frames(self) -> int:
        """Observations written so far."""
        return self._num_frames

    @property
    def num_actions(self) -> int:
        """Actions written so far."""
        return self._num_actions

    @property
    def bytes_written(self) -> int:
        """Bytes of the files this writer created: frames, event shards and metadata (with ``count_blocks``
        at least the disk they take: every file rounded up to whole blocks)."""
        return self._data_bytes + self._meta_bytes

    # ---- recording ---------------------------------------------------------------

    def record_observation(self, frame: np.ndarray) -> int:
        """Write a frame, then the observation event naming it.

        Args:
            frame: uint8 array of shape (H, W, 3).

        Returns:
            The event's step number.

        Raises:
            RecordingLimitError: the frame would take the session past ``max_session_bytes``.
            RecordingError: the session is closed or a write failed (e.g. disk full).
        """
        self._check_open()
        data = _encode_frame(frame, self.frame_format)
        rel_path = f"{FRAMES_DIRNAME}/{FRAME_TEMPLATE.format(self._num_frames, self.frame_format)}"
        line = self._event_line("observation", {"frame_path": rel_path})
        self._reserve(self._on_disk(len(data)) + self._line_bytes(line))
        # the frame is complete on disk before the event naming it exists (crash safety)
        self._guarded(lambda: write_atomic(self.path / rel_path, data, fsync=self.fsync_frames), rel_path)
        self._data_bytes += self._on_disk(len(data))
        self._append_event(line)
        self._num_frames += 1
        return self._next_step - 1

    def record_action(self, action: dict[str, Any] | int) -> int:
        """Write an action event.

        Args:
            action: an action dict such as ``{'action': 1}`` or a bare int.

        Returns:
            The event's step number.

        Raises:
            ValueError: not a toroidal dot action (``toroidal_dot_robot.parse_action``); nothing is written.
            RecordingLimitError: the event would take the session past ``max_session_bytes``.
            RecordingError: the session is closed or a write failed.
        """
        self._check_open()
        line = self._event_line("action", action_dict(action))
        self._reserve(self._line_bytes(line))
        self._append_event(line)
        self._num_actions += 1
        return self._next_step - 1

    def close(self, status: str = "complete", reason: str | None = None) -> None:
        """Finish the session: close the shard and write the final metadata. Safe to call twice.

        Args:
            status: ``'complete'`` or ``'stopped'``; a session already stopped keeps ``'stopped'``.
            reason: why it stopped (stored as ``stop_reason``).

        Raises:
            RecordingError: the final metadata could not be written (the events already written stay valid).
        """
        if status not in ("complete", "stopped"):
            raise ValueError(f"status must be 'complete' or 'stopped', got {status!r}")
        if self._closed:
            return
        self._closed = True
        self._meta["status"] = status
        if reason is not None:
            self._meta["stop_reason"] = reason
        try:
            self._close_shard()
            self._write_meta()
        except OSError as e:
            raise RecordingError(
                f"Could not finish session {self.path}: {e.strerror or e}; the events written so far stay valid",
                self.path,
            ) from e

    def __enter__(self) -> SessionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close("complete")
        elif not self._closed:
            with contextlib.suppress(RecordingError):  # keep the original exception
                self.close("stopped", reason=f"{exc_type.__name__}: {exc}")

    # ---- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RecordingError(f"Session {self.path} is {self.status}; nothing more can be recorded", self.path)

    def _event_line(self, kind: str, data: dict[str, Any]) -> bytes:
        event = {"step": self._next_step, "type": kind, "data": data, "timestamp": time.time()}
        return (_dumps(event) + "\n").encode("utf-8")

    def _reserve(self, nbytes: int) -> None:
        # check before writing, so the folder never exceeds the limit and everything on disk stays valid
        limit = self.max_session_bytes
        if limit is None or self.bytes_written + nbytes + _META_HEADROOM <= limit:
            return
        message = (
            f"Recording stopped: session {self.path} would grow past max_session_bytes={limit} "
            f"after {self._num_frames} frames and {self._num_actions} actions; what was written is a valid session"
        )
        self._stop(f"size limit of {limit} bytes reached")
        raise RecordingLimitError(message, self.path)

    def _on_disk(self, nbytes: int) -> int:
        """A file of ``nbytes`` as counted: its size, or with ``count_blocks`` the whole blocks it takes."""
        return -(-nbytes // self._block) * self._block

    def _line_bytes(self, line: bytes) -> int:
        """An event line as counted: with ``count_blocks`` one that opens a shard file adds the part
        block the file may end in (so a shard of L bytes counts at least the blocks it takes)."""
        return len(line) + (self._block - 1 if self._shard_file is None else 0)

    def _append_event(self, line: bytes) -> None:
        counted = self._line_bytes(line)

        def write() -> None:
            if self._shard_file is None:
                name = SHARD_TEMPLATE.format(self._shard_index)
                self._shard_file = open(self.path / name, "xb")  # "x": never append to a file we did not create
                self._shards_created += 1
            self._shard_file.write(line)
            self._shard_file.flush()  # a killed process loses at most this one line

        self._guarded(write, SHARD_TEMPLATE.format(self._shard_index))
        self._data_bytes += counted
        self._next_step += 1
        self._events_in_shard += 1
        if self._events_in_shard >= self.shard_size:
            # rollover: the next event opens the next shard; the metadata catches up atomically
            self._guarded(self._close_shard, SHARD_TEMPLATE.format(self._shard_index))
            self._shard_index += 1
            self._events_in_shard = 0
            self._guarded(self._write_meta, META_FILENAME)

    def _close_shard(self) -> None:
        if self._shard_file is not None:
            shard, self._shard_file = self._shard_file, None
            try:
                shard.flush()
                os.fsync(shard.fileno())
            finally:
                shard.close()

    def _write_meta(self) -> None:
        self._meta["total_steps"] = self._next_step
        self._meta["total_shards"] = self._shards_created
        if self._meta["status"] != "recording":
            self._meta["end_time"] = _now_iso()
        data = (_dumps(self._meta, indent=2) + "\n").encode("utf-8")
        write_atomic(self.path / META_FILENAME, data, fsync=True)
        self._meta_bytes = self._on_disk(len(data))

    def _guarded(self, write: Callable[[], None], what: str) -> None:
        try:
            write()
        except OSError as e:
            self._stop(f"write of {what} failed: {e.strerror or e}")
            raise RecordingError(
                f"Recording stopped: could not write {what} in {self.path}: {e.strerror or e}; "
                "what was written before stays a valid session",
                self.path,
            ) from e

    def _stop(self, reason: str) -> None:
        # best effort: the disk may be full, and the events on disk are valid without this metadata update
        if self._closed:
            return
        self._closed = True
        self._meta["status"] = "stopped"
        self._meta["stop_reason"] = reason
        with contextlib.suppress(OSError):
            self._close_shard()
        with contextlib.suppress(OSError):
            self._write_meta()


# -----------------------------------------------------------------------------
# robot wrapper


class RecordingRobot:
    """Wrap any robot so that every observation and action it sees is recorded by a ``SessionWriter``.

    Args:
        robot: anything with ``get_observation()``, ``execute_action(action)``, ``action_space`` and ``cleanup()``
            whose actions are the toroidal dot's (0 stay, 1 move right).
        writer: the open session writer to record into; ``cleanup()`` closes it.
    """

    def __init__(self, robot: Any, writer: SessionWriter) -> None:
        self.robot = robot
        self.writer = writer

    @property
    def action_space(self) -> list[dict[str, Any]]:
        """The wrapped robot's action space."""
        return self.robot.action_space

    def get_observation(self) -> np.ndarray:
        """Return the robot's frame, recording it as an observation event."""
        frame = self.robot.get_observation()
        self.writer.record_observation(frame)
        return frame

    def execute_action(self, action: dict[str, Any] | int) -> Any:
        """Record ``action`` and then execute it on the robot.

        Args:
            action: an action dict or a bare int, as the robot accepts.

        Raises:
            ValueError: the action is not in the robot's action space (nothing is recorded).
        """
        value = parse_action(action)
        space = self.robot.action_space
        if space is not None and value not in [parse_action(a) for a in space]:
            raise ValueError(f"Invalid action {action!r}: not in the action space {space!r}")
        self.writer.record_action(value)
        return self.robot.execute_action(action)

    def cleanup(self) -> None:
        """Close the session (status ``'complete'`` unless it already stopped) and clean up the robot."""
        try:
            self.writer.close("complete")
        finally:
            self.robot.cleanup()

    def __enter__(self) -> RecordingRobot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            with contextlib.suppress(RecordingError):
                self.writer.close("stopped", reason=f"{exc_type.__name__}: {exc}")
        self.cleanup()
