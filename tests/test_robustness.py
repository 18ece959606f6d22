"""Hostile and damaged input, faults and concurrent writers, through the library (the web API's side is
``test_security_api.py``).

Every case goes through a real entry point:

- damaged sessions: ``session_explorer_lib.load_session`` / ``scan_sessions`` on a copy of a session
  recorded by ``record_session`` and then damaged;
- damaged checkpoints and interrupted or concurrent saves: the world model's ``save_checkpoint`` /
  ``load_checkpoint``, in this process, in threads and in forked processes killed with SIGKILL;
- killed and starved recordings: ``record_session.py`` as a subprocess (SIGKILL, a real full tmpfs)
  and through ``main()`` with a disk that fills at a chosen write;
- a self-count: the cases declared here must all be collected, none skipped.

Nothing here may skip or xfail: the engine bugs this suite found (unchecked zip CRCs, optimizer moments
and step) were fixed, and the self-count at the end fails on any skip mark.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import atomic_files
import recording_robot
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from checkpoints import CheckpointError
from conftest import TINY
from suite_census import assert_suite_collected
from record_session import main as record_main
from record_session import record_session
from session_explorer_lib import SessionError, load_frame_image, load_session, scan_sessions
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot

REPO = Path(__file__).resolve().parents[1]
MARKER_PARAM = "mae.cls_token"  # the weight the save tests stamp with the step, to tell saves apart
SHARD0 = "events_shard_000.jsonl"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) as {relative path: bytes}."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# =============================================================================
# damaged sessions
# =============================================================================
#
# "good" is alternate, 6 steps, seed 0: 13 events (observation at even steps, action at odd steps),
# 7 frames frame_000000..frame_000006.png. Each case damages a copy of it; "other" stays intact.


@pytest.fixture(scope="module")
def session_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("session_template")
    record_session("alternate", 6, seed=0, name="good", root=root)
    record_session("always_move", 4, seed=1, name="other", root=root)
    return root


@pytest.fixture
def sessions_root(session_template, tmp_path) -> Path:
    root = tmp_path / "sessions"
    shutil.copytree(session_template, root, symlinks=True)
    return root


def _lines(d: Path, shard: str = SHARD0) -> list[bytes]:
    return (d / shard).read_bytes().split(b"\n")[:-1]  # the complete lines, without their newlines


def _write_lines(d: Path, lines: list[bytes], shard: str = SHARD0) -> None:
    (d / shard).write_bytes(b"".join(line + b"\n" for line in lines))


def _event(step, kind, data) -> bytes:
    return json.dumps({"step": step, "type": kind, "data": data, "timestamp": 1_700_000_000.0}).encode()


def _set_line(index: int, line: bytes):
    def damage(d: Path) -> None:
        lines = _lines(d)
        lines[index] = line
        _write_lines(d, lines)
    return damage


def _meta(change):
    """Damage that rewrites session_meta.json: ``change`` is raw bytes, or a function editing the dict."""
    def damage(d: Path) -> None:
        path = d / "session_meta.json"
        if isinstance(change, bytes):
            path.write_bytes(change)
        else:
            meta = json.loads(path.read_text())
            change(meta)
            path.write_text(json.dumps(meta))  # allow_nan: NaN is written as the bare token NaN
    return damage


def _meta_set(key, value):
    return _meta(lambda m: m.__setitem__(key, value))


def _split_shards(d: Path, middle: list[bytes] | None, last_number: int = 2) -> None:
    # lines 1-6 in shard 000, ``middle`` (None = no file) in 001, lines 7-13 in shard ``last_number``
    lines = _lines(d)
    _write_lines(d, lines[:6])
    if middle is not None:
        _write_lines(d, middle, "events_shard_001.jsonl")
    _write_lines(d, lines[6:], f"events_shard_{last_number:03d}.jsonl")


def _rm(rel: str):
    return lambda d: (d / rel).unlink()


def _replace_with_dir(rel: str):
    def damage(d: Path) -> None:
        (d / rel).unlink()
        (d / rel).mkdir()
    return damage


def _meta_link_outside(d: Path) -> None:
    outside = d.parent.parent / "outside_meta.json"
    outside.write_bytes((d / "session_meta.json").read_bytes())
    (d / "session_meta.json").unlink()
    (d / "session_meta.json").symlink_to(outside)


def _frame_bytes(content: bytes | None = None, keep: int | None = None):
    def damage(d: Path) -> None:
        path = d / "frames" / "frame_000003.png"
        path.write_bytes(content if content is not None else path.read_bytes()[:keep])
    return damage


def _frame_image(image_factory):
    def damage(d: Path) -> None:
        image_factory().save(d / "frames" / "frame_000003.png")
    return damage


def _frame_mode(mode: str):
    def damage(d: Path) -> None:
        path = d / "frames" / "frame_000003.png"
        with Image.open(path) as image:
            converted = image.convert(mode)
        converted.save(path)
    return damage


def _torn_tail(d: Path) -> None:
    data = (d / SHARD0).read_bytes()
    (d / SHARD0).write_bytes(data[: len(data) - 30])  # the last event cut mid-line, as a kill leaves it


def _torn_fifth_line(d: Path) -> None:
    lines = _lines(d)
    (d / SHARD0).write_bytes(b"".join(line + b"\n" for line in lines[:4]) + lines[4][:25])


def _duplicate_line(d: Path) -> None:
    lines = _lines(d)
    _write_lines(d, lines[:4] + [lines[3]] + lines[4:])


def _huge_int_line(d: Path) -> None:
    _set_line(3, b'{"step": ' + b"9" * 5000 + b', "type": "action", "data": {"action": 1}}')(d)


REFUSED, REPAIRED, FRAME_REFUSED, CONVERTED = "refused", "repaired", "frame refused", "converted"
META = "good/session_meta.json"
LINE4 = "good/events_shard_000.jsonl line 4"
FRAME3 = "good/frames/frame_000003.png"

# (id, damage, expectation); expectations:
#   (REFUSED, fragments...)              load_session raises SessionError naming the file and the problem
#   (REPAIRED, note, frames, actions)    loads; the repair is stated in Session.notes
#   (FRAME_REFUSED, fragments...)        loads (frames decode lazily); frame 3 raises SessionError naming it
#   (CONVERTED, mode name)               loads; frame 3 comes back as the original RGB, with a note
SESSION_CASES = [
    # -- session_meta.json: missing, empty, invalid
    ("meta-missing", _rm("session_meta.json"), (REFUSED, META, "is missing")),
    ("meta-empty", _meta(b""), (REFUSED, META, "is empty")),
    ("meta-blank", _meta(b" \n\t\n"), (REFUSED, META, "is empty")),
    ("meta-invalid-json", _meta(b"{not json"), (REFUSED, META, "is not valid JSON")),
    ("meta-truncated", lambda d: _meta((d / "session_meta.json").read_bytes()[:60])(d),
     (REFUSED, META, "is not valid JSON")),
    ("meta-not-utf8", _meta(b'{"session_name": "\xff\xfe"}'), (REFUSED, META, "not UTF-8")),
    ("meta-not-an-object", _meta(b"[1, 2]"), (REFUSED, META, "is not a JSON object")),
    ("meta-deeply-nested", _meta(b"[" * 100_000), (REFUSED, META, "is not valid JSON")),
    ("meta-5000-digit-integer", _meta(b'{"total_steps": 1' + b"0" * 5000 + b"}"), (REFUSED, META, "is not valid JSON")),
    ("meta-over-1MiB", lambda d: _meta((d / "session_meta.json").read_bytes() + b" " * (1 << 20))(d),
     (REFUSED, META, "is too large")),
    ("meta-is-a-directory", _replace_with_dir("session_meta.json"), (REFUSED, META, "is not a regular file")),
    ("meta-links-outside", _meta_link_outside, (REFUSED, META, "leading outside the session folder")),
    ("meta-without-session_name", _meta(lambda m: m.pop("session_name")),
     (REFUSED, META, "missing required key(s): session_name")),
    # -- session_meta.json: wrong types
    ("meta-session_name-int", _meta_set("session_name", 5), (REFUSED, META, "'session_name' should be a string")),
    ("meta-robot_type-null", _meta_set("robot_type", None), (REFUSED, META, "'robot_type' should be a string")),
    ("meta-action_space-string", _meta_set("action_space", "01"), (REFUSED, META, "'action_space' should be a list")),
    ("meta-action_space-of-ints", _meta_set("action_space", [0, 1]),
     (REFUSED, META, "'action_space' should be a list of objects")),
    ("meta-total_steps-string", _meta_set("total_steps", "13"), (REFUSED, META, "'total_steps' should be an integer")),
    ("meta-shard_size-bool", _meta_set("shard_size", True), (REFUSED, META, "'shard_size' should be an integer")),
    ("meta-img_size-float", _meta_set("img_size", 224.0), (REFUSED, META, "'img_size' should be an integer")),
    ("meta-img_size-zero", _meta_set("img_size", 0), (REFUSED, META, "'img_size' should be a frame side")),
    ("meta-start_time-NaN", _meta_set("start_time", float("nan")), (REFUSED, META, "'start_time' should be")),
    ("meta-status-list", _meta_set("status", ["complete"]), (REFUSED, META, "'status' should be a string")),
    # -- an action space that is not the dot's
    ("action-space-three-actions", _meta_set("action_space", [{"action": 0}, {"action": 1}, {"action": 2}]),
     (REFUSED, META, "is not the toroidal dot's")),
    ("action-space-empty", _meta_set("action_space", []), (REFUSED, META, "is not the toroidal dot's")),
    ("action-space-other-key", _meta_set("action_space", [{"move": 0}, {"move": 1}]),
     (REFUSED, META, "is not the toroidal dot's")),
    ("action-space-repeated", _meta_set("action_space", [{"action": 1}, {"action": 1}]),
     (REFUSED, META, "is not the toroidal dot's")),
    # -- shards: none, empty, gaps
    ("no-shards", _rm(SHARD0), (REFUSED, "good/events_shard_*.jsonl", "no event shards found")),
    ("only-shard-empty", lambda d: (d / SHARD0).write_bytes(b""),
     (REFUSED, "good: 0 frame(s) recorded", "events_shard_000.jsonl is empty")),
    ("empty-last-shard", lambda d: (d / "events_shard_001.jsonl").write_bytes(b""),
     (REPAIRED, "events_shard_001.jsonl is empty (recording interrupted) and was skipped", 7, 6)),
    ("empty-middle-shard", lambda d: _split_shards(d, middle=[]),
     (REFUSED, "good/events_shard_001.jsonl", "is empty but later shards follow")),
    ("shard-gap", lambda d: _split_shards(d, middle=None), (REFUSED, "good/events_shard_001.jsonl", "is missing")),
    ("shards-start-at-1", lambda d: (d / SHARD0).rename(d / "events_shard_001.jsonl"),
     (REFUSED, "good/events_shard_000.jsonl", "is missing")),
    ("shard-number-twice", lambda d: (d / "events_shard_0.jsonl").write_bytes((d / SHARD0).read_bytes()),
     (REFUSED, "good/events_shard_0", "are both shard 0")),
    ("shard-is-a-directory", lambda d: (d / "events_shard_001.jsonl").mkdir(),
     (REFUSED, "good/events_shard_001.jsonl", "is not a regular file")),
    # -- steps
    ("duplicate-step", _set_line(6, _event(5, "observation", {"frame_path": "frames/frame_000003.png"})),
     (REFUSED, "good/events_shard_000.jsonl line 7", "step 5 does not increase")),
    ("decreasing-step", _set_line(6, _event(2, "observation", {"frame_path": "frames/frame_000003.png"})),
     (REFUSED, "good/events_shard_000.jsonl line 7", "step 2 does not increase")),
    ("duplicated-line", _duplicate_line, (REFUSED, "good/events_shard_000.jsonl line 5", "step 3 does not increase")),
    # -- torn and invalid lines
    ("torn-last-line", _torn_tail,
     (REPAIRED, "events_shard_000.jsonl line 13 was incomplete (recording interrupted) and was dropped", 6, 6)),
    ("NUL-padded-tail", lambda d: (d / SHARD0).write_bytes((d / SHARD0).read_bytes() + b"\x00" * 64),
     (REPAIRED, "events_shard_000.jsonl line 14 was incomplete", 7, 6)),
    ("invalid-line-mid-file", _set_line(3, b"garbage"), (REFUSED, LINE4, "is not valid JSON")),
    ("binary-line-mid-file", _set_line(3, b"\xff\xfe\x00\x01"), (REFUSED, LINE4, "is not valid JSON")),
    ("deeply-nested-line-mid-file", _set_line(3, b"[" * 100_000), (REFUSED, LINE4, "is not valid JSON")),
    ("5000-digit-step-mid-file", _huge_int_line, (REFUSED, LINE4, "is not valid JSON")),
    ("event-not-an-object", _set_line(3, b"[1, 2]"), (REFUSED, LINE4, "an event must be a JSON object")),
    ("event-step-string", _set_line(3, _event("3", "action", {"action": 1})),
     (REFUSED, LINE4, "'step' should be a non-negative integer")),
    ("event-type-unknown", _set_line(3, _event(3, "jump", {"action": 1})),
     (REFUSED, LINE4, "'type' should be 'observation' or 'action'")),
    ("event-data-list", _set_line(3, _event(3, "action", [1])), (REFUSED, LINE4, "'data' should be an object")),
    ("event-timestamp-string", _set_line(3, json.dumps(
        {"step": 3, "type": "action", "data": {"action": 1}, "timestamp": "now"}).encode()),
     (REFUSED, LINE4, "'timestamp' should be a number")),
    ("observation-without-frame_path", _set_line(4, _event(4, "observation", {})),
     (REFUSED, "good/events_shard_000.jsonl line 5", "an observation needs a 'frame_path' string")),
    ("action-not-an-integer", _set_line(3, _event(3, "action", {"action": "1"})),
     (REFUSED, LINE4, "Invalid action {'action': '1'}: expected {'action': 0} (stay) or {'action': 1} (move right)")),
    ("action-outside-the-space", _set_line(3, _event(3, "action", {"action": 2})),
     (REFUSED, LINE4, "Invalid action {'action': 2}")),
    # -- frames
    ("frame-missing", _rm("frames/frame_000003.png"), (REFUSED, FRAME3, "is missing")),
    ("frames-folder-missing", lambda d: shutil.rmtree(d / "frames"),
     (REFUSED, "good/frames/frame_000000.png", "is missing", "and 6 more")),
    ("frame-is-a-directory", _replace_with_dir("frames/frame_000003.png"), (REFUSED, FRAME3, "is not a regular file")),
    ("frame-truncated-to-100-bytes", _frame_bytes(keep=100), (FRAME_REFUSED, FRAME3, "is truncated or unreadable")),
    ("frame-truncated-to-half", lambda d: _frame_bytes(keep=(d / "frames/frame_000003.png").stat().st_size // 2)(d),
     (FRAME_REFUSED, FRAME3, "is truncated or unreadable")),
    ("frame-zero-bytes", _frame_bytes(b""), (FRAME_REFUSED, FRAME3, "is not an image")),
    ("frame-not-an-image", _frame_bytes(b"this is not a PNG"), (FRAME_REFUSED, FRAME3, "is not an image")),
    ("frame-wrong-size", _frame_image(lambda: Image.new("RGB", (100, 80))),
     (FRAME_REFUSED, FRAME3, "is 100x80 pixels but this session's frames are 224x224")),
    ("frame-decompression-bomb", _frame_image(lambda: Image.new("1", (4100, 4100))),
     (FRAME_REFUSED, FRAME3, "far too large")),
    ("frame-grayscale", _frame_mode("L"), (CONVERTED, "grayscale")),
    ("frame-RGBA", _frame_mode("RGBA"), (CONVERTED, "RGBA")),
    ("frame-palette", _frame_mode("P"), (CONVERTED, "palette")),
    # -- too short
    ("fewer-than-3-frames", lambda d: _write_lines(d, _lines(d)[:3]),
     (REFUSED, "good: 2 frame(s) recorded", "need at least 3 frames")),
    ("fewer-than-3-frames-after-torn-line", _torn_fifth_line,
     (REFUSED, "good: 2 frame(s) recorded", "need at least 3 frames", "line 5 was incomplete")),
]


def _session_params(*kinds):
    return [pytest.param(damage, expect, id=case_id) for case_id, damage, expect in SESSION_CASES
            if expect[0] in kinds]


def _damaged_root(sessions_root: Path, damage) -> Path:
    damage(sessions_root / "good")
    return sessions_root


@pytest.mark.parametrize("damage, expect", _session_params(REFUSED))
def test_damaged_session_is_refused_naming_file_and_problem(sessions_root, damage, expect):
    root = _damaged_root(sessions_root, damage)
    with pytest.raises(SessionError) as error_info:
        load_session("good", root)
    message = str(error_info.value)
    for fragment in expect[1:]:
        assert fragment in message, message
    assert str(root) not in message, "messages name files relative to the session, never server paths"


@pytest.mark.parametrize("damage, expect", _session_params(REPAIRED))
def test_damaged_session_loads_with_the_repair_stated(sessions_root, damage, expect):
    _, note, frames, actions = expect
    session = load_session("good", _damaged_root(sessions_root, damage))
    assert any(note in n for n in session.notes), session.notes
    assert (session.num_frames, session.num_actions) == (frames, actions)
    assert np.array_equal(session.frame(frames - 1), load_frame_image(session.observations[-1]["full_path"]))


@pytest.mark.parametrize("damage, expect", _session_params(FRAME_REFUSED))
def test_damaged_frame_is_refused_naming_it_when_shown(sessions_root, damage, expect):
    session = load_session("good", _damaged_root(sessions_root, damage))  # frames decode lazily
    with pytest.raises(SessionError) as error_info:
        session.frame(3)
    for fragment in expect[1:]:
        assert fragment in str(error_info.value), str(error_info.value)
    assert session.frame(2).shape == session.frame(4).shape == (224, 224, 3)  # its neighbours still show


@pytest.mark.parametrize("damage, expect", _session_params(CONVERTED))
def test_frame_in_another_colour_mode_is_converted_with_a_note(sessions_root, session_template, damage, expect):
    session = load_session("good", _damaged_root(sessions_root, damage))
    original = load_frame_image(session_template / "good" / "frames" / "frame_000003.png")
    frame = session.frame(3)
    assert frame.dtype == np.uint8 and np.array_equal(frame, original)
    assert any(f"frame_000003.png was stored as {expect[1]}" in n and "converted to RGB" in n for n in session.notes), \
        session.notes


@pytest.mark.parametrize("damage, expect", _session_params(REFUSED, REPAIRED, FRAME_REFUSED, CONVERTED))
def test_other_sessions_still_list_and_load_beside_a_damaged_one(sessions_root, damage, expect):
    root = _damaged_root(sessions_root, damage)
    summaries = {s.name: s for s in scan_sessions(root)}
    assert set(summaries) == {"good", "other"}
    assert summaries["good"].ok == (expect[0] != REFUSED)
    if expect[0] == REFUSED:
        assert expect[1] in summaries["good"].reason
    assert summaries["other"].ok and summaries["other"].num_frames == 5
    other = load_session("other", root)
    assert other.num_frames == 5 and other.frame(4).shape == (224, 224, 3)


# =============================================================================
# checkpoints
# =============================================================================


def _world_model(seed: int, iterations: int, config=TINY) -> AutoencoderConcatPredictorWorldModel:
    wm = AutoencoderConcatPredictorWorldModel(
        ToroidalDotRobot(seed=seed), make_selector("alternate"), device="cpu", config=config
    )
    if iterations:
        wm.run(iterations)
    return wm


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> bytes:
    """A complete checkpoint (step 1) of a model that differs from the live one."""
    folder = tmp_path_factory.mktemp("checkpoint")
    return _world_model(seed=0, iterations=3).save_checkpoint(folder / "good.pth").read_bytes()


@pytest.fixture(scope="module")
def trained() -> AutoencoderConcatPredictorWorldModel:
    return _world_model(seed=5, iterations=4)


@pytest.fixture
def live(trained) -> AutoencoderConcatPredictorWorldModel:
    """The model in use (step 2, with optimizer state), which a bad file must leave exactly as it is."""
    wm = _world_model(seed=5, iterations=0)
    wm.model.load_state_dict(trained.model.state_dict())
    wm.optimizer.load_state_dict(copy.deepcopy(trained.optimizer.state_dict()))
    wm.step, wm.iteration = trained.step, trained.iteration
    return wm


def _model_state(wm) -> dict:
    return {
        "model": {k: v.clone() for k, v in wm.model.state_dict().items()},
        "optimizer": copy.deepcopy(wm.optimizer.state_dict()),
        "step": wm.step,
        "iteration": wm.iteration,
    }


def _assert_same_state(a: dict, b: dict) -> None:
    assert (a["step"], a["iteration"]) == (b["step"], b["iteration"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, value in sa[k].items():
            assert torch.equal(value, sb[k][name]) if isinstance(value, torch.Tensor) else value == sb[k][name]


def _assert_refused_and_unchanged(wm, path: Path, *fragments: str) -> str:
    before = _model_state(wm)
    with pytest.raises(CheckpointError) as error_info:
        wm.load_checkpoint(path)
    message = str(error_info.value)
    assert path.name in message, message
    for fragment in fragments:
        assert fragment in message, message
    _assert_same_state(before, _model_state(wm))
    return message


def _payload(good: bytes) -> dict:
    return torch.load(io.BytesIO(good), map_location="cpu", weights_only=True)


def _write_payload(edit):
    def make(path: Path, good: bytes) -> None:
        payload = _payload(good)
        edit(payload)
        torch.save(payload, path)
    return make


def _truncated(fraction: float | None = None, keep: int | None = None):
    def make(path: Path, good: bytes) -> None:
        path.write_bytes(good[: keep if keep is not None else int(len(good) * fraction)])
    return make


def _other_architecture(**changes):
    def make(path: Path, good: bytes) -> None:
        _world_model(seed=0, iterations=0, config=dataclasses.replace(TINY, **changes)).save_checkpoint(path)
    return make


def _first_weight(payload: dict) -> str:
    return next(iter(payload["model"]))


UNREADABLE = "is not a readable checkpoint"
NO_WEIGHTS = "holds no complete set of model weights"
CHECKPOINT_CASES = [
    ("zero-bytes", lambda p, g: p.write_bytes(b""), UNREADABLE),
    ("truncated-to-1-byte", _truncated(keep=1), UNREADABLE),
    ("truncated-to-10-bytes", _truncated(keep=10), UNREADABLE),
    ("truncated-to-100-bytes", _truncated(keep=100), UNREADABLE),
    ("truncated-to-50%", _truncated(0.5), UNREADABLE),
    ("truncated-to-99%", _truncated(0.99), UNREADABLE),
    ("truncated-by-1-byte", lambda p, g: p.write_bytes(g[:-1]), UNREADABLE),
    ("random-4KiB", lambda p, g: p.write_bytes(np.random.default_rng(1).bytes(4096)), UNREADABLE),
    ("random-same-size", lambda p, g: p.write_bytes(np.random.default_rng(2).bytes(len(g))), UNREADABLE),
    ("a-directory", lambda p, g: p.mkdir(), "no checkpoint file"),
    ("missing", lambda p, g: None, "no checkpoint file"),
    ("another-architecture-decoder-width", _other_architecture(decoder_embed_dim=64), "another architecture"),
    ("another-architecture-depth", _other_architecture(depth=2), "another architecture"),
    ("bare-state-dict", lambda p, g: torch.save(_payload(g)["model"], p), "is not a world-model checkpoint"),
    ("a-list", lambda p, g: torch.save([1, 2, 3], p), "is not a world-model checkpoint"),
    ("without-weights", _write_payload(lambda pl: pl.pop("model")), NO_WEIGHTS),
    ("empty-weights", _write_payload(lambda pl: pl.__setitem__("model", {})), NO_WEIGHTS),
    ("one-weight-missing", _write_payload(lambda pl: pl["model"].pop(_first_weight(pl))), NO_WEIGHTS),
    ("weight-is-a-string", _write_payload(lambda pl: pl["model"].__setitem__(_first_weight(pl), "w")),
     "is missing, misshapen or not finite"),
    ("weight-misshapen", _write_payload(lambda pl: pl["model"].__setitem__(_first_weight(pl), torch.zeros(3))),
     "is missing, misshapen or not finite"),
    ("weight-NaN", _write_payload(lambda pl: pl["model"][_first_weight(pl)].fill_(float("nan"))),
     "is missing, misshapen or not finite"),
    ("step-not-a-number", _write_payload(lambda pl: pl.__setitem__("step", "many")), "must be a whole number"),
]


@pytest.mark.parametrize("make, expected", [pytest.param(m, e, id=i) for i, m, e in CHECKPOINT_CASES])
def test_bad_checkpoint_is_refused_and_the_live_model_unchanged(tmp_path, live, good_checkpoint, make, expected):
    path = tmp_path / "ck.pth"
    make(path, good_checkpoint)
    _assert_refused_and_unchanged(live, path, expected)


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for any code a checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_torch_zip(path: Path, marker: Path) -> None:
    torch.save({"format": "concat-world-model/1", "model": _RunsCode(marker)}, path)


def _evil_pickle(protocol: int):
    def make(path: Path, marker: Path) -> None:
        path.write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=protocol))
    return make


def _evil_os_system(path: Path, marker: Path) -> None:
    class Shell:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path.write_bytes(pickle.dumps(Shell(), protocol=2))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")  # torch's note on the protocol-5 case
@pytest.mark.parametrize("make", [
    pytest.param(_evil_torch_zip, id="torch-zip-with-a-code-object"),
    pytest.param(_evil_pickle(2), id="raw-pickle-protocol-2"),
    pytest.param(_evil_pickle(5), id="raw-pickle-protocol-5"),
    pytest.param(_evil_os_system, id="raw-pickle-os.system"),
])
def test_a_pickle_that_would_run_code_never_runs_it(tmp_path, live, make):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    make(path, marker)
    assert not marker.exists()  # writing it ran nothing
    _assert_refused_and_unchanged(live, path, UNREADABLE)
    assert not marker.exists(), "loading a checkpoint ran code from it"


FLIP_OFFSETS = [0, 1, 10, 40, 200, 1000, 0.1, 0.25, 0.5, 0.75, 0.9, -200, -100, -22, -10, -1]


def _offset(at, size: int) -> int:
    return int(size * at) if isinstance(at, float) else at % size


@pytest.mark.parametrize("at", [pytest.param(a, id=f"flip@{a:.0%}" if isinstance(a, float) else f"flip@{a}")
                                for a in FLIP_OFFSETS])
def test_a_flipped_byte_is_refused_or_loads_complete_finite_weights(tmp_path, live, good_checkpoint, at):
    data = bytearray(good_checkpoint)
    data[_offset(at, len(data))] ^= 0xFF
    path = tmp_path / "ck.pth"
    path.write_bytes(bytes(data))
    before = _model_state(live)
    try:
        info = live.load_checkpoint(path)
    except CheckpointError as e:
        assert path.name in str(e)
        _assert_same_state(before, _model_state(live))
        return
    # torch does not notice every flipped byte; what it loaded must then be whole and usable
    state = live.model.state_dict()
    assert state.keys() == before["model"].keys()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert info["step"] == live.step >= 0


def _weight_data_offset(good: bytes) -> int:
    # the first data byte of the largest tensor record inside the zip (a model weight, not the pickle)
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", good[record.header_offset + 26: record.header_offset + 30])
    return record.header_offset + 30 + name_len + extra_len + record.file_size // 2


def test_a_flipped_byte_inside_weight_data_is_refused(tmp_path, live, good_checkpoint):
    data = bytearray(good_checkpoint)
    data[_weight_data_offset(good_checkpoint)] ^= 0x01  # a mantissa bit: still a finite number
    path = tmp_path / "ck.pth"
    path.write_bytes(bytes(data))
    _assert_refused_and_unchanged(live, path)


def _corrupt_optimizer(value_for):
    def edit(payload: dict) -> None:
        for state in payload["optimizer"]["state"].values():
            state["exp_avg_sq"] = value_for(state["exp_avg_sq"])
    return edit


@pytest.mark.parametrize("value_for", [
    pytest.param(lambda t: torch.full_like(t, float("nan")), id="NaN"),
    pytest.param(lambda t: -torch.ones_like(t), id="negative"),
    pytest.param(lambda t: torch.zeros(3), id="misshapen"),
])
def test_corrupt_optimizer_state_is_refused(tmp_path, live, good_checkpoint, value_for):
    _write_payload(_corrupt_optimizer(value_for))(tmp_path / "ck.pth", good_checkpoint)
    _assert_refused_and_unchanged(live, tmp_path / "ck.pth")


def test_negative_step_is_refused(tmp_path, live, good_checkpoint):
    _write_payload(lambda pl: pl.__setitem__("step", -5))(tmp_path / "ck.pth", good_checkpoint)
    _assert_refused_and_unchanged(live, tmp_path / "ck.pth")


def _stamp(wm, tag: int) -> None:
    with torch.no_grad():
        dict(wm.model.named_parameters())[MARKER_PARAM].fill_(float(tag))
    wm.step = tag


def _assert_one_whole_save(wm, info: dict, tags) -> None:
    assert info["step"] in tags
    assert torch.all(wm.model.state_dict()[MARKER_PARAM] == float(info["step"])), "weights of two saves mixed"


def test_concurrent_saves_from_threads_leave_one_complete_file(tmp_path, live):
    models = [_world_model(seed=s, iterations=0) for s in (1, 2)]
    for tag, wm in zip((7, 9), models):
        _stamp(wm, tag)
    path = tmp_path / "ck.pth"
    barrier, errors = threading.Barrier(2), []

    def save_repeatedly(wm):
        try:
            barrier.wait()
            for _ in range(8):
                wm.save_checkpoint(path)
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=save_repeatedly, args=(wm,)) for wm in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    _assert_one_whole_save(live, live.load_checkpoint(path), {7, 9})
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"], "temp files left behind"


# A helper process that imports torch once (seconds), then forks savers on command (milliseconds each):
#   loop <path> <first tag> <count>  fork a child saving tags first, first+1, ... (count 0: until killed)
#   wait <pid>                       reap a child, print its wait status
_SAVER = r"""
import dataclasses, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.getcwd())
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from config import AutoencoderConcatPredictorWorldModelConfig
from toroidal_dot_robot import ToroidalDotRobot
TINY = dataclasses.replace(AutoencoderConcatPredictorWorldModelConfig(), **%(tiny)r)
wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=0), device="cpu", config=TINY)
marker = dict(wm.model.named_parameters())[%(marker)r]

