"""A hostile local account and clients that cancel, vanish or fill the disk.

Each numbered case reproduces one attack, as a test that failed on the code before the fix. Where
the point is another account, ``nobody`` does the planting (``setpriv``; the suite runs as root);
without a second account those tests skip, saying why.

1. park folder: one another account could change is refused at start (a sentence, no traceback);
   one the app creates is 0700; a shared sticky temp folder (``/tmp``) is fine;
2. exports: written 0600 into folders the app made privately, never through a planted link or into
   a folder another account made; a failed export says so without a server path;
3. Gradio's cache: private by default, so another account reads no export (launched app);
4. recordings from the page: stopped by a cancel, by Stop, by a client that goes away and by a
   handler nobody resumes any more (the session so far kept, valid, listed); one per client and the configured number at once, also
   after submit-then-cancel; the disk budget refuses in a sentence and stops a recording at it;
5. checkpoint names of every length 200-300: saved, or refused in a sentence naming the limit,
   never a server path, nothing left behind;
6. a parked model that cannot be reloaded gives a fresh model, never another tab's, with a note in
   words that stays until the user acts;
7. parked files and private folders gone after SIGTERM and SIGINT and when a tab is released or
   dropped; a park failure logged once per cause.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch

import config
import page_analysis
import page_common
import page_outputs
import page_run
import page_sessions
import page_workflow
import private_files
import run_controller
from checkpoints import RefusedFiles
from conftest import (
    ALT, REPO, TINY, FakeSession, connect, free_port, launch_app, load, record_app_sessions, run, stop_process,
)
from model_pool import ModelPool
from private_files import UnsafeFolderError, check_folder
from record_session import RecordingGate, RecordingRefused, folder_bytes, record_session
from run_controller import RunController
from run_export import write_export
from session_explorer_lib import scan_sessions

LONG_RECORDING = 10_000  # steps: about 10 s at 1,000 steps/s on one core, longer under load


# -----------------------------------------------------------------------------
# a second account


def _second_account_works() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    try:
        return subprocess.run(_as_nobody_cmd("true"), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _as_nobody_cmd(*cmd: str) -> list[str]:
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *cmd]


SECOND_ACCOUNT = _second_account_works()
needs_second_account = pytest.mark.skipif(
    not SECOND_ACCOUNT, reason="no second account: these tests need root and setpriv to act as 'nobody'")


def as_nobody(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` as the account ``nobody`` (another local user than the server's)."""
    done = subprocess.run(_as_nobody_cmd(*cmd), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"as nobody, {cmd} failed: {done.stderr}")
    return done


def nobody_can_read(path: Path) -> bool:
    return as_nobody("dd", f"if={path}", "of=/dev/null", "status=none", check=False).returncode == 0  # binary-safe


