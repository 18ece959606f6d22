"""One tab's run lifecycle: its session, its world model, its runs, its checkpoint saves.

``RunController`` sits above the world model and the analysis: it creates the model (from the
shared checkpoint when that fits), replays the loaded session from a chosen frame, runs and stops
the loop (in the caller's thread, or in a worker thread that a page samples: ``stream``), finishes every run (atomic checkpoint save, decoder attention
captured once), keeps the metric and picture history, answers analysis questions with
``world_model_analysis`` and parks an idle model when its ``ModelPool`` asks.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator

import numpy as np
import torch

import config
from autoencoder_concat_predictor_world_model import (
    AttentionCapture,
    AutoencoderConcatPredictorWorldModel,
    ReplayRobot,
)
from atomic_files import max_saved_name_bytes
from checkpoints import CheckpointError, FileIdentity, RefusedFiles
from config import ADOPTED_FROM_CHECKPOINT, LOGGER_NAME, AppConfig, AutoencoderConcatPredictorWorldModelConfig
from model_pool import ModelPool, return_freed_memory
from private_files import create_private_file
from run_history import RunSnapshots
from session_explorer_lib import SessionError, check_name
from validation import whole_number
from world_model_analysis import (
    Comparison,
    Play,
    compare_models,
    counterfactual,
    evaluate_session,
    play_actions,
    play_steps,
    rollout,
    single_canvas_steps,
    start_play,
    training_canvas,
)

LOG = logging.getLogger(f"{LOGGER_NAME}.engine")  # a child of the app's logger: its level applies

# how messages name the settings a model takes on from its checkpoint (``config.ADOPTED_FROM_CHECKPOINT``)
ADOPTED_WORDS = MappingProxyType({"decoder_position": "decoder position code", "decoder_mode": "decoder mode"})


@dataclass(frozen=True)
class CheckpointOrigin:
    """Where a controller's model came from: ``kind`` is "fresh" (no file), "loaded", "refused",
    "reset" (a fresh model asked for by the user, whatever the files hold) or "lost" (the tab's parked
    model could not be reloaded: a fresh model took its place, ``reason`` says why in words)."""

    kind: str
    path: Path
    step: int = 0
    iteration: int = 0
    reason: str = ""  # why the file was refused
    adopted: tuple[tuple[str, str], ...] = ()  # (field, value) the loaded model took from the file, where the tab's settings differ

    @property
    def note(self) -> str:
        """" (decoder position code: canvas, from the file)" when the model took settings from the file
        that differ from the tab's; "" otherwise. For the messages that say what was loaded."""
        return adopted_note(self.adopted)


def adopted_note(adopted: tuple[tuple[str, str], ...]) -> str:
    """A short clause naming the settings a model took from its checkpoint (see ``CheckpointOrigin.adopted``)."""
    if not adopted:
        return ""
    return " (" + "; ".join(f"{ADOPTED_WORDS.get(k, k)}: {v}" for k, v in adopted) + ", from the file)"


@dataclass(frozen=True)
class CheckpointSave:
    """The outcome of the save at the end of a run."""

    ok: bool
    path: Path
    step: int
    iteration: int
    set_aside: str | None = None  # the name the refused file was kept under, when this save moved it
    reason: str = ""  # why the save failed, or why a refused file was not set aside


@dataclass(frozen=True)
class RunStatus:
    """A short status for the page.

    state: "idle" (no run yet), "running", "stopped" (by Stop or a problem) or "done".
    done / total: iterations of the latest run; model_step / model_iteration: the model's counters
    (None before a model exists); last: the latest iteration's metrics ({} before any).
    """

    state: str
    done: int
    total: int
    problem: str
    model_step: int | None
    model_iteration: int | None
    last: dict


class RunBusyError(RuntimeError):
    """A run is already going in this controller."""


# torch keeps one count for the whole process, which a thread takes at its first parallel operation,
# besides the count of each thread; ``use_threads`` changes the process's count for a moment only, under this
_TORCH_COUNT_LOCK = threading.Lock()


def reproducible_mkl(mode: str) -> None:
    """Ask MKL for sums that do not depend on the thread computing them: ``$MKL_CBWR`` = ``mode``
    (``AppConfig.mkl_cbwr``), unless the environment already names a mode ("": MKL's default).

    MKL's sgemm (inside the attention backward, among others) otherwise takes a path that depends on
    the alignment of the calling thread's memory, so the same iteration computed by a run's worker
    thread and by the main thread differed in the last bits and the runs parted after ~27 iterations
    (docs/SPEED.md, "An app run and a bare run of the same cell are not bit-identical"). MKL reads the
    variable at its first call: call this at start, before any tensor work.
    """
    if mode:
        os.environ.setdefault("MKL_CBWR", mode)


