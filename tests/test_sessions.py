"""Tests of session listing, validation and loading (session_explorer_lib)."""

import builtins
import errno
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from record_session import record_session
from recording_robot import SessionWriter
from session_explorer_lib import (
    SessionError,
    UnknownSessionError,
    check_name,
    format_timestamp,
    list_session_dirs,
    load_frame_image,
    load_session,
    load_session_events,
    load_session_events_with_notes,
    load_session_metadata,
    markdown_escape,
    resolve_session_dir,
    scan_sessions,
    session_info_markdown,
)
from toroidal_dot_robot import ToroidalDotRobot


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "toroidal_dot"
    folder.mkdir()
    return folder


@pytest.fixture
def session_dir(root):
    return record_session("alternate", 6, seed=0, name="good", root=root)


def _write_meta(session_dir: Path, meta) -> None:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (session_dir / "session_meta.json").write_text(text)


def _write_events(session_dir: Path, lines, shard=0) -> None:
    (session_dir / f"events_shard_{shard:03d}.jsonl").write_text("".join(line + "\n" for line in lines))


def _event(step, kind, data, timestamp=1_700_000_000.0):
    return json.dumps({"step": step, "type": kind, "data": data, "timestamp": timestamp})


def _seed_style_session(root: Path, name="seed_jpg", frames=4) -> Path:
    """A session as the original tools wrote it: JPEG frames, only the original metadata keys."""
    folder = root / name
    (folder / "frames").mkdir(parents=True)
    robot = ToroidalDotRobot(seed=3)
    lines = []
    for i in range(frames):
        Image.fromarray(robot.get_observation()).save(folder / "frames" / f"frame_{i:06d}.jpg", quality=95)
        lines.append(_event(2 * i, "observation", {"frame_path": f"frames/frame_{i:06d}.jpg"}))
        if i < frames - 1:
            lines.append(_event(2 * i + 1, "action", {"action": 1}))
            robot.execute_action(1)
    _write_events(folder, lines)
    _write_meta(folder, {
        "session_name": name, "robot_type": "ToroidalDotRobot", "action_space": [{"action": 0}, {"action": 1}],
        "start_time": "2025-01-02T03:04:05.678901", "end_time": None, "total_steps": len(lines),
        "shard_size": 1000, "total_shards": 1,
    })
    return folder


# ---- names ------------------------------------------------------------------------


def test_a_plain_name_resolves(root, session_dir):
    assert resolve_session_dir("good", root) == session_dir


@pytest.fixture
def links(root, tmp_path):
    """Symlinks inside the sessions folder: to a folder elsewhere, to a sibling sharing the root's prefix, a loop."""
    (tmp_path / "elsewhere").mkdir()
    (root.parent / "toroidal_dot_evil").mkdir()
    (root / "link_out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "link_sibling").symlink_to(root.parent / "toroidal_dot_evil", target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")


HOSTILE_NAMES = [
    ("", "it is empty"),
    (".", "starts with '.'"),
    ("..", "starts with '.'"),
    (".hidden", "starts with '.'"),
    ("a..b", "holds '..'"),
    ("../..", "path separator"),
    ("../toroidal_dot_evil", "path separator"),
    ("a/../../x", "path separator"),
    ("good/", "path separator"),
    ("a\\b", "path separator"),
    ("..\\..\\etc", "path separator"),
    ("/etc", "path separator"),
    ("<absolute path of good>", "path separator"),
    ("x\x00y", "NUL character"),
    ("x" * 256, "longer than 255 bytes"),
    ("\u00e9" * 128, "longer than 255 bytes"),  # 128 characters, 256 UTF-8 bytes
    ("link_out", "leads outside its folder"),
    ("link_sibling", "leads outside its folder"),
    ("loop", "leads outside its folder"),
    (None, "must be text, not NoneType"),
    (3, "must be text, not int"),
    (["good"], "must be text, not list"),
]


