"""Hostile input, file exposure, concurrency and login through the real entry points.

Everything goes through the launched app (``conftest.app_server`` or an app launched here with other
flags): gradio_client, or plain HTTP where a client library would refuse to send the value. The
library half (damaged sessions, checkpoints, recordings) lives in ``test_robustness.py``.

Cases:
1. session names sent straight to ``/load_session``: one generic refusal, nothing outside read;
2. what the server hands out: only PNGs it drew, under GRADIO_TEMP_DIR; no project file by any route;
3. numbers: bad iteration counts, frame indices and quantiles refused, nothing runs, state kept;
7. concurrency: two tabs at once, a run interleaved with runs, redraws, loads and checkpoint
   loads, a frame damaged on disk after loading, a closed client's model freed;
8. share and login: ``--share`` needs ``--auth`` (or ``--public``); with ``--auth`` every route needs it;
9. the last test checks that every test here is collected and none is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.cookiejar import CookieJar
from pathlib import Path

import gradio
import numpy as np
import pytest
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

import concat_world_model_explorer_gradio as app
import page_common
import server_guard
from conftest import (
    ALL_ON, ALT, ALT_FRAMES, AUTH_PASSWORD, AUTH_USER, HEATMAP, LINES, MOVE, REPO, connect, error_of, free_port,
    launch_app, load, png, points, refusal_text, run, stop_process,
)
from record_session import record_session
from suite_census import assert_suite_collected

# output positions of /run_world_model and /stop (the state output is not part of the API)
PROGRESS, CHECKPOINT, T_ORIGINAL, P_CURRENT, PLOT_ERROR, PLOT_TIME, ATTN_STATS, SLIDER = (
    app.RUN_OUTPUT_KEYS.index(k) for k in ("progress", "checkpoint", "train_original", "pred_current", "plot_error",
                                           "plot_time", "attn_stats", "frame_slider"))

RED = (255, 0, 0)  # every frame of the sessions outside the sessions folder is solid red
EVIL_ROOT, EVIL_SESSION = "toroidal_dot_evil", "evil_session"  # a sibling folder sharing the root's name prefix
OUTSIDE_SESSION = "outside_secret"  # a valid session outside the sessions folder
FRAGILE = "fragile_small"  # a session whose frames get damaged on disk after it is loaded
USER, PASSWORD = AUTH_USER, AUTH_PASSWORD
NOT_AUTHENTICATED = 401
FRAME = 224  # frame side in pixels; frames are shown at 2x


# -----------------------------------------------------------------------------
# helpers


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         opener: urllib.request.OpenerDirector | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one request; never raises for an HTTP error status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with (opener.open if opener else urllib.request.urlopen)(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def call_events(base: str, api_name: str, data: list, session_hash: str, opener=None) -> list[tuple[str, object]]:
    """Every server-sent (event, data) of one call over plain HTTP (NaN and infinities included)."""
    body = json.dumps({"data": data, "session_hash": session_hash}).encode()
    status, answer = http(f"{base}gradio_api/call/{api_name}", "POST", body, {"Content-Type": "application/json"},
                          opener)
    assert status == 200, (status, answer)
    event_id = json.loads(answer)["event_id"]
    status, stream = http(f"{base}gradio_api/call/{api_name}/{event_id}", opener=opener, timeout=600)
    assert status == 200, (status, stream)
    events, name = [], None
    for line in stream.decode().splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def file_urls(value) -> list[dict]:
    """Every file object (a dict with a ``url``) inside an output value."""
    if isinstance(value, dict):
        found = [value] if "url" in value and "path" in value else []
        return found + [f for v in value.values() for f in file_urls(v)]
    if isinstance(value, list):
        return [f for v in value for f in file_urls(v)]
    return []


def session_frame(session_dir: Path, index: int, scale: int = 1) -> np.ndarray:
    with Image.open(session_dir / "frames" / f"frame_{index:06d}.png") as image:
        frame = np.asarray(image.convert("RGB"))
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def has_red(image: np.ndarray) -> bool:
    return bool(((image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)).any())


def paint_frames_red(session_dir: Path) -> None:
    for frame in (session_dir / "frames").iterdir():
        Image.new("RGB", (FRAME, FRAME), RED).save(frame)


def outcome(fn, *args, **kwargs) -> tuple[str, object]:
    """("ok", result) or ("error", message) of a call that may be refused."""
    try:
        return "ok", fn(*args, **kwargs)
    except (AppError, ValidationError) as e:
        return "error", refusal_text(e)


def iteration_of(progress: str) -> int:
    return int(progress.split("iteration ")[-1].split()[0])


def load_checkpoint_in_process(path: Path, session_dir: Path) -> dict:
    """Load ``path`` with the engine's own loader, as a new tab would."""
    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel, ReplayRobot
    from session_explorer_lib import load_session

    model = AutoencoderConcatPredictorWorldModel(ReplayRobot(load_session(session_dir)))
    return model.load_checkpoint(path)