def use_threads(threads: int | None) -> None:
    """Give the calling thread ``threads`` torch CPU threads and leave every other thread's as it is
    (None: change nothing).

    With torch's OpenMP backend each thread computes with a count of its own and keeps a team of
    OpenMP workers for as long as it lives. When the process holds more such workers than the machine
    has cores, libgomp stops letting idle ones spin and every parallel region then waits for a
    sleeping worker to wake: an iteration cost 1.3x its time on 2 cores while another thread of the
    process kept a team (docs/SPEED.md, "One team of torch threads"). So the server's own threads
    compute with one thread, and only a run's worker, or a batched analysis's thread, with more.

    ``torch.set_num_threads`` also sets the count that threads not yet computing will take, so that one
    is put back (by a helper thread, whose own count ends with it) before this returns.
    """
    if not threads:
        return
    with _TORCH_COUNT_LOCK:
        inherited = torch.get_num_threads()  # this thread takes the process's count now, if not yet
        torch.set_num_threads(threads)
        restore = threading.Thread(target=torch.set_num_threads, args=(inherited,), name="torch-count")
        restore.start()
        restore.join()


def in_compute_thread(threads: int | None, fn: Callable, *args):
    """``fn(*args)`` in a new thread that computes with ``threads`` torch threads (see ``use_threads``);
    returns its result or raises its error here. The thread, and its team of workers, end with the call.
    None: ``fn(*args)`` in the calling thread."""
    if not threads:
        return fn(*args)
    result: list = []
    failed: list[BaseException] = []

    context = contextvars.copy_context()  # what the caller's context holds (Gradio's progress tracker) goes along

    def work() -> None:
        use_threads(threads)
        try:
            result.append(context.run(fn, *args))
        except BaseException as e:  # raised in the caller's thread
            failed.append(e)

    worker = threading.Thread(target=work, name="compute", daemon=True)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return result[0]


