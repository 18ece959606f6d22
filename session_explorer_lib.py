"""Listing, validating and loading recorded sessions; frame loading and formatting helpers.

Reads the session format described in ``recording_robot``, as written by ``recording_robot.SessionWriter``
(PNG frames, ``status``/``pattern``/environment keys) and by the original tools (JPEG frames, none of the newer
metadata keys). Everything here is defensive: session names come from a browser, and files can be
truncated by a killed recording. Each problem becomes a ``SessionError`` that names the file and what is
wrong; a torn last event line, the one thing a killed recording leaves behind, is repaired with a note.
Frames decode lazily. No gradio here: the UI module calls these functions.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

import config
from config import ToroidalDotConfig
from toroidal_dot_robot import ACTION_NAMES, ACTION_SPACE, ACTION_VALUES, parse_action
from validation import is_int

# -----------------------------------------------------------------------------
# constants

META_FILENAME = "session_meta.json"
SHARD_PATTERN = re.compile(r"^events_shard_(\d+)\.jsonl$")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")  # png is what we write; jpg is what the original tools wrote
DOT_ACTION_SPACE = [dict(a) for a in ACTION_SPACE]  # stay, move right
MIN_FRAMES = 3  # a canvas needs 3 frames: two of history and the one to predict
FRAME_CACHE_SIZE = 64  # decoded frames kept per session (~150 kB each at 224x224)
MAX_META_BYTES = 1 << 20  # a metadata file is a few hundred bytes; refuse to parse anything huge
MAX_FRAME_PIXELS = 4096 * 4096  # refuse to decode absurd images (decompression bombs)
MAX_NAME_BYTES = 255  # longest file or folder name (UTF-8 bytes) on common file systems
_DEFAULT_FRAME_SIZE = ToroidalDotConfig().img_size
_REQUIRED_META = {"session_name": str, "robot_type": str, "action_space": list}  # the original tools' keys that matter
_OPTIONAL_META = {  # checked only when present: older sessions lack most of them
    "start_time": (str, int, float, type(None)),
    "end_time": (str, int, float, type(None)),
    "total_steps": int,
    "shard_size": int,
    "total_shards": int,
    "status": str,
    "stop_reason": (str, type(None)),
    "pattern": (str, type(None)),
    "format_version": int,
    "img_size": int,
    "dot_radius": int,
    "move_pixels": int,
    "seed": (int, type(None)),
    "start_x": int,
    "start_y": int,
}
_MODE_NAMES = {"L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA (alpha dropped)", "P": "palette",
               "PA": "palette with alpha", "1": "black and white", "I;16": "16-bit grayscale", "CMYK": "CMYK"}
_MARKDOWN_SPECIAL = re.compile(r"[\\`*_{}\[\]<>#|!]")  # characters markdown_escape puts a backslash before
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", type(None): "null"}


# -----------------------------------------------------------------------------
# errors and data classes


class SessionError(ValueError):
    """A session cannot be loaded; the message names the file and what is wrong with it."""


class UnknownSessionError(SessionError):
    """A name that is not a session folder directly inside the sessions root (deliberately generic)."""


@dataclass
class SessionSummary:
    """One row of the session list; broken sessions are listed too, with the reason."""

    name: str  # folder name
    path: Path  # session folder
    ok: bool  # True when the session loads
    reason: str | None  # why it does not load (None when ok)
    num_frames: int  # observations (0 when broken)
    num_actions: int  # actions (0 when broken)
    start_time: str | float | None  # as stored in the metadata (ISO string or epoch seconds)


@dataclass
class Session:
    """A loaded session: metadata and event index in memory, frames decoded on demand.

    ``observations[i]`` is ``{step, timestamp, frame_path, full_path}``; ``actions[j]`` is
    ``{step, timestamp, action}``; ``notes`` lists repairs made while loading (e.g. a dropped torn line)
    and while decoding frames (a grayscale, RGBA or palette frame converted to RGB).
    """

    name: str
    path: Path
    metadata: dict[str, Any]
    observations: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    frame_size: tuple[int, int] = (_DEFAULT_FRAME_SIZE, _DEFAULT_FRAME_SIZE)  # expected (height, width)
    _action_after: list[int | None] = field(default_factory=list, repr=False)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    _converted_modes: set = field(default_factory=set, repr=False, compare=False)

    @property
    def num_frames(self) -> int:
        """Number of observations (frames)."""
        return len(self.observations)

    @property
    def num_actions(self) -> int:
        """Number of actions."""
        return len(self.actions)

    def frame(self, index: int) -> np.ndarray:
        """Return frame ``index`` as a new uint8 (H, W, 3) RGB array, decoding it on first use.

        Args:
            index: observation index, ``0 <= index < num_frames``.

        Raises:
            IndexError: index out of range.
            SessionError: the file is missing, unreadable or not ``frame_size``.
        """
        index = self._check_index(index)
        cached = self._cache.get(index)
        if cached is None:
            path = self.observations[index]["full_path"]
            cached, mode = _decode_frame(path, self.frame_size)
            if mode != "RGB" and mode not in self._converted_modes:
                self._converted_modes.add(mode)  # one note per mode, not one per frame
                self.notes.append(
                    f"{self.name}/{self.observations[index]['frame_path']} was stored as "
                    f"{_MODE_NAMES.get(mode, mode)} and was converted to RGB (as is any other {mode} frame)"
                )
            self._cache[index] = cached
            while len(self._cache) > FRAME_CACHE_SIZE:
                # tolerate a concurrent eviction (Gradio may call from several worker threads)
                try:
                    self._cache.popitem(last=False)
                except KeyError:
                    break
        else:
            try:
                self._cache.move_to_end(index)
            except KeyError:
                pass
        return cached.copy()  # callers may draw on it; the cached copy stays pristine

    def drop_cache(self) -> None:
        """Forget the decoded frames (they are decoded again from disk when next asked for)."""
        self._cache.clear()

    def action_after(self, index: int) -> int | None:
        """Return the action recorded right after observation ``index``; None for the last frame or none recorded.

        Args:
            index: observation index, ``0 <= index < num_frames``.
        """
        return self._action_after[self._check_index(index)]

    def _check_index(self, index: int) -> int:
        if not is_int(index) or not 0 <= index < self.num_frames:
            raise IndexError(f"Frame index {index!r} out of range 0..{self.num_frames - 1}")
        return int(index)


# -----------------------------------------------------------------------------
# helpers


def _default_root(root: str | os.PathLike | None) -> Path:
    # read config at call time, so tests and the app can point SESSIONS_ROOT elsewhere
    return Path(config.SESSIONS_ROOT if root is None else root)


def _label(session_dir: Path, filename: str) -> str:
    # "<session>/<file>": names the file without leaking the server's absolute paths to a browser
    return f"{Path(session_dir).name}/{filename}"


def _cannot_read(label: str, error: OSError) -> SessionError:
    # the reason from the error number only: str(error) holds the server's absolute path
    reason = error.strerror or type(error).__name__
    return SessionError(f"{label} cannot be read ({reason[:1].lower()}{reason[1:]})")


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):  # JSON true/false must not pass as an integer
        return False
    if isinstance(value, int) and int not in expected and float in expected:
        return True
    return isinstance(value, expected) and not (isinstance(value, float) and not math.isfinite(value))


def _type_label(expected: type | tuple[type, ...]) -> str:
    expected = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in expected)


def _inside(path: Path, directory: Path) -> bool:
    # True when path (after following symlinks) is directory itself or below it
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        return False


def _name_problem(name: Any) -> str | None:
    # why ``name`` is not a plain name for an entry directly inside a folder; None when it is
    if not isinstance(name, str):
        return f"a name must be text, not {type(name).__name__}"
    if not name:
        return "it is empty"
    if "\x00" in name:
        return "it holds a NUL character"
    if "/" in name or "\\" in name:
        return "it holds a path separator ('/' or '\\')"
    if name.startswith("."):
        return "it starts with '.' (hidden names, '.' and '..' are not allowed)"
    if ".." in name:
        return "it holds '..'"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def _stays_in(folder: Path, name: str) -> bool:
    try:
        # parent equality, not a string prefix: "toroidal_dot_evil" must not pass for "toroidal_dot"
        return (folder / name).resolve().parent == folder.resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, names the OS cannot encode
        return False


def _is_session_folder(root: Path, name: Any) -> bool:
    # one test for listing and opening, so every listed session can be opened by name
    try:
        return (root / check_name(name, "session", root)).is_dir()
    except (OSError, ValueError):
        return False


def _action(data: Any, where: str) -> int:
    # the one action parser, its ValueError turned into a SessionError that says where the action was
    try:
        return parse_action(data)
    except ValueError as e:
        raise SessionError(f"{where}: {e}"[:300]) from None


# -----------------------------------------------------------------------------
# names


def check_name(name: Any, what: str = "session", folder: str | os.PathLike | None = None) -> str:
    """Return ``name`` if it is a plain name for a file or folder directly inside ``folder``.

    The project's one name rule, for session folders and named checkpoints. A name must be a non-empty
    string of at most ``MAX_NAME_BYTES`` UTF-8 bytes, without ``/``, ``\\``, NUL or ``..``, and must not
    start with ``.``. With ``folder`` given, ``folder / name`` must also resolve (following symlinks) to an
    entry directly inside ``folder``, so a symlink cannot lead elsewhere.

    Args:
        name: the name to check, as typed or chosen by a user.
        what: what the name is for, shown in the message (``'session'``, ``'checkpoint'``).
        folder: the folder the name lives in; None checks the name alone.

    Returns:
        ``name``, unchanged.

    Raises:
        ValueError: ``"Invalid <what> name <name>: <reason>"``.
    """
    problem = _name_problem(name)
    if problem is None and folder is not None and not _stays_in(Path(folder), name):
        problem = "it leads outside its folder"
    if problem is not None:
        shown = f" {name!r}"[:81] if isinstance(name, str) else ""
        raise ValueError(f"Invalid {what} name{shown}: {problem}")
    return name


# -----------------------------------------------------------------------------
# finding sessions


def list_session_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Return the session folders directly inside ``root``, sorted by name. Never raises.

    Hidden entries, plain files and symlinks that lead outside ``root`` are skipped; a missing or
    unreadable root gives ``[]``.

    Args:
        root: the sessions folder; defaults to ``config.SESSIONS_ROOT``.
    """
    root = _default_root(root)
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except (OSError, RuntimeError, ValueError):
        return []
    return [p for p in entries if _is_session_folder(root, p.name)]