@pytest.mark.parametrize("name, reason", HOSTILE_NAMES)
def test_hostile_names_are_refused_by_the_one_name_rule(root, session_dir, links, name, reason):
    if name == "<absolute path of good>":
        name = str(session_dir)
    before = sorted(root.parent.rglob("*"))
    with pytest.raises(ValueError, match=re.escape(reason)) as error_info:
        check_name(name, "session", root)
    assert str(error_info.value).startswith("Invalid session name")
    with pytest.raises(UnknownSessionError, match="^Unknown session: "):  # one generic message for the browser
        resolve_session_dir(name, root)
    with pytest.raises(ValueError, match=re.escape(reason)):  # the recorder refuses the same names
        SessionWriter(root, name, "ToroidalDotRobot", [{"action": 0}, {"action": 1}])
    assert sorted(root.parent.rglob("*")) == before  # nothing created anywhere


def test_plain_names_pass_and_only_real_session_folders_are_listed(root, session_dir, links):
    assert check_name("a new name_2", "checkpoint") == "a new name_2"
    assert check_name("good", "session", root) == "good"
    with pytest.raises(UnknownSessionError, match="Unknown session: 'missing'"):
        resolve_session_dir("missing", root)
    assert list_session_dirs(root) == [session_dir]


def test_list_session_dirs_skips_files_and_missing_root(root, session_dir, tmp_path):
    (root / ".gitkeep").write_text("")
    (root / "notes.txt").write_text("x")
    assert list_session_dirs(root) == [session_dir]
    assert list_session_dirs(tmp_path / "nope") == []


# ---- metadata -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "missing"),
        ("", "empty"),
        ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        ('{"session_name": "s', "not valid JSON (Unterminated string starting at line 1 column 18)"),
        ("[1, 2]", "not a JSON object"),
        ({"robot_type": "x", "action_space": []}, "session_name"),
        ({"session_name": 5, "robot_type": "x", "action_space": []}, "'session_name' should be a string"),
        ({"session_name": "s", "robot_type": "x", "action_space": {}}, "'action_space' should be a list"),
        ({"session_name": "s", "robot_type": "x", "action_space": [], "total_steps": "9"}, "'total_steps'"),
        ({"session_name": "s", "robot_type": "x", "action_space": [], "shard_size": True}, "'shard_size'"),
    ],
)
def test_corrupt_metadata_is_refused_naming_the_file(session_dir, content, problem):
    if content is None:
        (session_dir / "session_meta.json").unlink()
    else:
        _write_meta(session_dir, content)
    with pytest.raises(SessionError, match="session_meta.json") as error_info:
        load_session_metadata(session_dir)
    assert problem in str(error_info.value)


# ---- events -----------------------------------------------------------------------------


def test_torn_last_line_is_dropped_with_a_note(session_dir):
    shard = session_dir / "events_shard_000.jsonl"
    shard.write_bytes(shard.read_bytes() + b'{"step": 13, "type": "act')
    events, notes = load_session_events_with_notes(session_dir)
    assert len(events) == 13 and len(notes) == 1 and "events_shard_000.jsonl line 14" in notes[0]
    assert len(load_session_events(session_dir)) == 13


def test_invalid_middle_line_is_refused_naming_file_and_line(session_dir):
    shard = session_dir / "events_shard_000.jsonl"
    lines = shard.read_text().splitlines()
    lines[3] = "garbage"
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(SessionError, match=r"events_shard_000\.jsonl line 4"):
        load_session_events(session_dir)


def test_torn_line_in_an_earlier_shard_is_refused(session_dir):
    shard = session_dir / "events_shard_000.jsonl"
    shard.write_bytes(shard.read_bytes() + b'{"step": 13')
    _write_events(session_dir, [_event(14, "action", {"action": 0})], shard=1)
    with pytest.raises(SessionError, match=r"events_shard_000\.jsonl line 14"):
        load_session_events(session_dir)


def test_no_shards_is_refused(session_dir):
    (session_dir / "events_shard_000.jsonl").unlink()
    with pytest.raises(SessionError, match="no event shards"):
        load_session(session_dir)