class RunController:
    """One tab's run lifecycle, for a page or a script: its session, its world model, its runs.

    - the model is created at the first run, from the checkpoint file when that is compatible; a file
      it refuses is set aside (never overwritten) before this model's first save; a model loaded from a
      file takes on the file's decoder position code and mode (``config.ADOPTED_FROM_CHECKPOINT``) and
      keeps them (``model_config``) until the tab resets it, which gives a model of ``config`` again;
    - ``run(total)`` replays the session from ``start_frame`` and yields each iteration's metrics
      (``run_live`` drives a live robot instead); a Stop (``stop()``, the stop event) ends it after
      the current iteration; every run ends with ``finish`` (atomic checkpoint save, decoder
      attention captured once); ``iteration_hook``, when set, sees every iteration's metrics;
    - ``park()`` saves an idle model to a private temporary file and frees it; any later call that
      needs the model reloads it (``ModelPool`` decides when).

    Args:
        checkpoint_path: the shared checkpoint every run saves to (default ``config.CHECKPOINT_PATH``,
            read when the controller is made); named checkpoints live beside it.
        refused_files: the refused checkpoint files of that folder, shared by its tabs (default: this
            controller's own).
        config: the world model's settings (a model loaded from a checkpoint may differ in the fields
            ``config.ADOPTED_FROM_CHECKPOINT`` names: see ``model_config``).
        device: torch device (default: CUDA when present).
        pool: the ``ModelPool`` that parks idle models (None: models stay in memory).
        run_lock_wait_s: how long ``run`` waits for a previous run to wind down.
        stop_grace_s: a Stop that finds nothing running also stops a run that starts this soon after.
        history_snapshots, history_bytes: bounds of the run history's pictures (``RunSnapshots``).
    """

    def __init__(self, checkpoint_path: str | os.PathLike | None = None,
                 config: AutoencoderConcatPredictorWorldModelConfig | None = None,
                 refused_files: RefusedFiles | None = None,
                 device: torch.device | str | None = None, pool: ModelPool | None = None,
                 run_lock_wait_s: float = AppConfig.run_lock_wait_s, stop_grace_s: float = AppConfig.stop_grace_s,
                 history_snapshots: int = AppConfig.history_snapshots, history_bytes: int = AppConfig.history_bytes,
                 threads: int | None = None):
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else _default_checkpoint_path()
        self.refused_files = refused_files if refused_files is not None else RefusedFiles()
        self.config = config or AutoencoderConcatPredictorWorldModelConfig()
        self.device = device
        # torch CPU threads of this controller's runs and batched analyses, which each compute in a thread of
        # their own (see ``in_compute_thread``); None: that thread's default (its creator's count)
        self.threads = threads
        self.run_lock_wait_s, self.stop_grace_s = run_lock_wait_s, stop_grace_s
        self.session = None  # the loaded session (session_explorer_lib.Session or alike)
        self.start_frame = 0  # the frame the next run starts its replay from
        self.history: list[dict] = []  # one metrics dict per iteration, across runs of this model (plus
        # "replay_looped": True on an iteration whose action ended the recording, so the next saw its frame 0)
        self.snapshots = RunSnapshots(history_snapshots, history_bytes)  # what the page showed, bounded
        self.origin: CheckpointOrigin | None = None  # set when the model is created
        self.saved: CheckpointSave | None = None  # the latest save
        self.attention_at: tuple[int, int] | None = None  # (iteration, step) the attention was captured at
        # called as hook(controller, metrics) in the run's thread after each loop iteration is recorded
        # (a TensorBoard log, say); None costs the run nothing
        self.iteration_hook: Callable[[RunController, dict], None] | None = None
        self.stop_event = threading.Event()
        self._stop_requested_at = -math.inf  # monotonic time of the latest stop request
        self._run_lock = threading.Lock()  # one run at a time (released by whichever thread ends it)
        self._hand_over = False  # a stream is running: the run's end leaves it the run lock (see ``stream``)
        self._handed_over = False  # the stream holds the run lock of a run that has ended
        self._lock = threading.RLock()  # guards the model reference, parking and counters
        self._runs_entered = 0  # runs that took the run lock (Stop watches this for a run still starting)
        self._runs_started = 0
        self._in_run = False  # from taking the run lock to releasing it
        self._running = False
        self._pending_finish = False  # a run ended without its finish (closed by a cancel)
        self._start_moved = False  # the start frame was set during the current run: keep it after
        self._replaying = False  # the latest run replayed the session (not single-canvas training)
        self._done = self._total = 0
        self._problem = ""
        self._stopped = False
        self._wm: AutoencoderConcatPredictorWorldModel | None = None
        self._attention: AttentionCapture | None = None
        self._refused: FileIdentity | None = None  # the checkpoint file this model refused
        self._unsaved = True  # trained since it was loaded or last saved (a run of 0 iterations saves nothing)
        self._released = False  # the tab is gone: nothing is created, reloaded or saved any more
        self._park_file: Path | None = None
        self._park_cleanup: weakref.finalize | None = None  # deletes the parked file if this controller is dropped
        self._parked_counters: tuple[int, int] | None = None  # (step, iteration) of a parked model
        self._parked_robot: tuple | None = None  # (session, index, episode_boundary) of a parked replay
        self._parked_config: AutoencoderConcatPredictorWorldModelConfig | None = None  # the parked model's settings
        self._shared_seen: FileIdentity | None = None  # the shared checkpoint as this tab last loaded or saved it
        self._attention_canvas: np.ndarray | None = None  # to recapture attention after a reload
        self._play: Play | None = None  # the latest open-loop play (frames in memory, at most a few MB)
        self.last_used = time.monotonic()
        self._pool = pool
        if pool is not None:
            pool.register(self)

    # -- what the page reads ---------------------------------------------------------

    @property
    def has_model(self) -> bool:
        """Whether this controller has a model (in memory or parked)."""
        return self._wm is not None or self._park_file is not None

    @property
    def is_resident(self) -> bool:
        """Whether this controller's model is in memory (not parked, not yet made)."""
        return self._wm is not None

    @property
    def is_parked(self) -> bool:
        return self._wm is None and self._park_file is not None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def streamed_run_ended(self) -> bool:
        """A streamed run has ended (saved, attention captured); its stream keeps the run lock until
        the consumer has read that end (see ``stream``)."""
        return self._handed_over

    def status(self) -> RunStatus:
        """The latest run's progress and the model's counters (never reloads a parked model)."""
        with self._lock:
            if self._running:
                state = "running"
            elif self._runs_started == 0:
                state = "idle"
            else:
                state = "stopped" if self._stopped or self._problem else "done"
            counters = self._counters()
            return RunStatus(state=state, done=self._done, total=self._total, problem=self._problem,
                             model_step=None if counters is None else counters[0],
                             model_iteration=None if counters is None else counters[1],
                             last=self.history[-1] if self.history else {})

    def _counters(self) -> tuple[int, int] | None:
        if self._wm is not None:
            return self._wm.step, self._wm.iteration
        return self._parked_counters

    def training_views(self) -> dict[str, np.ndarray] | None:
        """The four training views of the latest training step (see the world model), or None."""
        wm = self._model_if_any()
        return None if wm is None else wm.get_training_views()

    def prediction_views(self, canvas: bool = True) -> dict | None:
        """The prediction views of the latest iteration (see the world model; ``canvas`` False leaves
        the prediction canvas out), or None."""
        wm = self._model_if_any()
        return None if wm is None else wm.get_prediction_views(canvas=canvas)

    @property
    def attention(self) -> AttentionCapture | None:
        """Decoder attention captured at the end of the latest run (recaptured after a reload)."""
        with self._lock:
            if self._attention is None and self._attention_canvas is not None:  # dropped when parked
                self._attention = self._resident().capture_decoder_attention(self._attention_canvas)
            return self._attention

    def world_model(self) -> AutoencoderConcatPredictorWorldModel | None:
        """The model itself (reloaded when parked), for analysis code and tests; None before the first run."""
        return self._model_if_any()

    @property
    def model_config(self) -> AutoencoderConcatPredictorWorldModelConfig:
        """The settings of this tab's model (never reloads a parked one): ``config``, except for the decoder
        code a model loaded from a checkpoint took from its file; ``config`` before there is a model."""
        with self._lock:
            if self._wm is not None:
                return self._wm.config
            return self._parked_config or self.config

    def _adopted(self, wm: AutoencoderConcatPredictorWorldModel) -> tuple[tuple[str, str], ...]:
        """The settings ``wm`` took from its checkpoint where they differ from this tab's ``config``."""
        return tuple((name, getattr(wm.config, name)) for name in ADOPTED_FROM_CHECKPOINT
                     if getattr(wm.config, name) != getattr(self.config, name))

    def _need_session(self):
        if self.session is None:
            raise ValueError("no session is loaded")
        return self.session

    # -- questions that never train the model (world_model_analysis) ---------------------

    def analysis_model(self) -> AutoencoderConcatPredictorWorldModel:
        """The model to question: this tab's, created from the checkpoint (as at a first Run) when
        it has none yet. Analyses may run between a run's iterations; they never change the model."""
        with self._lock:
            return self._resident()

    def counterfactual(self, frame_index: int):
        """Frame t+1 predicted under every action (``world_model_analysis.counterfactual``)."""
        session = self._need_session()
        return counterfactual(self.analysis_model(), session, frame_index)

    def rollout(self, frame_index: int, k: int, max_k: int = 20):
        """k open-loop steps from frame t with the recorded actions (``world_model_analysis.rollout``)."""
        session = self._need_session()
        return rollout(self.analysis_model(), session, frame_index, k, max_k)

    def evaluate(self, session, batch_size: int = 32):
        """Every transition of ``session`` (any session, not only the loaded one), batched."""
        return in_compute_thread(self.threads, evaluate_session, self.analysis_model(), session, batch_size)

    # -- play and compare (never train the model) -------------------------------------

    def play_start(self, frame_index: int) -> Play:
        """Begin a new open-loop play from frame t of the loaded session (``world_model_analysis.start_play``);
        it replaces the one before. Needs no model yet."""
        self._play = start_play(self._need_session(), frame_index, self.config)
        return self._play

    def current_play(self) -> Play | None:
        """The play going on the loaded session, or None (none begun, or another session loaded since)."""
        play = self._play
        return play if play is not None and play.session is self.session else None

    def play(self, actions: str, max_steps: int) -> Play:
        """Continue the play with ``actions`` (a string of 0/1), each imagined by this tab's model fed
        its own predictions, beside the simulated world. Waits ``run_lock_wait_s`` for a model a
        run is using (between two iterations it is free), then refuses.

        Raises:
            ValueError: no play on the loaded session, bad actions, or more than ``max_steps`` in the play
                (nothing changes). RunBusyError: the model stayed busy.
        """
        play = self.current_play()
        if play is None:
            raise ValueError("no play has begun on the loaded session: start one from frame t first")
        play_actions(actions, play, max_steps)  # a bad request is refused at once, busy model or not
        wm = self.analysis_model()
        if not wm.lock.acquire(timeout=self.run_lock_wait_s):
            raise RunBusyError("the model is busy (a run is using it)")
        try:  # the lock also keeps two presses of this tab from stepping the play at once
            return play_steps(wm, play, play_actions(actions, play, max_steps))
        finally:
            wm.lock.release()

    def compare(self, name_a: str | None, name_b: str | None, session, batch_size: int = 32, top: int = 5,
                progress: Callable[[int, int], None] | None = None) -> Comparison:
        """Two models on every transition of ``session`` (``world_model_analysis.compare_models``): a named
        checkpoint each, or None for a copy of this tab's model as it is now (a run may go on training
        it meanwhile). Neither is this tab's model afterwards; nothing is saved. A model whose decoder
        code differs from this tab's settings (taken from its file) has that said after its name.

        Raises:
            ValueError: a bad name (the ``named_checkpoint_path`` rule). CheckpointError: no such
                checkpoint, or a file refused (damaged, another architecture).
        """
        paths = [None if name is None else self._existing_checkpoint(name) for name in (name_a, name_b)]
        models = [self._model_to_compare(path) for path in paths]
        names = tuple(("this tab's model" if name is None else name) + adopted_note(self._adopted(wm))
                      for name, wm in zip((name_a, name_b), models))
        return in_compute_thread(self.threads, compare_models, *models, session, names, batch_size, top, progress)

    def _existing_checkpoint(self, name: str) -> Path:
        path = self.named_checkpoint_path(name)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint named {name}")
        return path

    def _model_to_compare(self, path: Path | None) -> AutoencoderConcatPredictorWorldModel:
        """A model of its own: loaded from ``path`` (with the file's decoder code), or (None) a copy of
        this tab's model."""
        if path is not None:
            wm = AutoencoderConcatPredictorWorldModel(None, device=self.device, config=self.config)
            wm.load_checkpoint(path)
            return wm
        source = self.analysis_model()
        with source.lock:  # its settings and state as one (a load may replace both)
            cfg, state = source.config, source.training_state()
        wm = AutoencoderConcatPredictorWorldModel(None, device=self.device, config=cfg)
        wm.load_training_state(state)
        return wm

    # -- named checkpoints, reset ----------------------------------------------

    def named_checkpoint_path(self, name: str) -> Path:
        """``<checkpoint folder>/<name>.pth`` for a name that follows the session-name rule and is
        not the shared checkpoint's; ValueError naming the problem otherwise."""
        folder = self.checkpoint_path.parent
        longest = max_saved_name_bytes(folder) - len(".pth")  # the temp file it is written through must fit too
        size = len(name.encode("utf-8", "surrogatepass")) if isinstance(name, str) else 0
        if size > longest:
            raise ValueError(f"Invalid checkpoint name {name[:40]!r}...: it is {size} bytes long, and a checkpoint "
                             f"name may be at most {longest} bytes (the file and the temporary copy it is written "
                             "through must fit the file system's limit on name length)")
        check_name(name, "checkpoint")
        if name == self.checkpoint_path.stem:
            raise ValueError(f"Invalid checkpoint name {name!r}: it is the shared checkpoint every run saves to")
        check_name(f"{name}.pth", "checkpoint", folder)  # a link planted under that name must not lead out
        return folder / f"{name}.pth"

    def save_named(self, name: str) -> CheckpointSave:
        """Save this tab's model as ``<name>.pth`` beside the shared checkpoint, never replacing a file.

        Raises:
            ValueError: a bad name, or no model yet. CheckpointError: the name is taken or the write failed.
        """
        path = self.named_checkpoint_path(name)
        wm = self._model_if_any()
        if wm is None:
            raise ValueError("there is no model to save yet: run the world model first")
        session = getattr(self.session, "name", None)
        wm.save_checkpoint(path, extra={"session": session}, replace=False)
        return CheckpointSave(True, path, wm.step, wm.iteration)

    def load_named(self, name: str) -> CheckpointOrigin:
        """Load ``<name>.pth`` into this tab's model (not during a run), taking on the file's decoder
        code (``origin.adopted`` names it where it differs from ``config``). Another architecture or a
        damaged file raises ``CheckpointError`` with the model untouched; after a load the metric
        history and run history (another model's) are cleared and the views start afresh.

        Raises:
            ValueError: a bad name. CheckpointError: no such file, or a file refused. RunBusyError.
        """
        path = self._existing_checkpoint(name)
        with self._not_running():
            with self._lock:
                wm = self._resident()
                info = wm.load_checkpoint(path)
                wm.forget_views()
                self.origin = CheckpointOrigin("loaded", path, info["step"], info["iteration"],
                                               adopted=self._adopted(wm))
                self._forget_history()
                return self.origin

    def reset_model(self) -> None:
        """A fresh, untrained model of this tab's ``config`` (not during a run; a decoder code taken
        from a loaded file is dropped, as a new tab's model would be): metric and run history cleared,
        nothing deleted on disk; its first run saves to the shared checkpoint as usual."""
        with self._not_running():
            with self._lock:
                self._delete_park_file()
                robot = ReplayRobot(self.session, start_index=self.start_frame) if self.session is not None else None
                self._wm = AutoencoderConcatPredictorWorldModel(robot, device=self.device, config=self.config)
                self.origin = CheckpointOrigin("reset", self.checkpoint_path)
                self.saved, self._unsaved, self._runs_started, self._problem = None, True, 0, ""
                self._forget_history()
        self.touch()

    def shared_checkpoint_replaced(self) -> bool:
        """Whether the shared checkpoint changed since this tab last loaded or saved it (another tab
        saved over it; this tab's next save will replace that)."""
        seen = self._shared_seen
        return seen is not None and FileIdentity.of(self.checkpoint_path) != seen

    def _forget_history(self) -> None:
        self.history.clear()
        self.snapshots.clear()
        self._attention = self._attention_canvas = self.attention_at = None

    @contextlib.contextmanager
    def _not_running(self):
        if not self._run_lock.acquire(timeout=self.run_lock_wait_s):
            raise RunBusyError("a run is in progress")
        try:
            self._finish_if_pending()
            yield
        finally:
            self._run_lock.release()

    def _model_if_any(self) -> AutoencoderConcatPredictorWorldModel | None:
        with self._lock:
            return self._resident() if self.has_model else None

    # -- session and start frame ------------------------------------------------------

    def load_session(self, session) -> None:
        """Replay ``session`` from its first frame at the next run; the model is kept."""
        with self._lock:
            self.session = session
            self.start_frame = 0
            self._start_moved = True

    def set_start_frame(self, index: int) -> None:
        """The next run starts its replay at frame ``index`` (set during a run, it outlives the run)."""
        if self.session is None:
            raise ValueError("no session is loaded")
        index = whole_number(index, "Frame index", 0, len(self.session.observations) - 1)
        with self._lock:
            self.start_frame = index
            self._start_moved = True

    # -- runs ---------------------------------------------------------------------------

    def run(self, total: int) -> Iterator[dict | None]:
        """Run ``total`` iterations on the loaded session from ``start_frame``.

        Yields None once the model is ready (a page can show the start), then each iteration's
        metrics. Ends after ``finish`` (checkpoint saved, attention captured). A frame that cannot
        be read ends the run early (``status().problem`` says which); the iterations done are kept.

        Raises (at the first ``next``):
            ValueError: no session is loaded.
            RunBusyError: another run of this controller did not end within ``run_lock_wait_s``.
        """
        return self._drive(total, lambda wm: wm.run_iter(total, self.stop_event), replay=True)

    def run_live(self, total: int, robot, action_selector: Callable) -> Iterator[dict | None]:
        """Run ``total`` iterations on a live robot (a ``ToroidalDotRobot``, say) that ``action_selector``
        drives; no session is needed. The same run as ``run`` otherwise (history, Stop, finish); the
        model continues the robot where the last run left it when it is the same robot.

        Raises (at the first ``next``): RunBusyError as ``run`` does.
        """
        def work(wm: AutoencoderConcatPredictorWorldModel) -> Iterator[dict]:
            if wm.robot is not robot:
                wm.attach_robot(robot, action_selector)
            return wm.run_iter(total, self.stop_event)

        return self._drive(total, work, replay=False, loop=True)

    def train_single_canvas(self, frame_index: int, steps: int) -> Iterator[dict | None]:
        """``steps`` optimizer steps on the training canvas ending in frame ``frame_index`` alone (the
        "can it fit one example" check). A run like ``run`` (one at a time, Stop ends it, finish saves
        the checkpoint), except that it yields per-step dicts (see ``single_canvas_steps``), keeps
        them out of ``history`` (that is per loop iteration) and leaves the replay where it was.

        Raises:
            ValueError: no session, or a frame without the history a canvas needs (at once).
        """
        canvas = training_canvas(self._need_session(), frame_index, self.config)
        return self._drive(steps, lambda wm: single_canvas_steps(wm, canvas, steps, self.stop_event), replay=False)

    def stream(self, steps: Iterator[dict | None], every_s: float) -> Iterator[dict | None]:
        """Drive a run (``run(total)`` or ``train_single_canvas(...)``) in a worker thread at its own
        pace and sample it: yields None once the model is ready, then the latest step's metrics at
        most every ``every_s`` seconds (the steps between are skipped, never waited for), then the
        last step's once the run has finished (saved, attention captured).

        A page that is slow to draw, encode or send therefore never slows the training; it reads the
        views through the model's lock, which a training iteration holds only while it runs. The
        run lock is kept from the run's end until the consumer asks for more after the last item,
        so what it shows of that end is not overtaken by the tab's next run. Closing this iterator
        (a client that cancels or goes away) stops the run after its current iteration; the worker
        still finishes it.

        Raises (at the first ``next``): what the run raises before its first step (no session, a
        run already in progress); after that, an error of the worker is raised here at the end.
        """
        first = next(steps)  # takes the run lock and makes the model resident, in the caller's thread
        with self._lock:
            self._hand_over, self._handed_over = True, False
        latest: list = [first]
        failed: list[BaseException] = []
        done = threading.Event()

        def drain() -> None:
            use_threads(self.threads)
            try:
                for item in steps:
                    latest[0] = item
            except BaseException as e:  # handed to the consumer, which raises it
                failed.append(e)
            finally:
                done.set()

        worker = threading.Thread(target=drain, name="run-worker", daemon=True)
        worker.start()
        try:
            yield first
            while not done.wait(every_s):
                yield latest[0]
            worker.join()
            if failed:
                raise failed[0]
            yield latest[0]
        finally:
            if not done.is_set():
                self.stop_event.set()  # the consumer went away: end after the current iteration
            with self._lock:
                self._hand_over = False  # a worker still running releases the run lock itself
                if self._handed_over:
                    self._handed_over = False
                    self._run_lock.release()

    def _drive(self, total: int, work: Callable, replay: bool, loop: bool | None = None) -> Iterator[dict | None]:
        """The body of every run: ``work(wm)`` yields the steps; ``replay``: it replays the session;
        ``loop`` (default: ``replay``): its steps are loop iterations, kept in the history."""
        loop = replay if loop is None else loop
        if replay:
            self._need_session()
        if not self._run_lock.acquire(timeout=self.run_lock_wait_s):
            raise RunBusyError("a run is already in progress")
        # a Stop older than the grace is stale; a newer one (this run was still queued) or one sent
        # while the model is being built below stops this run
        if time.monotonic() - self._stop_requested_at > self.stop_grace_s:
            self.stop_event.clear()
        self._runs_entered += 1
        self._in_run = True
        try:
            self._finish_if_pending()
            with self._lock:
                wm = self._resident()
                if replay:
                    self._attach_replay(wm)
                    self._start_moved = False
                self._replaying = replay
                self._runs_started += 1
                self._running, self._pending_finish = True, True
                self._done, self._total, self._problem, self._stopped = 0, int(total), "", False
            yield None
            try:
                for metrics in work(wm):
                    if loop:
                        if replay and getattr(wm.robot, "episode_boundary", False):  # this action ended the recording
                            metrics["replay_looped"] = True  # the next iteration replays its frame 0
                        self.history.append(metrics)
                        if self.snapshots.wants(metrics["iteration"]):
                            self.snapshots.add(metrics, wm.get_prediction_views(canvas=False))
                        if self.iteration_hook is not None:
                            self.iteration_hook(self, metrics)
                    self._done += 1
                    self._unsaved = True
                    yield metrics
            except SessionError as e:
                # the engine reads the frame before it changes anything: the model is as it was after
                # the last complete iteration
                self._problem = f"cannot read the next frame of session {self.session.name}: {e}"
            self._stopped = self._done < self._total
            self._running = False
            self._finish(wm)
        finally:
            if self.stop_event.is_set():
                self._stop_requested_at = -math.inf  # this run took the stop: the next one is not stopped
            if self._pending_finish:
                self._stopped = True  # closed by a cancel: its finish comes later (stop, the next run, the pool)
            self._running = self._in_run = False
            with self._lock:
                if self._hand_over:  # a stream shows this run's end first, then releases the run lock
                    self._handed_over = True
                else:
                    self._run_lock.release()
        self.touch()

    def stop(self, wait_s: float = 30.0) -> str:
        """Stop the run after its current iteration and wait for it to end (and finish).

        Returns "stopped" when a run ended (or was cancelled and is now finished), "stopping" when it
        did not end within ``wait_s``, "idle" when no run was going or started within ``stop_grace_s``.
        """
        started = self._runs_entered
        was_running = self._in_run or self._pending_finish
        self._stop_requested_at = time.monotonic()
        self.stop_event.set()
        if not self._run_lock.acquire(timeout=wait_s):
            return "stopping"
        try:
            finished = self._finish_if_pending()
        finally:
            self._run_lock.release()
        if was_running or finished or self._runs_entered != started:
            self._stop_requested_at = -math.inf  # taken by the run it stopped
            return "stopped"
        deadline = time.monotonic() + self.stop_grace_s  # a Run sent just before this Stop may not have begun
        while time.monotonic() < deadline:
            if self._runs_entered != started:  # it honours the stop: wait for it to end
                if not self._run_lock.acquire(timeout=wait_s):
                    return "stopping"
                try:
                    self._finish_if_pending()
                finally:
                    self._run_lock.release()
                return "stopped"
            time.sleep(0.02)
        return "idle"

    def _finish_if_pending(self) -> bool:
        """Finish a run that a cancel closed (call with the run lock held)."""
        if not self._pending_finish:
            return False
        self._stopped = True
        with self._lock:
            self._finish(self._wm)
        return True

    def _finish(self, wm: AutoencoderConcatPredictorWorldModel | None) -> None:
        """Save the checkpoint (setting a refused file aside first) and capture decoder attention."""
        with self._lock:
            self._pending_finish = False
            if self._released or wm is None:
                return
            if self._unsaved:  # a run of 0 iterations must not overwrite a newer save of another tab
                self.saved = self._save(wm)
            self._attention = wm.capture_decoder_attention()
            self._attention_canvas = None if self._attention is None else self._attention.canvas
            self.attention_at = (wm.iteration, wm.step)
            robot = wm.robot
            if (self._replaying and not self._start_moved and isinstance(robot, ReplayRobot)
                    and robot.session is self.session):
                self.start_frame = robot.index  # the next run continues from here
        return_freed_memory(collect=False)  # the run's freed buffers go back to the system, once per run

    def _save(self, wm: AutoencoderConcatPredictorWorldModel) -> CheckpointSave:
        path = self.checkpoint_path
        refused_here, self._refused = self._refused is not None, None

        def save() -> None:
            wm.save_checkpoint(path, extra={"session": getattr(self.session, "name", None)})
            self._shared_seen = FileIdentity.of(path)  # before another tab may save over it

        ok, aside, note = self.refused_files.save_over(path, save, refused_here)
        if not ok:
            return CheckpointSave(False, path, wm.step, wm.iteration, aside, note)
        self._unsaved = False
        return CheckpointSave(True, path, wm.step, wm.iteration, aside, note)

    # -- the model ------------------------------------------------------------------

    def _resident(self) -> AutoencoderConcatPredictorWorldModel:
        """The model in memory: reloaded when parked, created at first use. Call under ``_lock``."""
        if self._released:
            raise RuntimeError("this controller was released (its tab is gone)")
        if self._wm is None:
            self._wm = self._unpark() if self._park_file is not None else self._create()
            self._delete_park_file()  # only now: has_model stays True
        self.touch()
        return self._wm

    def _create(self) -> AutoencoderConcatPredictorWorldModel:
        robot = ReplayRobot(self.session, start_index=self.start_frame) if self.session is not None else None
        wm = AutoencoderConcatPredictorWorldModel(robot, device=self.device, config=self.config)
        path = self.checkpoint_path
        identity = FileIdentity.of(path)
        if identity is None or not path.is_file():
            self.origin = CheckpointOrigin("fresh", path)
            return wm
        try:
            info = wm.load_checkpoint(path)
            self.origin = CheckpointOrigin("loaded", path, info["step"], info["iteration"], adopted=self._adopted(wm))
            self._unsaved = False
            self._shared_seen = identity
        except CheckpointError as e:
            self._refused = identity
            self.refused_files.refuse(identity)
            self.origin = CheckpointOrigin("refused", path, reason=str(e))
        return wm

    def _attach_replay(self, wm: AutoencoderConcatPredictorWorldModel) -> None:
        """Point the model at the session from ``start_frame``; continuing where the last run stopped
        keeps its history, any other start clears it (the frames would not follow each other)."""
        robot = wm.robot
        if isinstance(robot, ReplayRobot) and robot.session is self.session and robot.index == self.start_frame:
            return
        wm.attach_robot(ReplayRobot(self.session, start_index=self.start_frame))

    # -- parking -------------------------------------------------------------------

    def touch(self) -> None:
        """Mark this controller used now (the pool parks the least recently used first)."""
        self.last_used = time.monotonic()
        if self._pool is not None:
            self._pool.used(self)

    def park(self, folder: str | os.PathLike) -> bool:
        """Save the model to a private file in ``folder`` and free it; False when it is running,
        absent, busy or cannot be written. A run that a cancel closed is finished first. Any later
        call that needs the model reloads it. The file goes when the model is reloaded or reset,
        when the tab is released and when this controller is dropped."""
        if not self._run_lock.acquire(blocking=False):
            return False
        if not self._lock.acquire(blocking=False):  # never wait here: the caller may hold another controller's lock
            self._run_lock.release()
            return False
        path = Path(folder) / f"{id(self):x}-{os.getpid()}.park"
        try:
            if self._wm is None or self._released:
                return False
            self._finish_if_pending()
            wm = self._wm
            state = wm.training_state()
            robot = wm.robot
            replay = (robot.session, robot.index, robot.episode_boundary) if isinstance(robot, ReplayRobot) else None
            with create_private_file(path) as f:  # 0600, a new name only, never through a planted link
                torch.save(state, f)  # tensors and plain data, read back with weights_only: no code runs
        except Exception as e:  # a full disk or a vanished folder: the model simply stays in memory
            if not isinstance(e, FileExistsError):  # a file we did not make is left alone
                path.unlink(missing_ok=True)
            if self._pool is not None:
                self._pool.park_failed(self, e)  # logged once per cause, retried later
            else:
                LOG.warning("could not park an idle model: %s", getattr(e, "strerror", None) or type(e).__name__)
            return False
        else:
            self._park_file, self._parked_robot = path, replay
            self._park_cleanup = weakref.finalize(self, _remove_quietly, path)  # a controller dropped unreleased
            self._parked_counters, self._parked_config = (wm.step, wm.iteration), wm.config
            self._wm, self._attention = None, None
            drop_cache = getattr(self.session, "drop_cache", None)
            if drop_cache is not None:
                drop_cache()  # decoded frames come back from disk when needed
            LOG.info("parked an idle model (step %d, iteration %d) in %s", wm.step, wm.iteration, path.name)
            return True
        finally:
            self._lock.release()
            self._run_lock.release()

    def _delete_park_file(self) -> None:
        """Forget the parked file (if any), then delete it. Call under ``_lock``."""
        path, cleanup = self._park_file, self._park_cleanup
        self._park_file = self._parked_robot = self._parked_counters = self._park_cleanup = None
        self._parked_config = None
        if cleanup is not None:
            cleanup()  # deletes the file, once
        elif path is not None:
            _remove_quietly(path)

    def _unpark(self) -> AutoencoderConcatPredictorWorldModel:
        """The parked model, as it was. When the parked file cannot be read back (deleted, damaged,
        replaced) a fresh model takes its place: never the shared checkpoint, which may hold another
        tab's model. ``origin`` then says "lost" and why, ``status().problem`` says so in a sentence,
        and the run history (of the lost model) is cleared."""
        path, replay, parked_config = self._park_file, self._parked_robot, self._parked_config or self.config

        def robot() -> ReplayRobot | None:
            if replay is None:
                return None
            r = ReplayRobot(replay[0], start_index=replay[1])
            r.episode_boundary = replay[2]
            return r

        wm = AutoencoderConcatPredictorWorldModel(robot(), device=self.device, config=parked_config)  # its own decoder code
        try:
            wm.load_training_state(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            why = ("its parked copy (the file it was set aside in while the tab was idle) was deleted"
                   if isinstance(e, FileNotFoundError) else
                   "its parked copy (the file it was set aside in while the tab was idle) was damaged or replaced "
                   "and could not be read")
            LOG.warning("could not reload a parked model (%s); the tab gets a fresh model", type(e).__name__)
            wm = AutoencoderConcatPredictorWorldModel(robot(), device=self.device, config=self.config)  # untouched
            self.origin = CheckpointOrigin("lost", self.checkpoint_path, reason=why)
            self._problem = (f"this tab's model could not be reloaded: {why}. A fresh, untrained model took its "
                             "place (not the shared checkpoint, which may hold another tab's model) and this tab's "
                             "run history was lost")
            self.saved, self._unsaved, self._runs_started, self._refused = None, True, 0, None
            self._forget_history()
            return wm
        finally:
            self._delete_park_file()
        LOG.info("reloaded a parked model (step %d, iteration %d)", wm.step, wm.iteration)
        return wm

    def release(self) -> None:
        """The tab is gone: stop its run and, on a helper thread (this is called on Gradio's event
        loop), drop its model and delete its parked file. Nothing is created or saved afterwards."""
        self._released = True
        self._stop_requested_at = time.monotonic()
        self.stop_event.set()
        threading.Thread(target=self._drop, name="release-tab", daemon=True).start()

    def _drop(self) -> None:
        with self._lock:
            self._wm, self._attention, self._attention_canvas, self.session = None, None, None, None
            self._delete_park_file()
        if self._pool is not None:
            self._pool.forget(self)


def _remove_quietly(path: Path) -> None:
    """Delete a parked file; one already gone (or a vanished folder) is fine."""
    with contextlib.suppress(OSError):
        path.unlink()


def _default_checkpoint_path() -> Path:
    """The shared checkpoint's path as ``config`` holds it now (the app may point it elsewhere)."""
    return Path(config.CHECKPOINT_PATH)
