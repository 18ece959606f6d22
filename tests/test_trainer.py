"""The headless trainer (``train_world_model.py``) run as a user runs it, a subprocess, and the
TensorBoard logs it and the app write: its CSV is the page export's, its checkpoints load, Ctrl-C
saves, bad flags are one line and status 2, the logs read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import config
import page_common
import page_run
import page_sessions
import page_workflow
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from conftest import TINY, REPO, stop_process
from config import AutoencoderConcatPredictorWorldModelConfig
from record_session import record_session
from tensorboard_log import DOT_FOUND_TAG, IMAGE_TAGS, SCALAR_TAGS

SESSION = "trainer_alternate"
ITERATIONS = 12  # predictions are scored from iteration 3 on
IMAGES_EVERY = 5
# the tiny model as the trainer's --set flags: the fields where TINY differs from the defaults
TINY_SET = [f"{f.name}={v if isinstance(v := getattr(TINY, f.name), str) else json.dumps(v)}"  # text as it is
            for f in dataclasses.fields(TINY) if getattr(TINY, f.name) != getattr(AutoencoderConcatPredictorWorldModelConfig(), f.name)]


def train(saved: Path, *flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CWM_SAVED_ROOT": str(saved)}
    return subprocess.run([sys.executable, str(REPO / "train_world_model.py"), *flags], cwd=cwd or saved.parent,
                          env=env, capture_output=True, text=True, timeout=600)


def csv_rows(text: str) -> list[dict]:
    """The CSV's rows without the iteration time (a wall-clock reading, different in every run)."""
    return [{k: v for k, v in row.items() if k != "iteration_time"} for row in csv.DictReader(io.StringIO(text))]