def test_shard_gap_is_refused(session_dir):
    _write_events(session_dir, [_event(20, "action", {"action": 0})], shard=2)
    with pytest.raises(SessionError, match="events_shard_001.jsonl is missing"):
        load_session_events(session_dir)


@pytest.mark.parametrize("bad_step", [5, 4])  # duplicate, then decreasing
def test_repeated_or_decreasing_steps_are_refused(session_dir, bad_step):
    shard = session_dir / "events_shard_000.jsonl"
    lines = shard.read_text().splitlines()
    lines[6] = _event(bad_step, "observation", {"frame_path": "frames/frame_000003.png"})
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(SessionError, match="does not increase"):
        load_session_events(session_dir)


@pytest.mark.parametrize("frame_path", ["../good/frames/frame_000000.png", "/etc/passwd", "frames/../../x.png"])
def test_frame_paths_must_stay_inside_the_session(session_dir, frame_path):
    shard = session_dir / "events_shard_000.jsonl"
    lines = shard.read_text().splitlines()
    lines[0] = _event(0, "observation", {"frame_path": frame_path})
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(SessionError, match="frame_path"):
        load_session(session_dir)


def test_symlinked_frame_leading_outside_is_refused(session_dir, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (224, 224)).save(outside)
    frame = session_dir / "frames" / "frame_000001.png"
    frame.unlink()
    frame.symlink_to(outside)
    with pytest.raises(SessionError, match="leads outside the session folder"):
        load_session(session_dir)


# ---- frames and sessions --------------------------------------------------------------------


def test_missing_frame_is_refused_naming_it(session_dir):
    (session_dir / "frames" / "frame_000002.png").unlink()
    with pytest.raises(SessionError, match="frame_000002.png is missing"):
        load_session(session_dir)


def _deny(monkeypatch, path: Path, folder: bool) -> None:
    """Act as if ``path`` were chmod 000 for a user other than root (the tests run as root, whom chmod does not stop).

    A file cannot be opened. A folder cannot be listed, and nothing inside it can be reached (stat, lstat,
    open); the folder itself can still be looked at from its parent, as the kernel does."""
    def wrap(real, including_the_folder: bool):
        def call(target, *args, **kwargs):
            if not isinstance(target, int):  # not a file descriptor
                target_path = Path(os.fsdecode(target))
                inside = folder and target_path.is_relative_to(path) and target_path != path
                if inside or (target_path == path and (including_the_folder or not folder)):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target_path))
            return real(target, *args, **kwargs)
        return call

    for module, name in ((builtins, "open"), (io, "open")):
        monkeypatch.setattr(module, name, wrap(getattr(module, name), including_the_folder=False))
    if folder:
        for name in ("scandir", "listdir"):
            monkeypatch.setattr(os, name, wrap(getattr(os, name), including_the_folder=True))
        for name in ("stat", "lstat"):
            monkeypatch.setattr(os, name, wrap(getattr(os, name), including_the_folder=False))


@pytest.mark.parametrize("unreadable, folder, message", [
    ("frames", True, "good/frames/ cannot be read (permission denied)"),
    ("session_meta.json", False, "good/session_meta.json cannot be read (permission denied)"),
    ("events_shard_000.jsonl", False, "good/events_shard_000.jsonl cannot be read (permission denied)"),
])
def test_an_unreadable_file_or_folder_is_named_without_the_server_path(root, session_dir, monkeypatch, unreadable,
                                                                       folder, message):
    _deny(monkeypatch, session_dir / unreadable, folder)
    with pytest.raises(SessionError) as error_info:
        load_session("good", root)
    assert str(error_info.value) == message
    (summary,) = scan_sessions(root)
    assert summary.reason == message and str(root) not in summary.reason