def save(path, tag):
    with torch.no_grad():
        marker.fill_(float(tag))
    wm.step = tag
    wm.save_checkpoint(path)

print("ready", flush=True)
for line in sys.stdin:
    command, *args = line.split()
    if command == "loop":
        path, first, count = Path(args[0]), int(args[1]), int(args[2])
        pid = os.fork()
        if pid == 0:
            try:
                tag = first
                while count == 0 or tag < first + count:
                    save(path, tag)
                    tag += 1
            finally:
                os._exit(0)
        print(pid, flush=True)
    elif command == "wait":
        print(os.waitpid(int(args[0]), 0)[1], flush=True)
"""


class _Saver:
    def __init__(self) -> None:
        tiny = {f: getattr(TINY, f) for f in ("embed_dim", "depth", "num_heads", "decoder_embed_dim",
                                               "decoder_depth", "decoder_num_heads", "decoder_position")}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SAVER % {"tiny": tiny, "marker": MARKER_PARAM}], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.ask(None) == "ready"

    def ask(self, command: str | None) -> str:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"the saver helper died (exit code {self.process.poll()})"
        return answer

    def loop(self, path: Path, first: int, count: int = 0) -> int:
        return int(self.ask(f"loop {path} {first} {count}"))

    def wait(self, pid: int) -> int:
        return int(self.ask(f"wait {pid}"))


@pytest.fixture(scope="module")
def saver():
    helper = _Saver()
    yield helper
    helper.process.stdin.close()
    helper.process.wait(timeout=30)


def test_a_save_killed_at_random_moments_leaves_the_previous_checkpoint_loadable(tmp_path, live, saver):
    path = tmp_path / "ck.pth"
    saver.wait(saver.loop(path, first=1, count=1))  # one complete checkpoint to begin with
    rng, last, seen, kills_mid_save = random.Random(5), 1, set(), 0
    for kill in range(1, 13):
        pid = saver.loop(path, first=kill * 1000)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        status = saver.wait(pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        info = live.load_checkpoint(path)  # never fails: the file is the latest complete save
        _assert_one_whole_save(live, info, range(last, (kill + 1) * 1000))
        last = info["step"]
        strays = [p.name for p in tmp_path.iterdir() if p.name != path.name]
        # a kill mid-save can leave the saver's temp file; it must never look like a checkpoint
        assert all(re.fullmatch(r"\.ck\.pth\.\w+\.tmp", name) for name in strays), strays
        kills_mid_save += bool(set(strays) - seen)
        seen |= set(strays)
    assert last >= 1000, "no save ever completed between kills"
    assert kills_mid_save >= 1, "no kill landed inside a save"
    assert list(tmp_path.glob("*.pth")) == [path]


def test_concurrent_saves_from_two_processes_leave_one_complete_file(tmp_path, live, saver):
    path = tmp_path / "ck.pth"
    pids = [saver.loop(path, first=first, count=6) for first in (100_000, 200_000)]
    assert all(saver.wait(pid) == 0 for pid in pids)
    _assert_one_whole_save(live, live.load_checkpoint(path), {100_005, 200_005})
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"], "temp files left behind"


# =============================================================================
# recording
# =============================================================================


def _record_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "record_session.py", *args], cwd=REPO, **kwargs)


def _complete_and_torn_lines(folder: Path) -> tuple[int, int]:
    complete = torn = 0
    for shard in sorted(folder.glob("events_shard_*.jsonl")):
        data = shard.read_bytes()
        complete += data.count(b"\n")
        torn += bool(data) and not data.endswith(b"\n")
    return complete, torn


def _observation_lines(folder: Path) -> int:
    count = 0
    for shard in sorted(folder.glob("events_shard_*.jsonl")):
        count += sum(b'"observation"' in line for line in shard.read_bytes().split(b"\n")[:-1])
    return count


def _replay_matches(session, seed: int) -> bool:
    """The last loaded frame is what the dot shows after the loaded actions, from the seeded start."""
    robot = ToroidalDotRobot(seed=seed)
    for action in session.actions[: session.num_frames - 1]:
        robot.execute_action(action["action"])
    return np.array_equal(session.frame(session.num_frames - 1), robot.get_observation())


def test_recordings_sigkilled_at_random_moments_load_losing_at_most_the_last_event(tmp_path):
    root = tmp_path / "sessions"
    record_session("alternate", 3, seed=9, name="other", root=root)
    other_before = _snapshot(root / "other")
    rng, runs = random.Random(6), 20
    for first in range(0, runs, 2):  # two at a time: the machine has two cores
        started = [(i, _record_cli(["--pattern", "random", "--steps", "100000", "--seed", str(i), "--name",
                                    f"killed_{i:02d}", "--out", str(root)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                    time.monotonic() + rng.uniform(0.1, 1.0)) for i in (first, first + 1)]
        for _, process, kill_at in sorted(started, key=lambda s: s[2]):
            time.sleep(max(0.0, kill_at - time.monotonic()))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            assert process.returncode == -signal.SIGKILL, "the recording ended before it was killed"
    loaded, outcomes = 0, []
    for i in range(runs):
        folder = root / f"killed_{i:02d}"
        if not folder.exists():
            outcomes.append("no folder")
            continue  # killed before the writer started
        complete, torn = _complete_and_torn_lines(folder)
        if _observation_lines(folder) < 3:
            # killed before its third frame: refused with a reason, like any short session
            with pytest.raises(SessionError, match="session_meta.json is missing|no event shards|at least 3 frames"):
                load_session(folder.name, root)
            outcomes.append("fewer than 3 frames")
            continue
        session = load_session(folder.name, root)
        loaded += 1
        outcomes.append(f"{session.num_frames} frames, {len(list(folder.glob('events_shard_*')))} shard(s), "
                        f"{'torn line dropped' if torn else 'no torn line'}")
        assert session.num_frames + session.num_actions == complete, "only the torn last line may be lost"
        assert torn <= 1
        frame_files = [p for p in (folder / "frames").iterdir() if not p.name.startswith(".")]
        assert len(frame_files) <= session.num_frames + 1  # a frame goes to disk just before its event
        assert _replay_matches(session, seed=i), folder.name
    print("\n".join(outcomes))  # shown with -s
    assert loaded >= runs // 2, f"only {loaded} of {runs} kills landed mid-recording: {outcomes}"
    assert _snapshot(root / "other") == other_before
    assert all(s.ok for s in scan_sessions(root) if s.name == "other")


# ---- a disk that fills up: a real tmpfs of 200 KiB -----------------------------------------------------


@pytest.fixture(scope="module")
def full_tmpfs(tmp_path_factory):
    """Record on a 200 KiB tmpfs until it is full, then try once more; yields what happened."""
    disk = tmp_path_factory.mktemp("tiny_disk")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)],
                                 capture_output=True, text=True, timeout=30)
        problem = mounted.stderr.strip() if mounted.returncode else None
    except (OSError, subprocess.SubprocessError) as e:  # no mount command
        problem = str(e)
    if problem is not None:  # a missing capability is a broken test machine, not a reason to skip
        pytest.fail(f"cannot mount a 200 KiB tmpfs for the real full-disk test (needs root and "
                    f"CAP_SYS_ADMIN, as make test and CI have here): {problem}")
    try:
        root = disk / "sessions"
        record_session("alternate", 3, seed=9, name="other", root=root)
        before = _snapshot(root / "other")
        first = subprocess.run([sys.executable, "record_session.py", "--pattern", "random", "--steps", "100000",
                                "--name", "full", "--out", str(root)], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        with open(disk / "filler", "wb", buffering=0) as filler:  # make sure not one page is left
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
        second = subprocess.run([sys.executable, "record_session.py", "--pattern", "alternate", "--steps", "5",
                                 "--name", "second", "--out", str(root)], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        yield {"root": root, "before": before, "first": first, "second": second}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_stops_the_recording_with_a_message_and_non_zero_exit(full_tmpfs):
    result = full_tmpfs["first"]
    assert result.returncode == 1
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("record_session.py: error:")
    assert "No space left on device" in error and "full" in error


def test_what_was_written_before_the_disk_filled_stays_readable(full_tmpfs):
    session = load_session("full", full_tmpfs["root"])
    assert session.num_frames >= 3
    assert all(session.frame(i).shape == (224, 224, 3) for i in range(session.num_frames))
    assert _replay_matches(session, seed=0)


def test_a_recording_on_a_full_disk_refuses_to_start_and_leaves_no_folder(full_tmpfs):
    result = full_tmpfs["second"]
    assert result.returncode == 1 and "No space left on device" in result.stderr
    assert sorted(p.name for p in full_tmpfs["root"].iterdir()) == ["full", "other"]


def test_a_full_disk_never_touches_other_sessions(full_tmpfs):
    assert _snapshot(full_tmpfs["root"] / "other") == full_tmpfs["before"]


# ---- a disk that fills at a chosen write: always runs, no mount needed ----------------------------------


class _FillingDisk:
    """Stands in for ``open`` inside recording_robot: the ``nth`` write to a file whose name contains
    ``fragment`` is short (half its bytes reach the file, as the kernel does when space runs out), and
    every write after it fails with ENOSPC."""

    def __init__(self, fragment: str, nth: int) -> None:
        self.fragment, self.nth, self.count, self.full = fragment, nth, 0, False

    def open(self, file, mode="r", *args, **kwargs):
        if "b" not in mode or not set(mode) & set("wxa"):
            return builtins.open(file, mode, *args, **kwargs)
        raw = builtins.open(file, mode, buffering=0)
        return io.BufferedWriter(_FillingRaw(raw, self, self.fragment in Path(file).name))


class _FillingRaw(io.RawIOBase):
    def __init__(self, raw, disk: _FillingDisk, counted: bool) -> None:
        self.raw, self.disk, self.counted = raw, disk, counted

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data) -> int:
        if self.disk.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        data = bytes(data)
        if self.counted:
            self.disk.count += 1
            if self.disk.count == self.disk.nth:
                self.disk.full = True
                return self.raw.write(data[: len(data) // 2])
        return self.raw.write(data)

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


# (id, file fragment, nth write, expected outcome): ("absent",) no folder is left; ("refused", text) the
# folder stays but holds fewer than 3 frames; ("loads", frames, note) the session loads
FILLING_CASES = [
    ("at-the-first-metadata-write", "session_meta", 1, ("absent",)),
    ("at-the-first-frame", "frame_", 1, ("refused", "no event shards found")),
    ("at-the-fifth-frame", "frame_", 5, ("loads", 4, "did not finish")),
    ("mid-way-through-the-first-event", "events_shard", 1, ("refused", "line 1 was incomplete")),
    ("mid-way-through-the-eighth-event", "events_shard", 8, ("loads", 4, "line 8 was incomplete")),
    ("at-the-final-metadata-write", "session_meta", 2, ("loads", 7, "did not finish")),
]
_FILLING_PARAMS = [pytest.param(f, n, e, id=i) for i, f, n, e in FILLING_CASES]


def _record_on_filling_disk(tmp_path, monkeypatch, capsys, fragment, nth):
    root = tmp_path / "sessions"
    record_session("alternate", 3, seed=9, name="other", root=root)
    before = _snapshot(root / "other")
    capsys.readouterr()
    disk_open = _FillingDisk(fragment, nth).open  # one disk for the event shards and the atomic writes
    monkeypatch.setattr(recording_robot, "open", disk_open, raising=False)
    monkeypatch.setattr(atomic_files, "open", disk_open, raising=False)
    code = record_main(["--pattern", "alternate", "--steps", "6", "--name", "filled", "--out", str(root)])
    monkeypatch.undo()
    return code, capsys.readouterr().err.strip(), root, before


@pytest.mark.parametrize("fragment, nth, expect", _FILLING_PARAMS)
def test_disk_filling_at_any_write_stops_with_a_message_and_non_zero_exit(tmp_path, monkeypatch, capsys,
                                                                          fragment, nth, expect):
    code, error, _, _ = _record_on_filling_disk(tmp_path, monkeypatch, capsys, fragment, nth)
    assert code == 1
    assert len(error.splitlines()) == 1 and "No space left on device" in error and "filled" in error


@pytest.mark.parametrize("fragment, nth, expect", _FILLING_PARAMS)
def test_disk_filling_at_any_write_keeps_what_was_written_readable(tmp_path, monkeypatch, capsys,
                                                                   fragment, nth, expect):
    _, _, root, _ = _record_on_filling_disk(tmp_path, monkeypatch, capsys, fragment, nth)
    folder = root / "filled"
    if expect[0] == "absent":
        assert not folder.exists()
    elif expect[0] == "refused":
        with pytest.raises(SessionError, match=re.escape(expect[1])):
            load_session("filled", root)
    else:
        session = load_session("filled", root)
        assert session.num_frames == expect[1] and any(expect[2] in n for n in session.notes), session.notes
        assert _replay_matches(session, seed=0)
    if folder.exists():
        assert not [p for p in folder.rglob("*.tmp")], "temp files left behind"


@pytest.mark.parametrize("fragment, nth, expect", _FILLING_PARAMS)
def test_disk_filling_at_any_write_never_touches_other_sessions(tmp_path, monkeypatch, capsys, fragment, nth,
                                                                expect):
    _, _, root, before = _record_on_filling_disk(tmp_path, monkeypatch, capsys, fragment, nth)
    assert _snapshot(root / "other") == before
    assert {p.name for p in root.iterdir()} <= {"other", "filled"}


def test_a_size_limit_never_deletes_other_sessions(tmp_path, capsys):
    root = tmp_path / "sessions"
    for name, seed in (("older", 1), ("oldest", 2)):
        record_session("alternate", 30, seed=seed, name=name, root=root)
    (root / "not_a_session").mkdir()
    (root / "not_a_session" / "notes.txt").write_text("keep me")
    before = _snapshot(root)
    code = record_main(["--pattern", "always_move", "--steps", "1000", "--name", "capped", "--max-bytes", "12000",
                        "--out", str(root)])
    assert code == 1 and "max_session_bytes" in capsys.readouterr().err
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("capped/")} == before
    assert load_session("capped", root).metadata["status"] == "stopped"


# =============================================================================
# the suite proves it runs
# =============================================================================

# every robustness test, with the fewest cases it must declare; a rename or a dropped case fails here
REQUIRED_CASES = {
    "test_damaged_session_is_refused_naming_file_and_problem": 50,
    "test_damaged_session_loads_with_the_repair_stated": 3,
    "test_damaged_frame_is_refused_naming_it_when_shown": 6,
    "test_frame_in_another_colour_mode_is_converted_with_a_note": 3,
    "test_other_sessions_still_list_and_load_beside_a_damaged_one": 66,
    "test_bad_checkpoint_is_refused_and_the_live_model_unchanged": 22,
    "test_a_pickle_that_would_run_code_never_runs_it": 4,
    "test_a_flipped_byte_is_refused_or_loads_complete_finite_weights": 16,
    "test_a_flipped_byte_inside_weight_data_is_refused": 1,
    "test_corrupt_optimizer_state_is_refused": 3,
    "test_negative_step_is_refused": 1,
    "test_concurrent_saves_from_threads_leave_one_complete_file": 1,
    "test_a_save_killed_at_random_moments_leaves_the_previous_checkpoint_loadable": 1,
    "test_concurrent_saves_from_two_processes_leave_one_complete_file": 1,
    "test_recordings_sigkilled_at_random_moments_load_losing_at_most_the_last_event": 1,
    "test_full_disk_stops_the_recording_with_a_message_and_non_zero_exit": 1,
    "test_what_was_written_before_the_disk_filled_stays_readable": 1,
    "test_a_recording_on_a_full_disk_refuses_to_start_and_leaves_no_folder": 1,
    "test_a_full_disk_never_touches_other_sessions": 1,
    "test_disk_filling_at_any_write_stops_with_a_message_and_non_zero_exit": 6,
    "test_disk_filling_at_any_write_keeps_what_was_written_readable": 6,
    "test_disk_filling_at_any_write_never_touches_other_sessions": 6,
    "test_a_size_limit_never_deletes_other_sessions": 1,
    "test_the_robustness_suite_is_all_collected_and_none_is_skipped": 1,
}
def test_the_robustness_suite_is_all_collected_and_none_is_skipped(request):
    assert_suite_collected(request, sys.modules[__name__], REQUIRED_CASES, minimum_total=200)