def scalars(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A data folder holding one recorded session."""
    root = tmp_path_factory.mktemp("trainer") / "saved"
    record_session("alternate", 30, 0, name=SESSION, root=root / "sessions" / "toroidal_dot")
    return root


@pytest.fixture(scope="module")
def trained(saved) -> subprocess.CompletedProcess:
    """One trainer run of the tiny model: CSV, TensorBoard log and a named checkpoint."""
    done = train(saved, "--session", SESSION, "--iterations", str(ITERATIONS), "--threads", "2", "--device", "cpu",
                 "--set", *TINY_SET, "--metrics-csv", "out/metrics.csv", "--tensorboard", "tb",
                 "--tensorboard-images-every", str(IMAGES_EVERY), "--save-as", "tiny")
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_trainers_csv_is_the_page_exports_for_the_same_seeded_run(trained, saved, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SESSIONS_ROOT", saved / "sessions" / "toroidal_dot")
    monkeypatch.setattr(config, "CHECKPOINT_PATH", tmp_path / "checkpoints" / "autoencoder.pth")
    user = page_common.UserState(config=TINY, threads=2)  # as the trainer (--threads 2) and the server compute:
    page_sessions.load_session(SESSION, user)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the run's set-up in the caller's thread with one, its iterations with 2
    try:
        list(page_run.run_world_model(ITERATIONS, user))
    finally:
        torch.set_num_threads(before)
    with zipfile.ZipFile(page_workflow.export_results(user)) as zf:
        exported = zf.read("metrics.csv").decode()
    written = (saved.parent / "out" / "metrics.csv").read_text()
    assert written.splitlines()[0] == exported.splitlines()[0]  # the same columns, in the same order
    assert "iteration_time" in written.splitlines()[0]
    assert len(csv_rows(written)) == ITERATIONS
    assert csv_rows(written) == csv_rows(exported)  # every value, iteration time aside


def test_the_trainer_saves_the_shared_and_the_named_checkpoint_and_they_load(trained, saved):
    assert "Trained 12 of 12 iterations" in trained.stdout
    folder = saved / "checkpoints" / "toroidal_dot"
    for name in ("autoencoder.pth", "tiny.pth"):
        info = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=TINY).load_checkpoint(folder / name)
        assert info["iteration"] == ITERATIONS
    again = train(saved, "--session", SESSION, "--iterations", "1", "--set", *TINY_SET, "--save-as", "tiny")
    assert again.returncode == 2 and "--save-as: a checkpoint named tiny exists already" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_the_tensorboard_run_folder_holds_every_scalar_and_the_pictures(trained, saved):
    root = saved.parent / "tb"
    (folder,) = root.iterdir()  # one run, one folder
    assert folder.name.endswith(f"-{SESSION}") and folder.name[:8].isdigit()  # starts with the UTC date: sorts by time
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    events = scalars(folder)
    rows = list(csv.DictReader((saved.parent / "out" / "metrics.csv").open()))
    logged = {key for key in SCALAR_TAGS if any(r[key] not in ("", "inf") for r in rows)}  # a finite value somewhere
    assert set(SCALAR_TAGS) - logged <= {"dot_error"}  # a tiny model may predict no dot yet: no finite dot error
    assert set(events.Tags()["scalars"]) == {SCALAR_TAGS[key] for key in logged} | {DOT_FOUND_TAG}
    times = events.Scalars(SCALAR_TAGS["iteration_time"])
    assert [e.step for e in times] == list(range(1, ITERATIONS + 1))  # every iteration, at the model's iteration
    loss = {e.step: e.value for e in events.Scalars(SCALAR_TAGS["training_loss"])}
    assert loss and all(loss[int(r["iteration"])] == pytest.approx(float(r["training_loss"]), rel=1e-6)
                        for r in rows if r["training_loss"])
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars(DOT_FOUND_TAG))
    assert set(events.Tags()["images"]) == set(IMAGE_TAGS.values())
    assert [e.step for e in events.Images(IMAGE_TAGS["predicted"])] == [5, 10]


def test_an_app_tab_logs_its_runs_to_a_run_folder_of_its_own(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "SESSIONS_ROOT", saved / "sessions" / "toroidal_dot")
    monkeypatch.setattr(config, "CHECKPOINT_PATH", tmp_path / "checkpoints" / "autoencoder.pth")
    default = page_common.UserState(config=TINY, tensorboard_dir=str(tmp_path / "tb"))
    first, second = page_common.UserState.__deepcopy__(default, {}), page_common.UserState.__deepcopy__(default, {})
    for user in (first, second):
        page_sessions.load_session(SESSION, user)
        list(page_run.run_world_model(3, user))
        page_common.release_user(user)  # closing the tab closes its log
    folders = sorted((tmp_path / "tb").iterdir())
    assert len(folders) == 2 and all(f.name.endswith("-tab") for f in folders)  # none for the tab that never ran
    # by name is by time: the second tab's model started from the checkpoint the first one saved
    steps = [[e.step for e in scalars(folder).Scalars(SCALAR_TAGS["iteration_time"])] for folder in folders]
    assert steps == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("flags, says", [
    (["--session", SESSION, "--iterations", "0"], "argument --iterations: expected a whole number from 1"),
    (["--live", "sideways", "--iterations", "3"], "argument --live: invalid choice: 'sideways'"),
    (["--session", "../etc", "--iterations", "3"], "argument --session: Invalid session name '../etc'"),
    (["--session", "no_such_session", "--iterations", "3"], "--session: Unknown session"),
    (["--session", SESSION, "--iterations", "3", "--seed", "4"], "--seed is the live robot's seed: use it with --live"),
    (["--session", SESSION, "--iterations", "3", "--set", "embed_dim=wide"], "--set: 'embed_dim=wide'"),
    (["--session", SESSION, "--iterations", "3", "--from-checkpoint", "missing"], "--from-checkpoint: no checkpoint named missing"),
])
def test_a_bad_flag_value_exits_with_status_2_and_one_line_naming_it(saved, flags, says):
    done = train(saved, *flags)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("train_world_model.py: error: ")
    assert says in done.stderr


def test_a_tensorboard_folder_others_may_write_to_is_refused_in_one_line(saved, tmp_path):
    open_folder = tmp_path / "tb-open"
    open_folder.mkdir()
    open_folder.chmod(0o777)  # any local account could plant or swap run folders in it
    done = train(saved, "--session", SESSION, "--iterations", "3", "--set", *TINY_SET, "--tensorboard", str(open_folder))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--tensorboard: " in done.stderr
    assert list(open_folder.iterdir()) == []  # no run folder was made in it


def test_ctrl_c_stops_after_the_current_iteration_and_leaves_a_checkpoint_that_loads(tmp_path):
    saved, log = tmp_path / "saved", tmp_path / "stderr.txt"
    env = {**os.environ, "CWM_SAVED_ROOT": str(saved)}
    cmd = [sys.executable, str(REPO / "train_world_model.py"), "--live", "alternate", "--seed", "1",
           "--iterations", "100000", "--threads", "2", "--set", *TINY_SET]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 300
        while "prediction error 0." not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # until a few iterations have run
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop_process(proc)
    assert proc.returncode == 130, out + log.read_text()[-2000:]
    assert "(stopped by Ctrl-C)" in out
    path = saved / "checkpoints" / "toroidal_dot" / "autoencoder.pth"
    info = AutoencoderConcatPredictorWorldModel(None, device="cpu", config=TINY).load_checkpoint(path)
    assert 0 < info["iteration"] < 100000 and f"iteration {info['iteration']})" in out


def test_set_overrides_take_the_fields_type_and_name_what_is_wrong():
    cfg = config.with_overrides(TINY, ["embed_dim=16", "betas=[0.8, 0.9]", "decoder_mode=self",
                                       "foreground_weight_final=2.5", "learning_rate=1", "torus_roll=false"])
    assert (cfg.embed_dim, cfg.betas, cfg.decoder_mode) == (16, (0.8, 0.9), "self")
    assert (cfg.foreground_weight_final, cfg.learning_rate, cfg.torus_roll) == (2.5, 1.0, False)
    for item, says in [("embed_dim=3.5", "embed_dim must be int like 32, got 3.5"),
                       ("torus_roll=1", "torus_roll must be bool like true, got 1"),
                       ("embed_dim=true", "embed_dim must be int like 32, got true"),
                       ("no_such_field=1", "'no_such_field=1' is not FIELD=VALUE"), ("embed_dim", "is not FIELD=VALUE")]:
        with pytest.raises(ValueError, match=says):
            config.with_overrides(TINY, [item])


def test_the_app_reads_its_tensorboard_folder_from_the_environment_and_is_off_without_it():
    assert config.AppConfig.from_env({}).tensorboard_dir is None
    assert config.AppConfig.from_env({"CWM_TENSORBOARD_DIR": "runs"}).tensorboard_dir == "runs"