def resolve_session_dir(name: Any, root: str | os.PathLike | None = None) -> Path:
    """Return the folder of session ``name`` inside ``root``, refusing anything else.

    Refused with one generic message (so probing learns nothing): every name ``check_name`` refuses
    (non-strings, ``''``, ``'.'``, ``'..'``, hidden names, names holding ``/``, ``\\``, NUL or ``..``, absolute
    paths, names that resolve outside the root through a symlink) and folders that do not exist.

    Args:
        name: the session folder name, as chosen in the UI.
        root: the sessions folder; defaults to ``config.SESSIONS_ROOT``.

    Raises:
        UnknownSessionError: (a ``SessionError`` and ``ValueError``) ``"Unknown session: <name>"``.
    """
    root = _default_root(root)
    if not _is_session_folder(root, name):
        shown = repr(name)[:80] if isinstance(name, str) else f"<{type(name).__name__}>"
        raise UnknownSessionError(f"Unknown session: {shown}")
    return root / name


# -----------------------------------------------------------------------------
# metadata and events


def load_session_metadata(session_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``session_meta.json``.

    Requires ``session_name`` and ``robot_type`` (strings) and ``action_space`` (a list of objects); the
    newer keys (``status``, ``pattern``, environment parameters, ...) are type-checked only when present.

    Args:
        session_dir: the session folder.

    Raises:
        SessionError: the file is missing, empty, not JSON, not an object, or has missing/mistyped keys.
    """
    session_dir = Path(session_dir)
    label = _label(session_dir, META_FILENAME)
    path = session_dir / META_FILENAME
    try:
        if not path.is_file():
            if path.exists() or path.is_symlink():
                raise SessionError(f"{label} is not a regular file")
            raise SessionError(f"{label} is missing")
        if not _inside(path, session_dir):
            raise SessionError(f"{label} is a link leading outside the session folder")
        if path.stat().st_size > MAX_META_BYTES:
            raise SessionError(f"{label} is too large ({path.stat().st_size} bytes) to be session metadata")
        raw = path.read_bytes()
    except OSError as e:
        raise _cannot_read(label, e) from None
    if not raw.strip():
        raise SessionError(f"{label} is empty")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SessionError(f"{label} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        # some messages already end in "at" ("Unterminated string starting at"): do not say it twice
        where = f"line {e.lineno} column {e.colno}"
        raise SessionError(f"{label} is not valid JSON ({e.msg.removesuffix(' at')} at {where})") from None
    except (ValueError, RecursionError) as e:  # absurdly deep nesting, integers of thousands of digits
        raise SessionError(f"{label} is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise SessionError(f"{label} is not a JSON object (found {type(meta).__name__})")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise SessionError(f"{label} is missing required key(s): {', '.join(missing)}")
    for key, expected in {**_REQUIRED_META, **_OPTIONAL_META}.items():
        if key in meta and not _type_ok(meta[key], expected):
            raise SessionError(
                f"{label}: '{key}' should be {_type_label(expected)}, found {type(meta[key]).__name__}"
            )
    if "img_size" in meta and not 1 <= meta["img_size"] <= math.isqrt(MAX_FRAME_PIXELS):
        raise SessionError(f"{label}: 'img_size' should be a frame side in pixels, found {meta['img_size']!r}"[:200])
    if not all(isinstance(a, dict) for a in meta["action_space"]):
        raise SessionError(f"{label}: 'action_space' should be a list of objects such as {{\"action\": 0}}")
    return meta


def _parse_event(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SessionError(f"{where}: an event must be a JSON object")
    step, kind, data = obj.get("step"), obj.get("type"), obj.get("data")
    timestamp = obj.get("timestamp")
    if not is_int(step) or step < 0:
        raise SessionError(f"{where}: 'step' should be a non-negative integer, found {step!r}"[:200])
    if kind not in ("observation", "action"):
        raise SessionError(f"{where}: 'type' should be 'observation' or 'action', found {kind!r}"[:200])
    if not isinstance(data, dict):
        raise SessionError(f"{where}: 'data' should be an object")
    if kind == "observation" and not (isinstance(data.get("frame_path"), str) and data["frame_path"]):
        found = data.get("frame_path")
        raise SessionError(f"{where}: an observation needs a 'frame_path' string, found {found!r}"[:200])
    if kind == "action":
        _action(data, where)
    if timestamp is not None and not _type_ok(timestamp, float):
        raise SessionError(f"{where}: 'timestamp' should be a number, found {timestamp!r}"[:200])
    return {"step": step, "type": kind, "data": data, "timestamp": timestamp}


def _list_shards(session_dir: Path) -> list[tuple[int, Path]]:
    label = _label(session_dir, "events_shard_*.jsonl")
    shards = []
    try:
        entries = list(session_dir.iterdir())
        regular = {entry: entry.is_file() for entry in entries if SHARD_PATTERN.match(entry.name)}
    except OSError as e:
        raise _cannot_read(f"{session_dir.name}/", e) from None
    for entry, is_file in regular.items():
        if not is_file or not _inside(entry, session_dir):
            raise SessionError(f"{_label(session_dir, entry.name)} is not a regular file inside the session")
        shards.append((int(SHARD_PATTERN.match(entry.name).group(1)), entry))
    if not shards:
        raise SessionError(f"{label}: no event shards found")
    shards.sort()
    numbers = [n for n, _ in shards]
    twins = [(a, b) for (n, a), (m, b) in zip(shards, shards[1:]) if n == m]
    if twins:
        a, b = twins[0]
        number = int(SHARD_PATTERN.match(a.name).group(1))
        raise SessionError(f"{_label(session_dir, a.name)} and {b.name} are both shard {number}")
    expected = list(range(len(shards)))
    if numbers != expected:
        gap = next(i for i, (n, e) in enumerate(zip(numbers, expected)) if n != e)
        raise SessionError(
            f"{_label(session_dir, f'events_shard_{expected[gap]:03d}.jsonl')} is missing "
            f"(shards found: {', '.join(p.name for _, p in shards)[:200]})"
        )
    return shards


def load_session_events_with_notes(session_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Read every ``events_shard_NNN.jsonl`` in numeric order, validating each event.

    A killed recording can leave a torn last line in the last shard, or that shard empty: the line (or
    the empty shard) is dropped and reported in the notes. Any other unreadable line is an error.

    Args:
        session_dir: the session folder.

    Returns:
        ``(events, notes)``: events as ``{step, type, data, timestamp}`` dicts in step order, and
        human-readable notes about repairs.

    Raises:
        SessionError: no shards, a missing or duplicated shard number, an empty shard before the last, an
            invalid line (naming shard and line number), an action other than 0 or 1, or steps that repeat
            or go backwards.
    """
    session_dir = Path(session_dir)
    shards = _list_shards(session_dir)
    events: list[dict[str, Any]] = []
    notes: list[str] = []
    last_step = -1
    for shard_number, (_, path) in enumerate(shards):
        label = _label(session_dir, path.name)
        is_last_shard = shard_number == len(shards) - 1
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as e:
            raise _cannot_read(label, e) from None
        # index of the last non-blank line: the only one allowed to be torn, and only in the last shard
        last_line = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        if last_line < 0:
            # a killed recording can leave the shard it had just opened empty; anywhere else events are lost
            if not is_last_shard:
                raise SessionError(f"{label} is empty but later shards follow (events are missing)")
            notes.append(f"{label} is empty (recording interrupted) and was skipped")
            continue
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{label} line {i + 1}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError covers JSONDecodeError
                if is_last_shard and i == last_line:
                    notes.append(f"{label} line {i + 1} was incomplete (recording interrupted) and was dropped")
                    continue
                raise SessionError(f"{where} is not valid JSON") from None
            event = _parse_event(obj, where)
            if event["step"] <= last_step:
                raise SessionError(
                    f"{where}: step {event['step']} does not increase (previous step {last_step})"
                )
            last_step = event["step"]
            events.append(event)
    return events, notes


def load_session_events(session_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read every event of a session (see ``load_session_events_with_notes``; the notes are discarded).

    Args:
        session_dir: the session folder.
    """
    return load_session_events_with_notes(session_dir)[0]


def extract_observations(events: list[dict[str, Any]], session_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the observation events as ``{step, timestamp, frame_path, full_path}``.

    ``frame_path`` must be a relative path that stays inside the session folder (symlinks included);
    Windows separators from older recordings are accepted.

    Args:
        events: events from ``load_session_events``.
        session_dir: the session folder the frame paths are relative to.

    Raises:
        SessionError: a frame path is missing, absolute, climbs out with ``..`` or leaves the folder, or
            the folder holding a frame cannot be read (named relative to the session, e.g. ``frames/``).
    """
    session_dir = Path(session_dir)
    observations = []
    folder_ok: dict[Path, bool] = {}  # resolve each folder once: sessions hold thousands of frames
    for event in events:
        if event["type"] != "observation":
            continue
        frame_path = event["data"].get("frame_path")
        where = f"{Path(session_dir).name}: observation at step {event['step']}"
        if not isinstance(frame_path, str) or not frame_path or "\x00" in frame_path:
            raise SessionError(f"{where} has no valid 'frame_path'")
        rel = PurePosixPath(frame_path.replace("\\", "/"))
        if rel.is_absolute() or re.match(r"^[A-Za-z]:", frame_path) or ".." in rel.parts:
            raise SessionError(f"{where}: frame_path {frame_path[:100]!r} must stay inside the session folder")
        full_path = session_dir.joinpath(*rel.parts)
        # with '..' refused, only a symlink (the folder or the file itself) can lead outside
        if full_path.parent not in folder_ok:
            folder_ok[full_path.parent] = _inside(full_path.parent, session_dir)
        try:
            is_link = full_path.is_symlink()
        except OSError as e:  # the folder holding the frame cannot be searched (e.g. chmod 000)
            raise _cannot_read(_label(session_dir, "".join(f"{part}/" for part in rel.parent.parts)), e) from None
        if not folder_ok[full_path.parent] or (is_link and not _inside(full_path, session_dir)):
            raise SessionError(f"{where}: frame_path {frame_path[:100]!r} leads outside the session folder")
        observations.append(
            {"step": event["step"], "timestamp": event["timestamp"], "frame_path": frame_path, "full_path": full_path}
        )
    return observations


def extract_actions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the action events as ``{step, timestamp, action}`` with an integer ``action`` (0 or 1).

    Args:
        events: events from ``load_session_events``.

    Raises:
        SessionError: an action event whose data is not ``{"action": 0}`` or ``{"action": 1}``.
    """
    return [
        {"step": e["step"], "timestamp": e["timestamp"], "action": _action(e["data"], f"action at step {e['step']}")}
        for e in events if e["type"] == "action"
    ]


# -----------------------------------------------------------------------------
# frames


def load_frame_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Decode a .png or .jpg frame to a uint8 (H, W, 3) RGB array.

    Grayscale, RGBA and palette images are converted to RGB (alpha is dropped). The image is never
    resized: resampling would smear a 5-pixel dot, so a wrong size is an error.

    Args:
        path: the image file.
        size: expected ``(height, width)`` (or one int for a square); None accepts any size.

    Raises:
        SessionError: the file is missing, not .png/.jpg, truncated, not an image, or not ``size``.
    """
    return _decode_frame(path, size)[0]


def _decode_frame(path: str | os.PathLike, size: int | tuple[int, int] | None) -> tuple[np.ndarray, str]:
    # load_frame_image, also returning the file's colour mode so callers can note a conversion
    path = Path(path)
    label = "/".join(path.parts[-3:])  # "<session>/frames/<file>"
    if path.suffix.lower() not in FRAME_SUFFIXES:
        raise SessionError(f"{label} is not a .png or .jpg frame")
    expected = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_FRAME_PIXELS:
                raise SessionError(f"{label} is {width}x{height} pixels, far too large for a frame")
            if expected is not None and (height, width) != expected:
                raise SessionError(
                    f"{label} is {width}x{height} pixels but this session's frames are {expected[1]}x{expected[0]}"
                )
            image.load()  # decode now, so a truncated file fails here rather than later
            mode = image.mode
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise SessionError(f"{label} is missing") from None
    except UnidentifiedImageError:
        raise SessionError(f"{label} is not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, SessionError):
            raise
        if isinstance(e, OSError) and e.errno is not None:  # the file system refused, e.g. permission denied
            raise _cannot_read(label, e) from None
        raise SessionError(f"{label} is truncated or unreadable ({e})"[:300]) from None
    frame = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    return np.ascontiguousarray(frame), mode


# -----------------------------------------------------------------------------
# sessions


def _check_action_space(meta: dict[str, Any], session_dir: Path) -> None:
    space = meta["action_space"]
    try:
        values = sorted(parse_action(a) for a in space)
    except ValueError:
        values = None
    if values != sorted(ACTION_VALUES):
        raise SessionError(
            f"{_label(session_dir, META_FILENAME)}: action_space {json.dumps(space)[:120]} is not the toroidal dot's "
            f"{json.dumps(DOT_ACTION_SPACE)}"
        )


def _actions_after(events: list[dict[str, Any]], num_frames: int) -> list[int | None]:
    # the first action between observation i and observation i + 1; the last frame has no successor
    after: list[int | None] = [None] * num_frames
    index = -1
    for event in events:
        if event["type"] == "observation":
            index += 1
        elif 0 <= index < num_frames and after[index] is None:
            after[index] = parse_action(event["data"])
    if num_frames:
        after[-1] = None
    return after


def load_session(name_or_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> Session:
    """Load a session: metadata, event index and frame list, without decoding the frames.

    Args:
        name_or_dir: a session name (a ``str``, resolved safely inside ``root``) or a folder path
            (a ``Path`` given by trusted code).
        root: the sessions folder for names; defaults to ``config.SESSIONS_ROOT``.

    Raises:
        SessionError: unknown name, bad metadata or events, a wrong action space, fewer than 3 frames,
            a missing frame file, or an action outside the action space.
    """
    if isinstance(name_or_dir, str):
        session_dir = resolve_session_dir(name_or_dir, root)
    else:
        session_dir = Path(name_or_dir)
        if not session_dir.is_dir():
            raise SessionError(f"{session_dir.name}/ is not a session folder")
    meta = load_session_metadata(session_dir)
    _check_action_space(meta, session_dir)
    events, notes = load_session_events_with_notes(session_dir)
    observations = extract_observations(events, session_dir)
    actions = extract_actions(events)
    name = session_dir.name
    if len(observations) < MIN_FRAMES:
        raise SessionError(
            f"{name}: {len(observations)} frame(s) recorded; need at least {MIN_FRAMES} frames for a canvas"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    missing = []
    for observation in observations:
        try:
            if not observation["full_path"].is_file():
                missing.append(observation)
        except OSError as e:  # a link to a frame in a folder that cannot be read
            raise _cannot_read(f"{name}/{observation['frame_path']}", e) from None
    if missing:
        first = missing[0]["full_path"]
        problem = "is not a regular file" if first.exists() or first.is_symlink() else "is missing"
        raise SessionError(
            f"{name}/{missing[0]['frame_path']} {problem}"
            + (f" (and {len(missing) - 1} more frame files are missing or not regular files)"
               if len(missing) > 1 else "")
        )
    status = meta.get("status")
    if status == "recording":
        notes.append("the recording did not finish (status 'recording'); showing what was written")
    elif status == "stopped":
        notes.append(f"the recording stopped early: {meta.get('stop_reason') or 'no reason recorded'}")
    img_size = meta.get("img_size", _DEFAULT_FRAME_SIZE)
    return Session(
        name=name,
        path=session_dir,
        metadata=meta,
        observations=observations,
        actions=actions,
        notes=notes,
        frame_size=(img_size, img_size),
        _action_after=_actions_after(events, len(observations)),
    )


def scan_sessions(root: str | os.PathLike | None = None) -> list[SessionSummary]:
    """Summarise every session folder in ``root``; a broken session is listed with its reason. Never raises.

    Args:
        root: the sessions folder; defaults to ``config.SESSIONS_ROOT``.
    """
    summaries = []
    for session_dir in list_session_dirs(root):
        try:
            session = load_session(session_dir)
        except Exception as e:  # one broken session must not hide the others
            if isinstance(e, SessionError):
                reason = str(e)
            elif isinstance(e, OSError):
                reason = str(_cannot_read(f"{session_dir.name}/", e))
            else:
                reason = f"cannot be read: {type(e).__name__}: {e}"
            summaries.append(SessionSummary(session_dir.name, session_dir, False, reason[:300], 0, 0, None))
            continue
        summaries.append(
            SessionSummary(
                session.name, session_dir, True, None, session.num_frames, session.num_actions,
                session.metadata.get("start_time"),
            )
        )
    return summaries


# -----------------------------------------------------------------------------
# formatting


def format_timestamp(ts: Any) -> str:
    """Format epoch seconds or an ISO string as local ``'YYYY-MM-DD HH:MM:SS.mmm'``; ``'n/a'`` if impossible.

    Args:
        ts: epoch seconds (int/float), an ISO 8601 string, or None.
    """
    try:
        if isinstance(ts, bool) or ts is None:
            return "n/a"
        if isinstance(ts, (int, float, np.integer, np.floating)):
            moment = datetime.fromtimestamp(float(ts))
        elif isinstance(ts, str):
            moment = datetime.fromisoformat(ts.strip())
            if moment.tzinfo is not None:
                moment = moment.astimezone().replace(tzinfo=None)  # show in local time
        else:
            return "n/a"
    except (ValueError, OverflowError, OSError, TypeError):
        return "n/a"
    return moment.strftime("%Y-%m-%d %H:%M:%S") + f".{moment.microsecond // 1000:03d}"


def markdown_escape(text: Any) -> str:
    """Return ``str(text)`` with a backslash before each markdown character (``\\ ` * _ { } [ ] < > # | !``).

    The project's one escaper: names, notes and error messages come from files on disk or from a browser,
    so they must render as plain text.

    Args:
        text: anything; it is turned into a string first.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\g<0>", str(text))


def session_info_markdown(session: Session) -> str:
    """Return a short markdown summary of a loaded session.

    Args:
        session: a session from ``load_session``.
    """
    meta = session.metadata
    first = session.observations[0]["timestamp"] if session.observations else None
    last = session.observations[-1]["timestamp"] if session.observations else None
    start = meta.get("start_time") if meta.get("start_time") is not None else first
    end = meta.get("end_time") if meta.get("end_time") is not None else last
    space = ", ".join(
        f"{a.get('action')} = {ACTION_NAMES.get(a.get('action'), '?')}" for a in meta.get("action_space", [])
    )
    lines = [
        f"**Session:** {markdown_escape(session.name)}",
        f"- **Frames:** {session.num_frames} | **Actions:** {session.num_actions}",
        f"- **Start:** {format_timestamp(start)} | **End:** {format_timestamp(end)}",
        f"- **Robot:** {markdown_escape(meta.get('robot_type', 'n/a'))} | **Action space:** {markdown_escape(space)}",
        f"- **Pattern:** {markdown_escape(meta.get('pattern') or 'n/a')} | "
        f"**Status:** {markdown_escape(meta.get('status') or 'n/a')}",
    ]
    env = [f"{key} {meta[key]}" for key in ("dot_radius", "move_pixels", "img_size", "seed") if key in meta]
    if env:
        lines.append(f"- **Environment:** {markdown_escape(', '.join(env))}")
    lines.extend(f"- **Note:** {markdown_escape(note)}" for note in session.notes)
    return "\n".join(lines)
