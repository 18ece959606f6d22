"""Shared pytest fixtures.

- torch is limited to 2 threads before anything imports a model (the test machines have 2 cores).
- ``saved_root``: a temporary ``saved/`` folder with small recorded sessions (and one broken one).
- ``app_server``: the real app (``python concat_world_model_explorer_gradio.py``) launched as a
  subprocess on a free port against ``saved_root``; ready once its HTTP root answers.
- ``TINY`` (a tiny world-model config) and ``FakeSession`` (a recording in memory) for unit tests.
- ``client`` and the helpers that call the launched app (``connect``, ``load``, ``run``,
  ``error_of``, ``png``, ``points``) for the API and security tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError, ValidationError
from PIL import Image

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402

from config import AppConfig, AutoencoderConcatPredictorWorldModelConfig  # noqa: E402
from record_session import record_session  # noqa: E402
from run_controller import reproducible_mkl  # noqa: E402
from session_explorer_lib import SessionError  # noqa: E402
from toroidal_dot_robot import ToroidalDotRobot  # noqa: E402

# a tiny world model (the default canvas, narrow and shallow blocks): fast enough for unit tests; the
# torus position code needs a decoder at least 64 wide, so it keeps the canvas code
TINY = AutoencoderConcatPredictorWorldModelConfig(
    embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
    decoder_position="canvas",
)

reproducible_mkl(AppConfig().mkl_cbwr)  # as the app's and the trainer's main: before any tensor work


class FakeSession:
    """A stay/move recording of ``n`` frames in memory, shaped like ``session_explorer_lib.Session``,
    whose frames from ``broken_from`` on cannot be read."""

    def __init__(self, n=4, name="fake", broken_from=None):
        robot = ToroidalDotRobot(seed=0)
        self.frames, self.actions = [], []
        for i in range(n):
            self.frames.append(robot.get_observation())
            self.actions.append(i % 2)
            robot.execute_action(i % 2)
        self.observations = self.frames
        self.name, self.broken_from = name, broken_from

    def frame(self, i):
        if self.broken_from is not None and i >= self.broken_from:
            raise SessionError(f"{self.name}/frames/frame_{i:06d}.png cannot be read")
        return self.frames[i]

    def action_after(self, i):
        return self.actions[i] if i < len(self.frames) - 1 else None

# the sessions every app test can rely on: name -> (pattern, steps, seed)
APP_SESSIONS = {
    "alternate_small": ("alternate", 40, 0),
    "always_move_small": ("always_move", 30, 1),
}
BROKEN_SESSION = "broken_no_metadata"  # a session folder without session_meta.json
AUTH_USER, AUTH_PASSWORD = "ann", "s3cret-Pw"  # the login of the guarded app
LOGIN_DELAY_BASE_S, LOGIN_DELAY_CAP_S = 0.1, 0.8  # its failed-login delays: 0.1, 0.2, 0.4, 0.8, 0.8, ...
APP_START_TIMEOUT_S = 120.0


# -----------------------------------------------------------------------------
# helpers


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = APP_START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers (any HTTP status); fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (e.g. 401 behind --auth)
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise RuntimeError(f"the app did not answer at {url} within {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a process we started, killing it if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@dataclass
class AppServer:
    """A running app subprocess."""

    url: str
    proc: subprocess.Popen
    log_path: Path
    saved_root: Path
    temp_dir: Path | None = None  # GRADIO_TEMP_DIR: the only folder whose files the app hands out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launch_app(saved_root: Path, work_dir: Path, extra_args: tuple[str, ...] = (), env_extra: dict | None = None,
               cwd: Path = REPO, e2e: bool = True, drop_env: tuple[str, ...] = ()) -> AppServer:
    """Start the app on a free port with its data under ``saved_root``; returns once it answers.

    ``cwd`` is the app's working directory (the repository by default, as with ``make run``).
    ``e2e=False`` keeps Gradio's production timings (a closed session's state lives an hour) and
    glibc's allocator settings from the caller's environment out, for benchmarks. ``drop_env``: variables
    left out of the app's environment (``GRADIO_TEMP_DIR``: the app makes its own private cache).
    """
    port = free_port()
    temp = work_dir / "gradio-tmp"
    temp.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(
        os.environ,
        CWM_SAVED_ROOT=str(saved_root),
        GRADIO_TEMP_DIR=str(temp),
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_IS_E2E_TEST="1",  # Gradio: 0.25 s heartbeats and a 1 s state TTL after a tab closes
        PYTHONUNBUFFERED="1",
    )
    if not e2e:
        for name in ("GRADIO_IS_E2E_TEST", "MALLOC_ARENA_MAX"):
            env.pop(name, None)
    env.update(env_extra or {})
    for name in drop_env:
        env.pop(name, None)
    log_path = work_dir / f"app-{port}.log"
    cmd = [sys.executable, str(REPO / "concat_world_model_explorer_gradio.py"), "--host", "127.0.0.1",
           "--port", str(port), "--no-browser", *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, proc, log_path)
    except BaseException:
        stop_process(proc)
        raise
    return AppServer(url=url, proc=proc, log_path=log_path, saved_root=saved_root,
                     temp_dir=Path(env["GRADIO_TEMP_DIR"]) if "GRADIO_TEMP_DIR" in env else None)


def record_app_sessions(saved_root: Path) -> Path:
    """Record APP_SESSIONS and a broken session under ``saved_root``; returns the sessions folder."""
    sessions = saved_root / "sessions" / "toroidal_dot"
    for name, (pattern, steps, seed) in APP_SESSIONS.items():
        record_session(pattern, steps, seed, name=name, root=sessions)
    broken = sessions / BROKEN_SESSION
    (broken / "frames").mkdir(parents=True)
    (broken / "events_shard_000.jsonl").write_text("")
    return sessions


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def saved_root(tmp_path_factory) -> Path:
    """A ``saved/`` folder holding APP_SESSIONS and one broken session."""
    root = tmp_path_factory.mktemp("saved")
    record_app_sessions(root)
    return root


@pytest.fixture(scope="session")
def app_server(saved_root, tmp_path_factory):
    """The app served by a subprocess for the whole test session (API and browser tests share it)."""
    server = launch_app(saved_root, tmp_path_factory.mktemp("app"))
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="session")
def guarded_server(saved_root, tmp_path_factory):
    """The app behind --auth AUTH_USER:AUTH_PASSWORD with short failed-login delays, asked to --share
    (offline the tunnel fails and the app keeps serving), parking models idle for 1 s in
    ``<its work folder>/tmp``; the API and security tests share it."""
    work = tmp_path_factory.mktemp("guarded")
    (work / "tmp").mkdir()
    env = {"CWM_LOGIN_DELAY_BASE_S": str(LOGIN_DELAY_BASE_S), "CWM_LOGIN_DELAY_CAP_S": str(LOGIN_DELAY_CAP_S),
           "CWM_IDLE_PARK_S": "1", "TMPDIR": str(work / "tmp")}
    server = launch_app(saved_root, work,
                        ("--share", "--auth", f"{AUTH_USER}:{AUTH_PASSWORD}"), env_extra=env)
    yield server
    stop_process(server.proc)


# -----------------------------------------------------------------------------
# calling the launched app (API and security tests)

ALT, MOVE = "alternate_small", "always_move_small"
ALT_FRAMES = APP_SESSIONS[ALT][1] + 1
ALL_ON = (True,) * 9  # layers 0-4, heads 0-3
LINES, HEATMAP = "Patch-to-Patch Lines", "Heatmap"


def connect(url: str, downloads: Path, **kwargs) -> Client:
    return Client(url, verbose=False, download_files=str(downloads), **kwargs)


@pytest.fixture
def client(app_server, tmp_path):
    c = connect(app_server.url, tmp_path)
    yield c
    c.close()


def png(path) -> np.ndarray:
    """Decode an image output; it must be a real PNG file (lossless)."""
    path = Path(path["value"] if isinstance(path, dict) else path)
    assert path.suffix == ".png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def points(plot: dict, series: str | None = None) -> list[tuple[float, float]]:
    """The (iteration, value) points of a LinePlot output (or an update carrying it) of one series, or
    of the metric's own series: the null colour-anchor rows, the invisible axis-span point and the
    replay-loop marks left out."""
    from page_outputs import SERIES_LOOP, SERIES_SPAN

    plot = plot["value"] if plot.get("__type__") == "update" else plot
    cols = plot["columns"]
    rows = [dict(zip(cols, row)) for row in plot["data"]]
    return [(r["iteration"], r["value"]) for r in rows
            if r["iteration"] is not None and (r.get("series") == series if series is not None else
                                               r.get("series") != SERIES_SPAN
                                               and not str(r.get("series")).startswith(SERIES_LOOP))]


def raw_call(client: Client, api_name: str, data_json: str) -> tuple[str, str]:
    """Call an endpoint over plain HTTP in ``client``'s browser session with a hand-written JSON body.

    gradio_client refuses to encode NaN and infinities, but any HTTP client can send them, so the
    app must refuse them too. Returns the (event, data) of the last server-sent event, or ("error",
    its messages) when the event's validator refused the input (HTTP 422, nothing queued).
    """
    body = f'{{"data": {data_json}, "session_hash": {json.dumps(client.session_hash)}}}'.encode()
    base = client.src.rstrip("/") + f"/gradio_api/call{api_name}"
    post = urllib.request.Request(base, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(post, timeout=30) as response:
            event_id = json.loads(response.read())["event_id"]
    except urllib.error.HTTPError as e:
        if e.code != 422:
            raise
        detail = json.loads(e.read().decode()).get("detail", [])
        return "error", "\n".join(d.get("message", "") for d in detail if d.get("is_valid") is False)
    with urllib.request.urlopen(f"{base}/{event_id}", timeout=120) as response:
        lines = response.read().decode().splitlines()
    event = [line[7:] for line in lines if line.startswith("event: ")][-1]
    data = [line[6:] for line in lines if line.startswith("data: ")][-1]
    return event, data


NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}  # JSON tokens Python's json accepts


def error_of(client: Client, *args, api_name: str) -> str:
    """The error message of a call that must fail (non-finite floats go over raw HTTP); a refusal of
    the event's validator reads "1 parameter(s) failed validation: - <parameter>: <message>"."""
    if any(isinstance(a, float) and not np.isfinite(a) for a in args):
        items = [NON_FINITE[repr(a)] if isinstance(a, float) and not np.isfinite(a) else json.dumps(a) for a in args]
        event, data = raw_call(client, api_name, "[" + ", ".join(items) + "]")
        assert event == "error", (event, data)
        return data
    with pytest.raises((AppError, ValidationError)) as info:  # refused in the handler, or by its validator
        client.predict(*args, api_name=api_name)
    return refusal_text(info.value)


def refusal_text(error: Exception) -> str:
    """The message of a refused call: an ``AppError``'s text, or the messages of a ``ValidationError``
    (gradio_client words it "1 parameter(s) failed validation:\\n- <parameter>: <message>")."""
    if isinstance(error, ValidationError):
        return "\n".join(line.split(": ", 1)[1] for line in str(error).splitlines()[1:])
    return str(error)


def load(client: Client, name: str = ALT):
    return client.predict(name, api_name="/load_session")


def run(client: Client, n: int):
    return client.predict(n, api_name="/run_world_model")