def test_a_frame_unreadable_after_loading_is_named_without_the_server_path(root, session_dir, monkeypatch):
    session = load_session("good", root)
    _deny(monkeypatch, session_dir / "frames" / "frame_000003.png", folder=False)
    with pytest.raises(SessionError, match=r"^good/frames/frame_000003\.png cannot be read \(permission denied\)$"):
        session.frame(3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_frames_become_rgb(tmp_path, mode):
    rgb = ToroidalDotRobot(start=(50, 60)).get_observation()
    path = tmp_path / "frame.png"
    Image.fromarray(rgb).convert(mode).save(path)
    frame = load_frame_image(path, size=224)
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, rgb)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_frames_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "frame_000000.png"
    if content is None:  # a truncated PNG
        Image.fromarray(ToroidalDotRobot(seed=0).get_observation()).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(SessionError, match="frame_000000.png"):
        load_frame_image(path)


def test_frame_of_the_wrong_size_is_refused(session_dir):
    Image.new("RGB", (100, 80)).save(session_dir / "frames" / "frame_000001.png")
    session = load_session(session_dir)
    with pytest.raises(SessionError, match="frame_000001.png is 100x80 pixels"):
        session.frame(1)


def test_fewer_than_three_frames_is_refused(root):
    path = record_session("alternate", 1, seed=0, name="short", root=root)
    with pytest.raises(SessionError, match="at least 3 frames"):
        load_session(path)


def test_wrong_action_space_is_refused(session_dir):
    meta = json.loads((session_dir / "session_meta.json").read_text())
    meta["action_space"] = [{"action": 0}, {"action": 1}, {"action": 2}]
    _write_meta(session_dir, meta)
    with pytest.raises(SessionError, match="action_space"):
        load_session(session_dir)


def test_loaded_session_gives_frames_and_following_actions(root, session_dir):
    session = load_session("good", root)
    assert session.num_frames == 7 and session.num_actions == 6
    assert [session.action_after(i) for i in range(7)] == [0, 1, 0, 1, 0, 1, None]
    assert np.array_equal(session.frame(0), ToroidalDotRobot(seed=0).get_observation())
    with pytest.raises(IndexError):
        session.frame(7)


def test_seed_style_jpg_session_loads(root):
    folder = _seed_style_session(root)
    session = load_session("seed_jpg", root)
    assert session.num_frames == 4 and [a["action"] for a in session.actions] == [1, 1, 1]
    frame = session.frame(1)
    expected = ToroidalDotRobot(seed=3)
    expected.execute_action(1)
    assert np.abs(frame.astype(int) - expected.get_observation()).mean() < 2  # jpeg is lossy
    assert "2025-01-02 03:04:05.678" in session_info_markdown(session)
    assert folder.name in [s.name for s in scan_sessions(root) if s.ok]


def test_one_broken_session_does_not_break_the_listing(root, session_dir):
    broken = root / "broken"
    broken.mkdir()
    _write_meta(broken, "{")
    summaries = {s.name: s for s in scan_sessions(root)}
    assert summaries["good"].ok and summaries["good"].num_frames == 7 and summaries["good"].num_actions == 6
    assert not summaries["broken"].ok and "session_meta.json" in summaries["broken"].reason


def test_format_timestamp_handles_numbers_strings_and_junk():
    assert format_timestamp("2025-01-02T03:04:05.5") == "2025-01-02 03:04:05.500"
    assert len(format_timestamp(1_700_000_000.25)) == len("2025-01-02 03:04:05.250")
    assert format_timestamp(None) == format_timestamp("nonsense") == format_timestamp(float("nan")) == "n/a"


def test_info_markdown_lists_counts_and_notes(session_dir):
    shard = session_dir / "events_shard_000.jsonl"
    shard.write_bytes(shard.read_bytes() + b'{"step": 13')
    text = session_info_markdown(load_session(session_dir))
    assert "**Frames:** 7" in text and "**Actions:** 6" in text and "alternate" in text and "incomplete" in text


def test_markdown_escape_puts_a_backslash_before_each_markdown_character():
    assert markdown_escape("a*b_[c](d)<e>#|!`{}\\ f.g") == "a\\*b\\_\\[c\\](d)\\<e\\>\\#\\|\\!\\`\\{\\}\\\\ f.g"
    assert markdown_escape(3) == "3"