@pytest.fixture
def shared_tmp():
    """A folder like /tmp (root's, mode 1777) that ``nobody`` can reach; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="cwm-hostile-", dir="/tmp"))
    os.chmod(base, 0o1777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def hostile_dir(shared_tmp) -> Path:
    """A folder made by ``nobody`` with mode 0777 inside the shared temp folder."""
    folder = shared_tmp / "planted"
    as_nobody("mkdir", "-m", "0777", str(folder))
    return folder


def _start_and_wait(env_extra: dict, work: Path, timeout: float = 90) -> subprocess.CompletedProcess | None:
    """Start the app; its result when it exits within ``timeout``, None when it keeps serving (killed)."""
    env = {**os.environ, "CWM_SAVED_ROOT": str(work / "saved"), "GRADIO_ANALYTICS_ENABLED": "False", **env_extra}
    env.pop("GRADIO_TEMP_DIR", None)
    cmd = [sys.executable, str(REPO / "concat_world_model_explorer_gradio.py"), "--host", "127.0.0.1",
           "--port", str(free_port()), "--no-browser"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# -----------------------------------------------------------------------------
# 1. the park folder


@needs_second_account
def test_a_park_folder_another_account_can_write_is_refused_at_start_in_a_sentence(hostile_dir, shared_tmp, tmp_path):
    # the attack: CWM_PARK_DIR owned by another account, mode 0777; the app started without a word
    with pytest.raises(UnsafeFolderError, match="belongs to another account"):
        ModelPool(folder=hostile_dir)
    done = _start_and_wait({"CWM_PARK_DIR": str(hostile_dir), "TMPDIR": str(shared_tmp)}, tmp_path)
    assert done is not None, "the app started with a park folder another account can write"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "Refusing the park folder ($CWM_PARK_DIR)" in done.stderr and "another account" in done.stderr
    assert not list(hostile_dir.iterdir())  # nothing was written into it


@needs_second_account
def test_a_park_folder_below_another_accounts_folder_or_reached_by_its_link_is_refused(hostile_dir, shared_tmp):
    mine = hostile_dir / "mine"  # the app would create it, but nobody could rename it away and swap another in
    with pytest.raises(UnsafeFolderError, match="another account"):
        ModelPool(folder=mine)
    assert not mine.exists()
    link = shared_tmp / "park-link"  # a link nobody planted, named like the folder the operator meant
    as_nobody("ln", "-s", str(hostile_dir), str(link))
    with pytest.raises(UnsafeFolderError, match="another account"):
        ModelPool(folder=link)
    own = shared_tmp / "group-writable"
    own.mkdir()
    os.chmod(own, 0o775)
    with pytest.raises(UnsafeFolderError, match="other accounts may write to it"):
        ModelPool(folder=own)


def test_the_app_creates_its_park_folder_0700_and_accepts_a_shared_sticky_temp_folder(tmp_path):
    folder = tmp_path / "new" / "park"
    pool = ModelPool(folder=folder)
    try:
        for made in (tmp_path / "new", folder, pool.folder):
            assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    finally:
        pool.close()
    assert not pool.folder.exists()
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: the pool's own 0700 folder inside cannot be renamed by others
    pool = ModelPool(folder=sticky)
    try:
        assert stat.S_IMODE(pool.folder.stat().st_mode) == 0o700 and pool.folder.parent == sticky
    finally:
        pool.close()
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    os.chmod(open_folder, 0o777)  # writable by all and not sticky: anyone could swap the pool's folder
    with pytest.raises(UnsafeFolderError, match="other accounts may write to it"):
        ModelPool(folder=open_folder)


@needs_second_account
def test_a_tensorboard_folder_another_account_can_write_is_refused_at_start(hostile_dir, shared_tmp, tmp_path):
    # the same rule for the app's other folder outside saved/ (CWM_TENSORBOARD_DIR)
    done = _start_and_wait({"CWM_TENSORBOARD_DIR": str(hostile_dir), "TMPDIR": str(shared_tmp)}, tmp_path)
    assert done is not None, "the app started with a TensorBoard folder another account can write"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "Refusing the TensorBoard folder ($CWM_TENSORBOARD_DIR)" in done.stderr
    assert not list(hostile_dir.iterdir())


def test_a_private_folder_is_made_0700_made_again_when_gone_and_deleted_by_its_owner(tmp_path):
    owner = private_files.PrivateFolder("cwm-test-", "the test folder", parent=tmp_path)
    first = owner.path()
    assert stat.S_IMODE(first.stat().st_mode) == 0o700 and owner.path() == first
    shutil.rmtree(first)  # a temp cleaner
    second = owner.path()
    assert second != first and second.is_dir()
    (second / "file").write_bytes(b"x")
    owner.close()
    assert not second.exists()
    dropped = private_files.PrivateFolder("cwm-test-", "the test folder", parent=tmp_path)
    made = dropped.path()
    del dropped  # its finalizer deletes the folder (also at the process's end)
    assert not made.exists()


# -----------------------------------------------------------------------------
# 2. exports


def _exporting_user(tmp_path, monkeypatch) -> page_common.UserState:
    monkeypatch.setattr(config, "CHECKPOINT_PATH", tmp_path / "ckpt" / "autoencoder.pth")
    user = page_common.UserState(config=TINY)
    user.controller.load_session(FakeSession(n=8))
    list(user.controller.run(2))
    return user


def test_an_export_never_writes_through_a_planted_link(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"the server user's own file")
    os.chmod(target, 0o600)
    link = tmp_path / "cwm_export_step2_iteration2.zip"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_export(link, {}, [], {}, {})
    assert target.read_bytes() == b"the server user's own file"
    fresh = write_export(tmp_path / "fresh.zip", {}, [{"iteration": 1}], {}, {})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and zipfile.is_zipfile(fresh)


@needs_second_account
def test_exports_go_only_into_folders_the_app_made_privately(shared_tmp, tmp_path, monkeypatch):
    # the attack: another account creates $TMPDIR/cwm-exports (0777) before the app does
    planted = shared_tmp / "cwm-exports"
    as_nobody("mkdir", "-m", "0777", str(planted))
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    user = _exporting_user(tmp_path, monkeypatch)
    zip_path = Path(page_workflow.export_results(user))
    assert not list(planted.iterdir()) and planted not in zip_path.parents
    assert stat.S_IMODE(zip_path.stat().st_mode) == 0o600 and zipfile.is_zipfile(zip_path)
    for folder in zip_path.parents:
        if folder == shared_tmp:
            break
        st = folder.stat()
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700, folder
    assert not nobody_can_read(zip_path)
    # a second export: a new folder of its own, the same private root
    again = Path(page_workflow.export_results(user))
    assert again.parent != zip_path.parent and again.parent.parent == zip_path.parent.parent


def test_a_failed_export_says_why_without_a_server_path(tmp_path, monkeypatch):
    user = _exporting_user(tmp_path, monkeypatch)

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(page_workflow, "write_export", full_disk)
    with pytest.raises(gr.Error) as info:
        page_workflow.export_results(user)
    message = str(info.value)
    assert "Could not write the export: the disk is full" in message
    assert tempfile.gettempdir() not in message and str(tmp_path) not in message
    assert not [p for p in user.exports.path().iterdir()]  # its half-made folder went too


# -----------------------------------------------------------------------------
# 3 and 7: a launched app with a hostile neighbour (no GRADIO_TEMP_DIR, TMPDIR shared with nobody)


@pytest.fixture
def neighbour_app(shared_tmp, tmp_path):
    """The app with TMPDIR a shared sticky folder in which ``nobody`` planted ``gradio`` and
    ``cwm-exports`` (0777), parked models in its own folder after 1 s idle; stopped by the test."""
    if SECOND_ACCOUNT:
        for name in ("gradio", "cwm-exports"):
            as_nobody("mkdir", "-m", "0777", str(shared_tmp / name))
    saved = tmp_path / "saved"
    record_app_sessions(saved)
    park = tmp_path / "park"
    env = {"TMPDIR": str(shared_tmp), "CWM_PARK_DIR": str(park), "CWM_IDLE_PARK_S": "1"}
    server = launch_app(saved, tmp_path, env_extra=env, drop_env=("GRADIO_TEMP_DIR",))
    server.park, server.shared_tmp = park, shared_tmp
    yield server
    stop_process(server.proc)


def _park_files(park: Path) -> list[Path]:
    return sorted(park.rglob("*.park")) if park.exists() else []


def _wait_for(predicate, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


@needs_second_account
def test_another_account_reads_no_export_in_gradios_cache(neighbour_app, tmp_path):
    client = connect(neighbour_app.url, tmp_path / "downloads")
    try:
        load(client)
        run(client, 2)
        client.predict(api_name="/export")
    finally:
        client.close()
    cached = [p for p in neighbour_app.shared_tmp.rglob("*.zip")]
    assert cached, "the export is not in the app's temp folder"
    for path in cached:
        assert not nobody_can_read(path), f"another account can read {path}"
    for planted in ("gradio", "cwm-exports"):
        assert not list((neighbour_app.shared_tmp / planted).iterdir()), f"the app wrote into the planted {planted}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_parked_models_and_private_folders_are_gone_after_the_server_is_stopped(neighbour_app, tmp_path, signum):
    clients = [connect(neighbour_app.url, tmp_path / f"c{i}") for i in range(2)]
    try:
        for c in clients:
            load(c)
            run(c, 2)
        assert len(_wait_for(lambda: len(_park_files(neighbour_app.park)) >= 2 and _park_files(neighbour_app.park),
                             30)) >= 2, neighbour_app.log()[-2000:]
        private = [p for p in neighbour_app.shared_tmp.iterdir() if p.name.startswith("cwm-")
                   and p.name not in ("cwm-exports",)]
        neighbour_app.proc.send_signal(signum)
        neighbour_app.proc.wait(timeout=60)
    finally:
        for c in clients:
            c.close()
    assert _park_files(neighbour_app.park) == [] and not list(neighbour_app.park.iterdir())  # before the fix: 10 files left
    assert private  # the app's own Gradio cache (and export folder) lived there...
    assert [p for p in private if p.exists()] == []  # ...and went with it
    assert "Traceback" not in neighbour_app.log()


# -----------------------------------------------------------------------------
# 4. recordings from the page


def _session_metas(root: Path) -> dict[str, dict]:
    metas = {}
    for meta in root.glob("*/session_meta.json"):
        try:
            metas[meta.parent.name] = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
    return metas


def _recording_now(root: Path, before: set[str]) -> list[str]:
    return [name for name, meta in _session_metas(root).items() if name not in before and meta.get("status") == "recording"]


@pytest.fixture
def recording_app(tmp_path):
    saved = tmp_path / "saved"
    record_app_sessions(saved)
    server = launch_app(saved, tmp_path)
    server.sessions = saved / "sessions" / "toroidal_dot"
    yield server
    stop_process(server.proc)


def _started(root: Path, before: set[str], timeout: float = 30) -> str:
    name = _wait_for(lambda: next(iter(set(_session_metas(root)) - before), None), timeout)
    assert name, "the recording did not start"
    return name


def _stopped_early(root: Path, name: str, timeout: float = 8) -> dict:
    meta = _wait_for(lambda: (m := _session_metas(root).get(name)) and m.get("status") != "recording" and m, timeout)
    assert meta and meta["status"] == "stopped", f"still recording or complete: {meta}"
    assert meta["total_steps"] < 2 * LONG_RECORDING + 1
    return meta


def test_a_recording_stops_when_its_client_cancels_presses_stop_or_goes_away(recording_app, tmp_path):
    root = recording_app.sessions
    client = connect(recording_app.url, tmp_path / "a")
    try:
        before = set(_session_metas(root))
        job = client.submit("random", LONG_RECORDING, 1, 5, 27, api_name="/record_session")
        cancelled = _started(root, before)
        job.cancel()  # before the fix: the recording ran on to the end
        _stopped_early(root, cancelled)

        before = set(_session_metas(root))
        job = client.submit("random", LONG_RECORDING, 2, 5, 27, api_name="/record_session")
        stopped = _started(root, before)
        progress = client.predict(api_name="/stop")[0]
        assert "Stopped the recording" in progress  # not "Nothing is running"
        text, dropdown, _ = job.result(timeout=60)
        assert text.startswith("**Recording stopped** after") and dropdown["value"] == stopped
        _stopped_early(root, stopped)
    finally:
        client.close()

    gone = connect(recording_app.url, tmp_path / "b")
    before = set(_session_metas(root))
    gone.submit("random", LONG_RECORDING, 3, 5, 27, api_name="/record_session")
    vanished = _started(root, before)
    gone.close()  # its heartbeat ends; Gradio releases its state (1 s in test mode) and the recording stops
    _stopped_early(root, vanished, timeout=15)

    listed = {s.name: s for s in scan_sessions(root)}
    for name in (cancelled, stopped, vanished):  # each stopped session is valid and listed
        assert listed[name].ok, listed[name]
    check = connect(recording_app.url, tmp_path / "c")
    try:
        assert "**Frames:**" in load(check, vanished)[0]
    finally:
        check.close()


def test_submit_then_cancel_never_runs_more_recordings_than_allowed(recording_app, tmp_path):
    # before the fix: six submit-then-cancel calls from one client ran six recordings at once (limit 2)
    root = recording_app.sessions
    before = set(_session_metas(root))
    client = connect(recording_app.url, tmp_path / "a")
    most = 0
    try:
        for seed in range(6):
            job = client.submit("random", LONG_RECORDING, 10 + seed, 5, 27, api_name="/record_session")
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                most = max(most, len(_recording_now(root, before)))
                time.sleep(0.05)
            job.cancel()
        for _ in range(20):
            most = max(most, len(_recording_now(root, before)))
            time.sleep(0.1)
        assert most <= 1, f"{most} recordings of one client ran at once"
        assert _wait_for(lambda: not _recording_now(root, before), 10), "a cancelled recording runs on"
        others = [connect(recording_app.url, tmp_path / f"o{i}") for i in range(3)]
        try:
            jobs = [c.submit("random", LONG_RECORDING, 30 + i, 5, 27, api_name="/record_session")
                    for i, c in enumerate(others)]
            for _ in range(40):
                most = max(most, len(_recording_now(root, before)))
                time.sleep(0.1)
            assert most <= 2, f"{most} recordings ran at once (the limit is 2)"
            for c in others:
                c.predict(api_name="/stop")
            for job in jobs:
                job.cancel()
        finally:
            for c in others:
                c.close()
        assert _wait_for(lambda: not _recording_now(root, before), 15)
    finally:
        client.close()


@pytest.fixture
def sessions_here(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "sessions"
    root.mkdir()
    monkeypatch.setattr(config, "SESSIONS_ROOT", root)
    return root


def _record(user, steps: int, seed: int = 0) -> list[tuple]:
    return list(page_workflow.record_new_session("random", steps, seed, 5, 27, user))


def test_one_recording_per_tab_and_the_disk_budget_refuses_in_a_sentence(sessions_here):
    gate = RecordingGate(max_running=2, budget_bytes=3 * 2**20)
    a, b, c = (page_common.UserState(config=TINY, recordings=gate) for _ in range(3))
    held = [gate.start(a, 10)]  # a's recording is running
    with pytest.raises(gr.Error, match="This tab is already recording"):
        _record(a, 5)
    held.append(gate.start(b, 10))
    with pytest.raises(gr.Error, match="2 recordings are already running on this server"):
        _record(c, 5)
    for ticket in held:
        ticket.done()
    assert gate.running == 0
    # the budget: a recording that reaches it stops there, its session kept, valid and listed
    final = _record(c, 2000)[-1]
    assert final[0].startswith("**Recording stopped at the disk budget**"), final[0]
    (session,) = [s for s in scan_sessions(sessions_here)]
    assert session.ok and f"session `{session.name}`" in final[0]
    assert folder_bytes(sessions_here) <= 3 * 2**20
    with pytest.raises(gr.Error) as info:
        _record(c, 100)
    message = str(info.value)
    assert "Recording refused" in message and "CWM_RECORD_BUDGET_MB" in message and str(sessions_here) not in message
    off = page_common.UserState(config=TINY, recordings=RecordingGate(2, 0))
    with pytest.raises(gr.Error, match="turned off on this server"):
        _record(off, 5)


def test_a_closed_recording_handler_stops_its_recording_and_frees_its_place(sessions_here):
    gate = RecordingGate(max_running=1, budget_bytes=2**30)
    user = page_common.UserState(config=TINY, recordings=gate)
    updates = page_workflow.record_new_session("random", LONG_RECORDING, 0, 5, 27, user)
    assert next(updates)[0].startswith("**Recording:** starting") and gate.running == 0  # nothing taken yet
    assert next(updates)[0].startswith("**Recording:**") and gate.running == 1
    updates.close()  # what a cancel or a vanished client does to the handler
    assert _wait_for(lambda: gate.running == 0, 10), "the recording kept its place"
    (meta,) = _session_metas(sessions_here).values()
    assert meta["status"] == "stopped" and meta["total_steps"] < 2 * LONG_RECORDING + 1
    assert [s.ok for s in scan_sessions(sessions_here)] == [True]
    final = _record(user, 5)[-1]  # the place is free again
    assert final[0].startswith("**Recorded** session")


def test_a_recording_nobody_asks_about_any_more_stops(sessions_here, monkeypatch):
    # a client gone without a cancel: Gradio stops resuming the handler and never closes it
    monkeypatch.setattr(page_workflow, "APP", dataclasses.replace(page_workflow.APP, record_orphan_s=0.5))
    gate = RecordingGate(max_running=1, budget_bytes=2**30)
    user = page_common.UserState(config=TINY, recordings=gate)
    updates = page_workflow.record_new_session("random", LONG_RECORDING, 0, 5, 27, user)
    next(updates), next(updates)  # started; then nobody asks again (and the handler stays open)
    assert _wait_for(lambda: gate.running == 0, 10), "an abandoned recording runs on"
    (meta,) = _session_metas(sessions_here).values()
    assert meta["status"] == "stopped" and meta["total_steps"] < 2 * LONG_RECORDING + 1
    updates.close()


def test_the_record_budget_comes_from_the_environment():
    app, _ = config.from_env({"CWM_RECORD_BUDGET_MB": "2.5"})
    assert app.record_budget_bytes == int(2.5 * 2**20)
    assert config.from_env({})[0].record_budget_bytes == config.AppConfig.record_budget_bytes
    assert config.from_env({"CWM_RECORD_BUDGET_MB": "0"})[0].record_budget_bytes == 0


# -----------------------------------------------------------------------------
# 5. long names


def test_checkpoint_names_of_every_length_200_to_300_save_or_are_refused_in_a_sentence(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    monkeypatch.setattr(config, "CHECKPOINT_PATH", folder / "autoencoder.pth")
    user = page_common.UserState(config=TINY)
    user.controller.load_session(FakeSession(n=8))
    list(user.controller.run(1))
    # the save writes through ".NAME.pth.<pid up to 7 digits>_<8 hex>.tmp": 22 bytes more than NAME.pth
    limit = min(os.pathconf(tmp_path, "PC_NAME_MAX"), 255) - 22 - len(".pth")
    saved = refused = 0
    leaks, wrong = [], []  # (length, message): a raw error or a server path; a save or refusal on the wrong side
    for length in range(200, 301):
        name = "b" * length
        try:
            text, _ = page_workflow.save_checkpoint(name, user)
        except Exception as e:  # noqa: BLE001 (anything but a sentence for the client is a leak)
            message = str(e)
            if (not isinstance(e, gr.Error) or str(tmp_path) in message or "/tmp" in message
                    or "Errno" in message):
                leaks.append((length, message))
            elif length <= limit or f"may be at most {limit} bytes" not in message:
                wrong.append((length, message))
            refused += 1
        else:
            if length > limit or not (folder / f"{name}.pth").is_file() or f"**Saved** `{name}.pth`" not in text:
                wrong.append((length, text))
            saved += 1
    assert not leaks, f"{len(leaks)} names got a raw error or a server path, e.g. {leaks[0]}"
    assert not wrong, f"{len(wrong)} names saved or refused on the wrong side of {limit} bytes, e.g. {wrong[0]}"
    assert saved == limit - 199 and refused == 300 - limit
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left behind
    with pytest.raises(gr.Error, match=f"may be at most {limit} bytes"):
        page_workflow.load_checkpoint("b" * 250, user)
    assert limit == run_controller.max_saved_name_bytes(folder) - len(".pth")


def test_file_system_errors_reach_the_client_with_placeholders_only(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SESSIONS_ROOT", tmp_path / "saved" / "sessions")
    error = OSError(36, "File name too long", str(tmp_path / "saved" / "sessions" / ".x.pth.1234_abcd.tmp"))
    text = page_common.os_error_text(error)
    assert text == "the name is too long for the file system (<sessions>/.x.pth.1234_abcd.tmp)"
    assert page_common.hide_paths("[Errno 2] No such file: '/srv/elsewhere/x'") == "[Errno 2] No such file: '<path>'"
    assert page_common.hide_paths(f"at {tmp_path}/x") == f"at <temp>/{tmp_path.relative_to(tempfile.gettempdir())}/x"
    assert page_common.hide_paths(f"{tempfile.gettempdir()}/x.zip") == "<temp>/x.zip"


# -----------------------------------------------------------------------------
# 6. a parked model that cannot be reloaded


def _two_tabs(tmp_path):
    refused = RefusedFiles()
    x, y = (RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu", refused_files=refused)
            for _ in range(2))
    for c in (x, y):
        c.load_session(FakeSession(n=12))
    return x, y


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_lost_parked_model_gives_a_fresh_model_not_another_tabs_and_says_so(tmp_path, damage):
    # the attack: X parks at step 6, Y saves the shared checkpoint, X's park file goes
    x, y = _two_tabs(tmp_path)
    list(x.run(6))
    folder = tmp_path / "parked"
    folder.mkdir()
    assert x.park(folder)
    list(y.run(9))
    assert y.saved.ok and y.world_model().step > 0  # the shared checkpoint now holds Y's model
    (park_file,) = folder.iterdir()
    if damage == "deleted":
        park_file.unlink()
    else:
        park_file.write_bytes(b"not a torch file")
    user = page_common.UserState(config=TINY)
    user.controller = x
    outputs = page_analysis.counterfactual(5, user)
    wm = x.world_model()
    assert wm.step == 0 and wm.iteration == 0, "the tab got another tab's model"
    assert x.origin.kind == "lost" and x.history == [] and len(x.snapshots.iterations) == 0
    note = outputs[-1]
    assert "This tab's model was lost" in note and "run history was lost" in note
    assert ("was deleted" in note) == (damage == "deleted") and ("could not be read" in note) == (damage != "deleted")
    stopped = page_run.stop_run(user)
    shown = " ".join(str(v) for v in stopped if isinstance(v, str))
    assert str(tmp_path) not in shown and "a new one was made" not in shown
    assert "This tab's model was lost" in page_outputs.checkpoint_markdown(x)
    updates = list(page_run.run_world_model(2, user))  # the next run's updates keep the note, its end too
    at = 1 + page_outputs.RUN_OUTPUT_KEYS.index("checkpoint")
    assert "This tab's model was lost" in updates[0][at] and "This tab's model was lost" in updates[-1][at]
    assert "This tab's model was lost" in page_outputs.checkpoint_markdown(x)
    x.reset_model()  # the user acts: the note goes
    assert "was lost" not in page_outputs.checkpoint_markdown(x)


# -----------------------------------------------------------------------------
# 7. parked files removed, failures logged once


def test_a_dropped_or_released_tab_leaves_no_parked_file(tmp_path):
    folder = tmp_path / "parked"
    folder.mkdir()
    x, y = _two_tabs(tmp_path)
    for c in (x, y):
        list(c.run(2))
        assert c.park(folder)
    assert len(list(folder.iterdir())) == 2
    x.release()
    assert _wait_for(lambda: len(list(folder.iterdir())) == 1, 5)
    del y, c  # a tab whose state went without a release
    gc.collect()
    assert not list(folder.iterdir())


def test_a_park_failure_is_logged_once_per_cause_and_not_retried_every_sweep(tmp_path, monkeypatch, caplog):
    pool = ModelPool(idle_s=3600, max_resident=4, sweep_s=3600, retry_s=60)
    attempts = []

    def full_disk(*args, **kwargs):
        attempts.append(1)
        raise OSError(28, "No space left on device")

    try:
        tabs = [RunController(checkpoint_path=tmp_path / "autoencoder.pth", config=TINY, device="cpu", pool=pool)
                for _ in range(2)]
        for c in tabs:
            c.load_session(FakeSession(n=8))
            list(c.run(1))
        monkeypatch.setattr(run_controller.torch, "save", full_disk)
        caplog.set_level(logging.INFO, logger=config.LOGGER_NAME)
        later = time.monotonic() + 7200
        for k in range(10):  # ten sweeps a second apart
            pool.sweep(now=later + k)
        warnings = [r for r in caplog.records if "could not park" in r.getMessage()]
        assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
        assert len(attempts) == 2  # one try per model, then the retry waits retry_s
        assert not any(c.is_parked for c in tabs) and all(c.is_resident for c in tabs)
        monkeypatch.undo()
        assert pool.sweep(now=later + 120) == 2  # the disk has room again: both park
        assert any("parking idle models works again" in r.getMessage() for r in caplog.records)
    finally:
        pool.close()
