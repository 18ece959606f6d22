"""Tests of the session writer, the RecordingRobot wrapper and the record_session CLI."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import recording_robot
from record_session import main, record_session
from recording_robot import RecordingError, RecordingLimitError, RecordingRobot, SessionExistsError, SessionWriter
from session_explorer_lib import load_frame_image, load_session
from toroidal_dot_robot import ToroidalDotRobot

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_main_records_a_loadable_session(tmp_path, capsys):
    assert main(["--pattern", "double_move", "--steps", "6", "--seed", "2", "--out", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.parent == tmp_path and path.name.startswith("toroidal_dot_double_move_") and path.name.endswith("_2")
    session = load_session(path)
    assert [a["action"] for a in session.actions] == [1, 1, 0, 1, 1, 0]
    assert session.metadata["status"] == "complete" and session.metadata["pattern"] == "double_move"


def test_subprocess_alternate_session_loads_with_51_frames(tmp_path):
    result = subprocess.run(
        [sys.executable, "record_session.py", "--pattern", "alternate", "--steps", "50", "--seed", "1",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    session = load_session(Path(result.stdout.strip().splitlines()[-1]))
    assert session.num_frames == 51 and session.num_actions == 50
    assert [a["action"] for a in session.actions] == [0, 1] * 25
    steps = [o["step"] for o in session.observations]
    assert steps == list(range(0, 101, 2))


def test_metadata_records_counts_and_environment(tmp_path):
    path = record_session("always_move", 4, seed=9, name="meta", root=tmp_path)
    meta = json.loads((path / "session_meta.json").read_text())
    assert meta["total_steps"] == 9 and meta["total_shards"] == 1 and meta["format_version"] == 1
    assert meta["action_space"] == [{"action": 0}, {"action": 1}]
    assert (meta["dot_radius"], meta["move_pixels"], meta["img_size"], meta["seed"]) == (5, 27, 224, 9)
    assert (meta["start_x"], meta["start_y"]) == ToroidalDotRobot(seed=9).get_position()
    assert meta["end_time"] is not None and meta["status"] == "complete"


def test_png_frames_are_bit_exact(tmp_path):
    path = record_session("alternate", 8, seed=4, name="exact", root=tmp_path)
    session = load_session(path)
    robot = ToroidalDotRobot(seed=4)
    for i in range(session.num_frames):
        assert np.array_equal(load_frame_image(session.observations[i]["full_path"]), robot.get_observation())
        if i < session.num_actions:
            robot.execute_action(session.actions[i]["action"])


def test_shards_roll_over_at_shard_size(tmp_path):
    robot = ToroidalDotRobot(seed=0)
    writer = SessionWriter(tmp_path, "shards", "ToroidalDotRobot", robot.action_space, robot.params(), "always_move",
                           shard_size=4)
    with RecordingRobot(robot, writer) as recorder:
        recorder.get_observation()
        for _ in range(5):
            recorder.execute_action({"action": 1})
            recorder.get_observation()
    names = sorted(p.name for p in writer.path.glob("events_shard_*.jsonl"))
    assert names == ["events_shard_000.jsonl", "events_shard_001.jsonl", "events_shard_002.jsonl"]
    assert load_session(writer.path).num_frames == 6


def test_existing_name_is_refused_and_nothing_overwritten(tmp_path, capsys):
    path = record_session("alternate", 3, seed=0, name="taken", root=tmp_path)
    before = _snapshot(path)
    with pytest.raises(SessionExistsError, match="already exists"):
        record_session("always_move", 5, seed=1, name="taken", root=tmp_path)
    code = main(["--pattern", "always_move", "--steps", "5", "--name", "taken", "--out", str(tmp_path)])
    assert code != 0 and "already exists" in capsys.readouterr().err
    assert _snapshot(path) == before


def test_default_names_never_collide(tmp_path):
    first = record_session("alternate", 2, seed=3, root=tmp_path)
    second = record_session("alternate", 2, seed=3, root=tmp_path)  # same second, same seed
    assert first != second and first.is_dir() and second.is_dir()


def test_bad_cli_arguments_exit_non_zero_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--pattern", "zigzag", "--steps", "5", "--out", str(tmp_path)])
    assert exit_info.value.code != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["--pattern", "alternate", "--steps", "5", "--name", "../escape", "--out", str(tmp_path)]) != 0
    assert list(tmp_path.iterdir()) == []


def test_recording_robot_refuses_an_action_outside_the_space(tmp_path):
    robot = ToroidalDotRobot(seed=0)
    writer = SessionWriter(tmp_path, "bad", "ToroidalDotRobot", robot.action_space, robot.params(), None)
    recorder = RecordingRobot(robot, writer)
    recorder.get_observation()
    with pytest.raises(ValueError):
        recorder.execute_action({"action": 3})
    assert writer.total_steps == 1  # the bad action was not recorded
    recorder.cleanup()
    assert writer.status == "complete"


def test_torn_last_line_still_loads(tmp_path):
    path = record_session("alternate", 10, seed=1, name="torn", root=tmp_path)
    shard = path / "events_shard_000.jsonl"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 20])  # cut the last event in half, as a kill mid-write would
    session = load_session(path)
    assert session.num_frames == 10 and session.num_actions == 10
    assert any("incomplete" in note for note in session.notes)


def test_sigkilled_recording_still_loads(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "record_session.py", "--pattern", "alternate", "--steps", "1000000", "--seed", "1",
         "--name", "killed", "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    shard = tmp_path / "killed" / "events_shard_000.jsonl"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not shard.exists() or shard.stat().st_size < 3000):
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    session = load_session(tmp_path / "killed")
    assert session.num_frames >= 3
    assert session.metadata["status"] == "recording"
    assert np.array_equal(session.frame(0), ToroidalDotRobot(seed=1).get_observation())


def test_disk_limit_stops_the_recording_and_keeps_a_valid_session(tmp_path):
    limit = 12_000
    with pytest.raises(RecordingLimitError, match="max_session_bytes"):
        record_session("alternate", 500, seed=0, name="limited", root=tmp_path, max_bytes=limit)
    path = tmp_path / "limited"
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) <= limit
    session = load_session(path)
    assert 3 <= session.num_frames < 501
    assert session.metadata["status"] == "stopped" and "limit" in session.metadata["stop_reason"]


def test_cli_disk_limit_exits_non_zero(tmp_path, capsys):
    code = main(["--pattern", "alternate", "--steps", "500", "--name", "cap", "--max-bytes", "12000",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "max_session_bytes" in err


def test_disk_full_stops_with_recording_error(tmp_path, monkeypatch):
    real_write = recording_robot.write_atomic
    frames_written = []

    def write_then_fill_disk(path, data, fsync=True, replace=True):
        if path.parent.name == "frames":
            if len(frames_written) >= 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            frames_written.append(path)
        real_write(path, data, fsync, replace)

    monkeypatch.setattr(recording_robot, "write_atomic", write_then_fill_disk)
    with pytest.raises(RecordingError, match="No space left") as error_info:
        record_session("alternate", 50, seed=0, name="full", root=tmp_path)
    assert not isinstance(error_info.value, RecordingLimitError)
    session = load_session(tmp_path / "full")
    assert session.num_frames == 5
    assert session.metadata["status"] == "stopped"
    assert not list((tmp_path / "full" / "frames").glob("*.tmp"))


def test_writer_refuses_writes_after_close(tmp_path):
    robot = ToroidalDotRobot(seed=0)
    with SessionWriter(tmp_path, "closed", "ToroidalDotRobot", robot.action_space, robot.params(), None) as writer:
        writer.record_observation(robot.get_observation())
    with pytest.raises(RecordingError, match="complete"):
        writer.record_observation(robot.get_observation())