def login_opener(url: str) -> urllib.request.OpenerDirector:
    """An HTTP client holding the login cookie of ``url``'s app."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    status, body = http(url + "login", "POST", form, {"Content-Type": "application/x-www-form-urlencoded"}, opener)
    assert status == 200, (status, body)
    return opener


def multipart(name: str, content: bytes) -> tuple[bytes, dict]:
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + name.encode() +
            b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--b0undary--\r\n")
    return body, {"Content-Type": "multipart/form-data; boundary=b0undary"}


@pytest.fixture
def client(app_server, tmp_path):
    c = connect(app_server.url, tmp_path)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hostile(app_server):
    """Beside the shared sessions folder: a sibling whose name shares its prefix holding a valid session,
    a valid session elsewhere, symlinks inside the sessions folder leading to both, and a session whose
    frames folder is a symlink to the outside frames. Every outside frame is solid red, and every
    outside file and folder gets an old access time, so a read would show."""
    saved = app_server.saved_root
    sessions = saved / "sessions" / "toroidal_dot"
    evil = record_session("always_move", 4, 5, name=EVIL_SESSION, root=saved / "sessions" / EVIL_ROOT)
    outside = record_session("always_move", 4, 7, name=OUTSIDE_SESSION, root=saved / "outside")
    for folder in (evil, outside):
        paint_frames_red(folder)
    links = {"linked_outside": outside, "linked_sibling": evil}
    for name, target in links.items():
        (sessions / name).symlink_to(target, target_is_directory=True)
    frames_link = sessions / "linked_frames"  # a session inside whose frames folder leads outside
    shutil.copytree(sessions / ALT, frames_link, ignore=shutil.ignore_patterns("frames"))
    (frames_link / "frames").symlink_to(outside / "frames", target_is_directory=True)
    old = time.time() - 3 * 86400
    watched = [p for folder in (evil, outside) for p in (folder, *folder.rglob("*"))]
    for path in watched:
        os.utime(path, (old, old))
    yield {"sessions": sessions, "evil": evil, "outside": outside, "watched": {p: old for p in watched}}
    for name in (*links, "linked_frames"):
        path = sessions / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    shutil.rmtree(saved / "sessions" / EVIL_ROOT)
    shutil.rmtree(saved / "outside")


def atime_is_tracked(folder: Path) -> bool:
    """Whether reading a file updates its access time here (not on noatime mounts)."""
    probe = folder / "atime-probe"
    probe.write_text("x")
    os.utime(probe, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    before = probe.stat().st_atime
    probe.read_text()
    tracked = probe.stat().st_atime != before
    probe.unlink()
    return tracked


# -----------------------------------------------------------------------------
# 1. session names sent straight to the API


HOSTILE_NAMES = [
    "..", "../..", ".", "/", "/etc", "/etc/passwd", "{sessions}", "{sessions}/", "{sessions_parent}", "{alt_abs}",
    "{outside_abs}", "{evil_abs}", "a/../../x", f"{ALT}/../{ALT}", f"./{ALT}", f"{ALT}/", f"{ALT}/frames",
    f"{ALT}\x00", "\x00", f"\x00{ALT}", "..\x00/etc", "..\\..\\etc", f"..\\toroidal_dot\\{ALT}", f"{ALT}\\..",
    f"../{EVIL_ROOT}/{EVIL_SESSION}", f"../{EVIL_ROOT}", EVIL_ROOT, f"{EVIL_ROOT}/{EVIL_SESSION}",
    f"../../outside/{OUTSIDE_SESSION}", OUTSIDE_SESSION, "linked_outside", "linked_sibling", "linked_outside/.",
    "linked_outside/..", "x" * 256, "x" * 5000, "y" * 200_000, "~", "~/", "%2e%2e", "%2e%2e%2fetc", ".%2e/",
    "file:///etc/passwd", "\\\\server\\share", "C:\\Windows", " ", "..." , ".hidden", "alternate\u2044small",
    5, 0, -1, 3.5, True, False, [ALT], [], {"name": ALT}, {},
]


def test_hostile_session_names_get_one_generic_message_and_nothing_outside_is_read(client, app_server, hostile):
    sessions = hostile["sessions"]
    fill = {"sessions": str(sessions), "sessions_parent": str(sessions.parent), "alt_abs": str(sessions / ALT),
            "outside_abs": str(hostile["outside"]), "evil_abs": str(hostile["evil"])}
    _, _, good_frame, _, _ = load(client, ALT)
    client.predict(7, api_name="/jump_to_frame")
    messages = {}
    for i, name in enumerate(HOSTILE_NAMES):
        value = name.format(**fill) if isinstance(name, str) and name.startswith("{") else name
        messages[f"{i}: {repr(value)[:60]}"] = error_of(client, value, api_name="/load_session")
    wrong = {name: message for name, message in messages.items() if message != page_common.UNKNOWN_SESSION}
    assert not wrong, wrong  # one text for every hostile name, never an echo of the name or a path
    assert len(messages) == len(HOSTILE_NAMES)

    # a session inside the folder whose frames folder leads outside: refused naming the problem, no path
    message = error_of(client, "linked_frames", api_name="/load_session")
    assert "Cannot load session linked_frames" in message and "leads outside the session folder" in message
    assert str(app_server.saved_root) not in message

    # the state is unchanged: the good session still scrubs, every frame its own and never a red one
    assert not has_red(png(good_frame))
    for index in (ALT_FRAMES - 1, 7):
        frame, frame_md, _ = client.predict(index, api_name="/update_frame")
        assert f"**Frame {index}** of 0-{ALT_FRAMES - 1}" in frame_md
        image = png(frame)
        assert np.array_equal(image, session_frame(sessions / ALT, index, 2)) and not has_red(image)
    dropdown, broken = client.predict(api_name="/refresh_sessions")
    listed = {c[0] if isinstance(c, (list, tuple)) else c for c in dropdown["choices"]}
    assert not listed & {"linked_outside", "linked_sibling", EVIL_SESSION, OUTSIDE_SESSION}
    assert "linked_outside" not in broken and OUTSIDE_SESSION not in broken

    # nothing outside the sessions folder was opened: the old access times are intact
    if atime_is_tracked(app_server.saved_root):
        touched = [str(p) for p, old in hostile["watched"].items() if p.stat().st_atime != old]
        assert not touched, touched


# -----------------------------------------------------------------------------
# 2. what the server hands out


def test_every_file_the_app_hands_out_is_a_png_it_drew_in_its_temp_folder(app_server):
    base, session_hash = app_server.url, uuid.uuid4().hex[:12]
    events = call_events(base, "load_session", [ALT], session_hash)
    events += call_events(base, "update_frame", [3], session_hash)
    events += call_events(base, "run_world_model", [3], session_hash)
    events += call_events(base, "update_attention_viz", [90, *ALL_ON, "mean", HEATMAP], session_hash)
    assert all(name != "error" for name, _ in events), events
    files = [f for _, data in events for f in file_urls(data)]
    assert len({f["path"] for f in files}) >= 10  # frames, 4 training views, 3 prediction views, attention
    temp = app_server.temp_dir.resolve()
    for f in files:
        path = Path(f["path"])
        assert path.resolve().is_relative_to(temp) and path.suffix == ".png", f
        assert f["url"] == f"{base}gradio_api/file={f['path']}", f
        status, body = http(f["url"])
        assert status == 200 and body == path.read_bytes() and body.startswith(b"\x89PNG\r\n\x1a\n"), f
        with Image.open(path) as image:
            assert image.format == "PNG"


def forbidden_targets(app_server) -> dict[str, Path | None]:
    """Files the app must never serve, by a name to show; None where the bytes are not on disk here."""
    saved = app_server.saved_root
    session = saved / "sessions" / "toroidal_dot" / ALT
    checkpoint = saved / "checkpoints" / "toroidal_dot" / "autoencoder.pth"
    return {
        str(checkpoint): checkpoint,
        str(session / "session_meta.json"): session / "session_meta.json",
        str(session / "events_shard_000.jsonl"): session / "events_shard_000.jsonl",
        str(session / "frames" / "frame_000001.png"): session / "frames" / "frame_000001.png",
        str(REPO / "concat_world_model_explorer_gradio.py"): REPO / "concat_world_model_explorer_gradio.py",
        str(REPO / "config.py"): REPO / "config.py",
        "concat_world_model_explorer_gradio.py": REPO / "concat_world_model_explorer_gradio.py",
        "config.py": REPO / "config.py",
        "/etc/passwd": Path("/etc/passwd"),
        str(app_server.log_path): app_server.log_path,
        f"{app_server.temp_dir}/../{app_server.log_path.name}": app_server.log_path,
        "../../../../../../../../etc/passwd": Path("/etc/passwd"),
        "file:///etc/passwd": Path("/etc/passwd"),
        str(app_server.temp_dir): None,
        f"{app_server.url}config": None,  # the app fetching from itself
        "http://127.0.0.1:22/": None,
    }


def encodings(target: str) -> list[str]:
    quoted = urllib.parse.quote(target, safe="")
    return [target, urllib.parse.quote(target, safe="/:"), quoted, urllib.parse.quote(quoted, safe=""),
            target.replace("/", "%2F").replace(".", "%2e")]


def assert_refused(url: str, secret: Path | None, opener=None, methods=("GET", "HEAD")) -> None:
    for method in methods:
        status, body = http(url, method, opener=opener)
        assert status in (400, 401, 403, 404, 405), (method, url, status, body[:200])
        if secret is not None and secret.is_file():
            head = secret.read_bytes()[:48]
            assert not head or head not in body, (method, url)


def test_no_project_file_is_reachable_through_any_file_route(app_server, client):
    load(client, ALT)
    run(client, 1)  # the checkpoint file exists
    temp = app_server.temp_dir
    escape_link = temp / "innocent.png"  # a link inside the served folder pointing at a secret
    escape_link.unlink(missing_ok=True)
    escape_link.symlink_to(app_server.saved_root / "checkpoints" / "toroidal_dot" / "autoencoder.pth")
    base = app_server.url
    file_routes = ["gradio_api/file=", "gradio_api/file/"]  # Gradio 6.31's routes that read a path
    other_routes = ["file=", "gradio_api/proxy=", "static/", "assets/", "svelte/",  # and every other route that
                    "gradio_api/custom_component/x/client/js/",  # serves a file or fetches a URL
                    "gradio_api/stream/x/y/0/playlist-file?", "gradio_api/run-history/records/x/y/assets/"]
    try:
        for target, secret in forbidden_targets(app_server).items():
            forms = encodings(target)
            for form in forms:
                for route in file_routes:
                    assert_refused(base + route + form, secret)
            for form in forms[:3]:
                for route in other_routes:
                    assert_refused(base + route + form, secret, methods=("GET",))
            for climb in ("../" * 12, "..%2f" * 12, "%2e%2e/" * 12, "..%252f" * 12):
                for route in ("static/", "assets/", "svelte/", "gradio_api/file="):
                    assert_refused(base + route + climb + target.lstrip("/"), secret, methods=("GET",))
        assert_refused(base + "gradio_api/file=" + str(escape_link), escape_link)
        assert_refused(base + "gradio_api/file=" + urllib.parse.quote(str(escape_link), safe=""), escape_link)
    finally:
        escape_link.unlink(missing_ok=True)


def test_uploads_are_refused_so_the_server_hands_out_only_what_it_drew(app_server):
    body, headers = multipart("payload.html", b"<script>alert(1)</script>" * 100)
    status, answer = http(app_server.url + "gradio_api/upload", "POST", body, headers)
    assert status == 413 and b"maximum allowed size of 0 bytes" in answer, (status, answer)
    assert not list(app_server.temp_dir.rglob("payload.html"))


# -----------------------------------------------------------------------------
# 3. numbers (see also test_app_api.test_bad_*: every value is refused there with its message)


BAD_ITERATIONS = [0, -1, 501, 10**12, float("nan"), float("inf"), float("-inf"), None, "5", "abc", 3.5, True]
BAD_FRAMES = [ALT_FRAMES, ALT_FRAMES + 1, 10**12, -1, float("nan"), float("inf"), float("-inf"), 1.5, "abc", None,
              [3], False]
BAD_QUANTILES = [-1, 101, float("nan"), float("inf"), float("-inf"), "abc", None, [95], True]


def test_bad_numbers_are_refused_naming_the_problem_and_nothing_runs(client):
    load(client, ALT)
    client.predict(4, api_name="/jump_to_frame")
    for value in BAD_ITERATIONS:  # before there is a model: none is created, nothing trains
        message = error_of(client, value, api_name="/run_world_model")
        assert "Number of iterations must be a whole number from 1 to 500 (got " in message, (value, message)
    for value in BAD_FRAMES:
        for api_name, what in (("/update_frame", "Frame index"), ("/jump_to_frame", "Frame number")):
            message = error_of(client, value, api_name=api_name)
            assert f"{what} must be a whole number from 0 to {ALT_FRAMES - 1} (got " in message, (value, message)
    first = run(client, 1)
    assert first[PROGRESS].startswith("**Done: 1/1**")
    assert len(points(first[PLOT_TIME])) == 1  # no refused call ran an iteration
    assert first[SLIDER]["value"] == 5  # started at frame 4: the refused frame numbers moved nothing
    iteration = iteration_of(first[PROGRESS])
    _, stats = client.predict(80, *ALL_ON, "max", HEATMAP, api_name="/update_attention_viz")
    for value in BAD_QUANTILES:
        message = error_of(client, value, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
        assert "Quantile must be a number from 0 to 100 (got " in message, (value, message)
    for value in BAD_ITERATIONS:  # with a model: still nothing runs
        error_of(client, value, api_name="/run_world_model")
    after = client.predict(api_name="/stop")  # nothing running: shows the tab's state as it is
    assert after[PROGRESS] == first[PROGRESS] and iteration_of(after[PROGRESS]) == iteration
    assert after[ATTN_STATS] == stats  # drawn with the last accepted controls (80, max, heatmap)
    assert len(points(after[PLOT_TIME])) == 1


# -----------------------------------------------------------------------------
# 7. concurrency


def test_two_tabs_running_at_once_keep_their_own_models_metrics_and_frames(app_server, tmp_path):
    sessions = app_server.saved_root / "sessions" / "toroidal_dot"
    plan = {ALT: 4, MOVE: 3}
    clients = {name: connect(app_server.url, tmp_path / name) for name in plan}
    try:
        for name, c in clients.items():
            load(c, name)
        jobs = {name: c.submit(plan[name], api_name="/run_world_model") for name, c in clients.items()}
        results = {name: job.result(timeout=600) for name, job in jobs.items()}
    finally:
        for c in clients.values():
            c.close()
    assert not np.array_equal(session_frame(sessions / ALT, plan[ALT] - 1),
                              session_frame(sessions / MOVE, plan[MOVE] - 1))
    for name, n in plan.items():
        final = results[name]
        assert final[PROGRESS].startswith(f"**Done: {n}/{n}**")
        assert len(points(final[PLOT_TIME])) == n  # each tab's own history
        assert len(points(final[PLOT_ERROR], "model prediction")) == n - 2  # predictions from iteration 3 on
        assert final[SLIDER]["value"] == n
        own = session_frame(sessions / name, n - 1)  # the latest frame is this tab's own frame n-1
        assert np.array_equal(png(final[P_CURRENT]), np.repeat(np.repeat(own, 2, 0), 2, 1)), name
        assert np.array_equal(png(final[T_ORIGINAL])[:, -FRAME:], own), name  # the canvas ends with it too
    info = load_checkpoint_in_process(app_server.saved_root / "checkpoints" / "toroidal_dot" / "autoencoder.pth",
                                      sessions / ALT)
    assert info["iteration"] in {iteration_of(r[PROGRESS]) for r in results.values()}


def test_run_redraw_reload_and_checkpoint_loads_interleaved_keep_model_and_file_whole(app_server, tmp_path):
    sessions = app_server.saved_root / "sessions" / "toroidal_dot"
    checkpoint = app_server.saved_root / "checkpoints" / "toroidal_dot" / "autoencoder.pth"
    tab, other = connect(app_server.url, tmp_path / "tab"), connect(app_server.url, tmp_path / "other")
    try:
        load(tab, ALT)
        load(other, MOVE)
        job = tab.submit(4, api_name="/run_world_model")
        deadline = time.monotonic() + 120
        while not job.outputs() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.outputs(), "the run never started"
        with ThreadPoolExecutor(4) as pool:
            second = pool.submit(outcome, tab.predict, 1, api_name="/run_world_model")
            redraw = pool.submit(outcome, tab.predict, 90, *ALL_ON, "mean", LINES, api_name="/update_attention_viz")
            reload = pool.submit(outcome, tab.predict, ALT, api_name="/load_session")
            newcomer = pool.submit(outcome, other.predict, 1, api_name="/run_world_model")  # loads the checkpoint
            first = job.result(timeout=600)
            second, redraw, reload, newcomer = (f.result(timeout=600) for f in (second, redraw, reload, newcomer))
        assert first[PROGRESS].startswith("**Done: 4/4**")
        if second[0] == "error":  # the tab's first run held the run lock for longer than a Run waits
            assert "A run is already in progress in this tab" in second[1]
            extra = 0
        else:
            assert second[1][PROGRESS].startswith("**Done: 1/1**")
            extra = 1
        assert redraw[0] == "ok" and reload[0] == "ok", (redraw, reload)
        assert newcomer[0] == "ok" and newcomer[1][PROGRESS].startswith("**Done: 1/1**"), newcomer
        assert "refused" not in newcomer[1][CHECKPOINT]  # it never read a half-written file
        info = load_checkpoint_in_process(checkpoint, sessions / ALT)
        assert info["step"] >= 0
        final = run(tab, 1)  # the model works on: one history across all its runs
        assert final[PROGRESS].startswith("**Done: 1/1**") and "**Saved**" in final[CHECKPOINT]
        assert len(points(final[PLOT_TIME])) == 4 + extra + 1
        assert load_checkpoint_in_process(checkpoint, sessions / ALT)["iteration"] == iteration_of(final[PROGRESS])
    finally:
        tab.close()
        other.close()


@pytest.fixture
def fragile(app_server):
    """A session of its own (its frames get damaged on disk after it is loaded); removed afterwards."""
    sessions = app_server.saved_root / "sessions" / "toroidal_dot"
    folder = record_session("always_move", 12, 9, name=FRAGILE, root=sessions)
    yield folder
    shutil.rmtree(folder)


def test_a_frame_damaged_after_loading_stops_the_run_naming_it_and_the_app_works_on(client, app_server, fragile):
    load(client, FRAGILE)
    frame2 = fragile / "frames" / "frame_000002.png"
    data = frame2.read_bytes()
    frame2.write_bytes(data[: len(data) // 2])  # truncated after the session was loaded
    job = client.submit(3, api_name="/run_world_model")
    with pytest.raises(AppError) as info:
        job.result(timeout=600)
    message = str(info.value)
    assert message.startswith("The run stopped after 2 of 3 iterations")
    assert f"{FRAGILE}/frames/frame_000002.png is truncated or unreadable" in message
    assert str(app_server.saved_root) not in message
    last = job.outputs()[-1]
    assert last[PROGRESS].startswith("**Stopped: 2/3**") and "Run stopped early" in last[PROGRESS]
    assert "**Saved**" in last[CHECKPOINT]  # the two iterations done were kept
    (fragile / "frames" / "frame_000004.png").unlink()  # now a frame goes missing
    client.predict(3, api_name="/jump_to_frame")
    missing = rf"stopped after 1 of 2 iterations.*{FRAGILE}/frames/frame_000004.png is missing"
    with pytest.raises(AppError, match=missing):
        run(client, 2)
    stopped = client.predict(api_name="/stop")
    assert stopped[PROGRESS].startswith("**Stopped: 1/2**")
    checkpoint = app_server.saved_root / "checkpoints" / "toroidal_dot" / "autoencoder.pth"
    assert load_checkpoint_in_process(checkpoint, fragile.parent / ALT)["iteration"] == iteration_of(stopped[PROGRESS])
    client.predict(5, api_name="/jump_to_frame")
    final = run(client, 1)  # the model is whole and runs on
    assert final[PROGRESS].startswith("**Done: 1/1**") and "Run stopped early" not in final[PROGRESS]
    assert len(points(final[PLOT_TIME])) == 2 + 1 + 1
    dropdown, _ = client.predict(api_name="/refresh_sessions")  # and the app serves everyone else
    assert ALT in {c[0] if isinstance(c, (list, tuple)) else c for c in dropdown["choices"]}


def test_a_closed_client_has_its_model_freed(app_server, tmp_path):
    # browsers: test_browser.test_closing_a_tab_frees_its_model; the handler: test_app_handlers
    c = connect(app_server.url, tmp_path)
    load(c, MOVE)
    run(c, 2)  # no other tab here runs exactly 2 iterations on this session: the log line is this one's
    marker = f"freed the world model of a closed tab (2 iterations run, last session: {MOVE})"
    before = app_server.log().count(marker)
    c.close()  # its heartbeat ends; Gradio deletes the closed session's state (1 s in test mode)
    deadline = time.monotonic() + 60
    while app_server.log().count(marker) == before and time.monotonic() < deadline:
        time.sleep(0.25)
    assert app_server.log().count(marker) == before + 1


# -----------------------------------------------------------------------------
# 8. share and login


def test_share_without_auth_refuses_to_start_unless_public(saved_root, tmp_path):
    port = free_port()
    env = dict(os.environ, CWM_SAVED_ROOT=str(saved_root), GRADIO_TEMP_DIR=str(tmp_path / "tmp"),
               GRADIO_ANALYTICS_ENABLED="False")
    done = subprocess.run([sys.executable, str(REPO / "concat_world_model_explorer_gradio.py"), "--share",
                           "--port", str(port), "--no-browser"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 2, done
    assert "Refusing --share without --auth" in done.stderr and "--public" in done.stderr
    assert "Running on" not in done.stdout
    with pytest.raises(OSError):  # nothing was served
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


@pytest.fixture(scope="module")
def exposed(saved_root, tmp_path_factory):
    """The most exposed launch: --share --public, from a working folder holding a .env, with a careless
    GRADIO_ALLOWED_PATHS that opens the project and the saved data."""
    work = tmp_path_factory.mktemp("exposed")
    (work / ".env").write_text("API_TOKEN=never-serve-me-0123456789\n")
    env = {"GRADIO_ALLOWED_PATHS": f"{REPO},{saved_root},{REPO / 'config.py'}"}
    server = launch_app(saved_root, work, ("--share", "--public"), env_extra=env, cwd=work)
    yield server, work
    stop_process(server.proc)


def test_a_public_share_warns_keeps_serving_and_still_never_serves_project_files(exposed):
    server, work = exposed
    wait_for_log(server, ("Still serving locally", "Running on public URL"))
    assert app.PUBLIC_WARNING in server.log()
    assert server.proc.poll() is None and http(server.url)[0] == 200
    targets = {".env": work / ".env", str(work / ".env"): work / ".env",
               str(REPO / "config.py"): REPO / "config.py", "config.py": REPO / "config.py",
               str(REPO / "concat_world_model_explorer_gradio.py"): REPO / "concat_world_model_explorer_gradio.py"}
    session = server.saved_root / "sessions" / "toroidal_dot" / ALT
    for path in (session / "session_meta.json", session / "frames" / "frame_000000.png",
                 server.saved_root / "checkpoints" / "toroidal_dot" / "autoencoder.pth"):
        targets[str(path)] = path
    for target, secret in targets.items():
        for form in encodings(target):
            assert_refused(server.url + "gradio_api/file=" + form, secret)
    body, headers = multipart("note.txt", b"hello")
    assert http(server.url + "gradio_api/upload", "POST", body, headers)[0] == 413


def test_project_and_data_folders_are_blocked_but_the_temp_folder_stays_servable(tmp_path, monkeypatch):
    project, saved = tmp_path / "project", tmp_path / "project" / "saved"
    for folder in (project / "tmp" / "gradio", saved, project / "models"):
        folder.mkdir(parents=True)
    (project / ".env").write_text("SECRET=1")
    monkeypatch.setattr(app.config, "PROJECT_ROOT", project)
    monkeypatch.setattr(app.config, "SAVED_ROOT", saved)
    monkeypatch.setenv("GRADIO_BLOCKED_PATHS", "/srv/extra")
    elsewhere = server_guard.never_served_paths(tmp_path / "elsewhere")
    assert elsewhere == ["/srv/extra", str(project.resolve()), str(saved.resolve())]
    inside = server_guard.never_served_paths(project / "tmp" / "gradio")  # the temp folder inside the project
    assert set(inside) == {"/srv/extra", *(str((project / n).resolve()) for n in (".env", "models", "saved"))}


def wait_for_log(server, outcomes: tuple[str, ...], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while not any(o in server.log() for o in outcomes) and time.monotonic() < deadline:
        time.sleep(0.25)
    log = server.log()
    assert any(o in log for o in outcomes), log[-2000:]
    return log


@pytest.fixture
def guarded(guarded_server):
    return guarded_server


def protected_requests(server, image_path: str) -> list[tuple[str, str, bytes | None, dict]]:
    """(method, path, body, headers) of every route that must need the login."""
    join = json.dumps({"data": [], "fn_index": 0, "session_hash": "anon12345", "event_data": None,
                       "trigger_id": None}).encode()
    call = json.dumps({"data": [ALT]}).encode()
    upload, upload_headers = multipart("a.txt", b"hello")
    as_json = {"Content-Type": "application/json"}
    quoted = urllib.parse.quote(image_path, safe="")
    return [
        ("GET", "config", None, {}), ("GET", "gradio_api/info", None, {}), ("GET", "gradio_api/openapi.json", None, {}),
        ("GET", "gradio_api/info?all_endpoints=True", None, {}),
        ("POST", "gradio_api/queue/join", join, as_json),
        ("GET", "gradio_api/queue/data?session_hash=anon12345", None, {}),
        ("POST", "gradio_api/call/load_session", call, as_json),
        ("POST", "gradio_api/call/v2/load_session", call, as_json),
        ("POST", "gradio_api/run/load_session", call, as_json), ("POST", "gradio_api/api/load_session", call, as_json),
        ("GET", f"gradio_api/file={image_path}", None, {}), ("HEAD", f"gradio_api/file={image_path}", None, {}),
        ("GET", f"gradio_api/file={quoted}", None, {}),
        ("GET", f"gradio_api/file/{image_path.lstrip('/')}", None, {}),
        ("GET", "gradio_api/file=/etc/passwd", None, {}),
        ("POST", "gradio_api/upload", upload, upload_headers),
        ("GET", "gradio_api/upload_progress?upload_id=x", None, {}),
        ("GET", "gradio_api/proxy=https://example.hf.space/file", None, {}),
        ("GET", "gradio_api/heartbeat/anon12345", None, {}),
        ("POST", "gradio_api/cancel", json.dumps({"session_hash": "x", "fn_index": 0, "event_id": "y"}).encode(),
         as_json),
        ("POST", "gradio_api/reset", json.dumps({"event_id": "y"}).encode(), as_json),
        ("POST", "gradio_api/stream/y", b"{}", as_json), ("GET", "gradio_api/deep_link?session_hash=x", None, {}),
        ("GET", "gradio_api/runs", None, {}), ("GET", "gradio_api/run-history/records", None, {}),
        ("GET", "monitoring", None, {}), ("GET", "gradio_api/login_check", None, {}),
    ]


def test_with_auth_every_route_needs_the_login(guarded, tmp_path):
    url = guarded.url
    opener = login_opener(url)
    anonymous_page = http(url)[1].decode()
    # the page served before the login is the login form: no API description, no endpoint, no session
    assert '"auth_required":true' in anonymous_page.replace(" ", "")
    for leak in ("load_session", "run_world_model", "Iterations", ALT, "named_endpoints\":{\"/"):
        assert leak not in anonymous_page, leak
    # ... and the login form can load what it needs (the local page's scripts; with a share link up,
    # Gradio's share page takes them from its CDN instead)
    template = (Path(gradio.__file__).parent / "templates" / "frontend" / "index.html").read_text()
    assets = re.findall(r'(?:src|href)="\./(assets/[^"?#]+)"', template)
    assert assets
    for path in assets:
        assert http(url + path)[0] == 200, path
    assert "load_session" in http(url, opener=opener)[1].decode()  # after the login: the app

    # a logged-in client loads a session: its picture is a file only the login may fetch
    c = connect(url, tmp_path, auth=(USER, PASSWORD))
    try:
        events = call_events(url, "load_session", [ALT], c.session_hash, opener)
        image = next(f for _, data in events for f in file_urls(data))
    finally:
        c.close()
    for method, path, body, headers in protected_requests(guarded, image["path"]):
        status, answer = http(url + path, method, body, headers)
        assert status == NOT_AUTHENTICATED, (method, path, status, answer[:200])
        assert b"\x89PNG" not in answer and b"load_session" not in answer, path
    # with the login the same routes answer (upload included: it reaches the app, which takes no files)
    expected = {"config": 200, "gradio_api/info": 200, f"gradio_api/file={image['path']}": 200,
                "gradio_api/upload": 413, "gradio_api/login_check": 200}
    for method, path, body, headers in protected_requests(guarded, image["path"]):
        if path in expected and method in ("GET", "POST"):
            status, answer = http(url + path, method, body, headers, opener)
            assert status == expected[path], (path, status, answer[:200])
    assert http(url + f"gradio_api/file={image['path']}", opener=opener)[1].startswith(b"\x89PNG")
    with pytest.raises(Exception):  # gradio_client without the login cannot even connect
        connect(url, tmp_path / "anonymous")
    with pytest.raises(Exception):
        connect(url, tmp_path / "wrong", auth=(USER, "wrong-password"))
    # offline the share tunnel fails: the app says so and keeps serving
    wait_for_log(guarded, ("Still serving locally", "Running on public URL"))
    assert guarded.proc.poll() is None and http(url)[0] == 200


# -----------------------------------------------------------------------------
# 9. the suite proves it runs


REQUIRED_CASES = {
    "test_hostile_session_names_get_one_generic_message_and_nothing_outside_is_read": 1,
    "test_every_file_the_app_hands_out_is_a_png_it_drew_in_its_temp_folder": 1,
    "test_no_project_file_is_reachable_through_any_file_route": 1,
    "test_uploads_are_refused_so_the_server_hands_out_only_what_it_drew": 1,
    "test_bad_numbers_are_refused_naming_the_problem_and_nothing_runs": 1,
    "test_two_tabs_running_at_once_keep_their_own_models_metrics_and_frames": 1,
    "test_run_redraw_reload_and_checkpoint_loads_interleaved_keep_model_and_file_whole": 1,
    "test_a_frame_damaged_after_loading_stops_the_run_naming_it_and_the_app_works_on": 1,
    "test_a_closed_client_has_its_model_freed": 1,
    "test_share_without_auth_refuses_to_start_unless_public": 1,
    "test_a_public_share_warns_keeps_serving_and_still_never_serves_project_files": 1,
    "test_project_and_data_folders_are_blocked_but_the_temp_folder_stays_servable": 1,
    "test_with_auth_every_route_needs_the_login": 1,
    "test_the_security_suite_is_all_collected_and_none_is_skipped": 1,
}


def test_the_security_suite_is_all_collected_and_none_is_skipped(request):
    assert len(HOSTILE_NAMES) >= 50 and len(BAD_FRAMES) >= 10 and len(BAD_QUANTILES) >= 8
    assert_suite_collected(request, sys.modules[__name__], REQUIRED_CASES)
