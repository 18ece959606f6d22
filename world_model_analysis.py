"""Ask a trained world model questions about a recorded session, without training it.

- ``counterfactual``: frame t+1 as the model predicts it under every action, beside the recorded one;
- ``rollout``: k steps imagined open-loop from frame t (each prediction fed back as history);
- ``evaluate_session``: every transition of a session in batches, summarised for stays and moves;
- ``single_canvas_steps``: the one exception, optimizer steps on one canvas (can it fit one example?).

Frame t of a session is predicted from the canvas ``[f(t-K+2)][a]...[f(t)][a(t)][blank]`` (K =
``canvas_history_size``, 3 by default: ``[f(t-1)][a(t-1)][f(t)][a(t)][blank]``) and compared with
the recorded frame t+1. A missing action (a torn recording) counts as stay, as in the replay.
Nothing here imports gradio or matplotlib; the app turns the results into pictures and tables.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from frame_metrics import WITHIN_PX, dot_errors, frame_mses
from models import build_canvas, build_prediction_canvases
from toroidal_dot_robot import ACTION_SPACE, STAY, parse_action
from validation import whole_number

ACTIONS = tuple(parse_action(a) for a in ACTION_SPACE)  # (0, 1): stay, move right


def _size(session) -> int:
    return len(session.observations)  # any session-like object (see ``ReplayRobot``)


def _name(session) -> str:
    return getattr(session, "name", "the session")


def prediction_frames(session, cfg) -> tuple[int, int]:
    """The frames t whose next frame a canvas can predict: (first, last) = (K-2, n-2)."""
    first, last = cfg.canvas_history_size - 2, _size(session) - 2
    if last < first:
        raise ValueError(f"session {_name(session)} has {_size(session)} frames; predicting a next frame needs "
                         f"at least {cfg.canvas_history_size}")
    return first, last


def _actions(session, indices: np.ndarray) -> np.ndarray:
    """The action recorded after each frame index (stay where none was), int64 of the same shape."""
    flat = [session.action_after(int(i)) for i in np.ravel(indices)]
    return np.array([STAY if a is None else a for a in flat], dtype=np.int64).reshape(np.shape(indices))


def _frames(session, indices: np.ndarray) -> np.ndarray:
    """uint8 (*indices.shape, H, W, 3); each distinct frame is read once."""
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = np.stack([session.frame(int(i)) for i in unique])  # (U, H, W, 3)
    return frames[inverse.reshape(np.shape(indices))]


def history_indices(t: np.ndarray, cfg) -> np.ndarray:
    """Frame indices of each canvas's history, oldest first: int64 (T, K-1)."""
    offsets = np.arange(-(cfg.canvas_history_size - 2), 1)  # (K-1,) e.g. [-1, 0]
    return np.asarray(t, dtype=np.int64)[:, None] + offsets[None, :]


# -----------------------------------------------------------------------------
# counterfactual actions


@dataclass
class Counterfactual:
    """Frame t+1 predicted under each action. predictions: uint8 (A, H, W, 3) in ``actions`` order;
    actual: uint8 (H, W, 3) the recorded frame t+1; mse, dot_error: float64 (A,) against it (dot
    error inf for a prediction without a dot, NaN when the actual frame has none)."""

    frame_index: int
    actions: tuple[int, ...]
    recorded_action: int
    predictions: np.ndarray
    actual: np.ndarray
    mse: np.ndarray
    dot_error: np.ndarray


def counterfactual(wm: AutoencoderConcatPredictorWorldModel, session, t: int) -> Counterfactual:
    """What the model predicts after frame ``t`` for every action of the action space (one batch)."""
    cfg = wm.config
    first, last = prediction_frames(session, cfg)
    t = whole_number(t, "Frame index", first, last)
    idx = history_indices(np.array([t]), cfg)[0]  # (K-1,)
    frames, actions = _frames(session, idx), _actions(session, idx)  # (K-1, H, W, 3), (K-1,)
    A = len(ACTIONS)
    batch_actions = np.tile(actions, (A, 1))  # (A, K-1)
    batch_actions[:, -1] = ACTIONS  # the last action is the one in question
    canvases = build_prediction_canvases(np.broadcast_to(frames, (A, *frames.shape)), batch_actions, cfg.separator_width)
    predictions = wm.predict_slots(canvases)  # (A, H, W, 3)
    actual = session.frame(t + 1)
    truth = np.broadcast_to(actual, predictions.shape)
    return Counterfactual(t, ACTIONS, int(actions[-1]), predictions, actual,
                          frame_mses(predictions, truth), dot_errors(predictions, truth))


# -----------------------------------------------------------------------------
# open-loop rollouts


@dataclass
class Rollout:
    """k frames imagined from frame t with the recorded actions. predicted, actual: uint8 (k, H, W, 3)
    for frames t+1..t+k; actions: int64 (k,) the action before each; mse, dot_error: float64 (k,);
    copy_mse: float64 (k,) of the baseline that repeats frame t (the last frame the model saw)."""

    frame_index: int
    actions: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    mse: np.ndarray
    dot_error: np.ndarray
    copy_mse: np.ndarray


def rollout(wm: AutoencoderConcatPredictorWorldModel, session, t: int, k: int, max_k: int = 20) -> Rollout:
    """Predict frames t+1..t+k open loop: each prediction becomes the newest history frame."""
    cfg = wm.config
    first, last = prediction_frames(session, cfg)
    t = whole_number(t, "Frame index", first, last)
    k = whole_number(k, f"Steps k (frame {t} + k must exist)", 1, min(max_k, _size(session) - 1 - t))
    idx = history_indices(np.array([t]), cfg)[0]  # (K-1,)
    history = list(_frames(session, idx))  # K-1 frames, oldest first
    actions = _actions(session, np.arange(idx[0], t + k))  # (K-2+k,) after each frame from the oldest
    predicted = []
    for step in range(k):  # sequential by nature: step j reads step j-1's output
        frames = np.stack(history[-(cfg.canvas_history_size - 1):])  # (K-1, H, W, 3)
        acts = actions[step : step + cfg.canvas_history_size - 1]  # (K-1,)
        canvas = build_prediction_canvases(frames[None], acts[None], cfg.separator_width)  # (1, H, Wc, 3)
        history.append(wm.predict_slots(canvas)[0])
        predicted.append(history[-1])
    predicted = np.stack(predicted)  # (k, H, W, 3)
    actual = _frames(session, np.arange(t + 1, t + k + 1))  # (k, H, W, 3)
    repeat = np.broadcast_to(history[cfg.canvas_history_size - 2], actual.shape)  # frame t, k times
    return Rollout(t, actions[-k:], predicted, actual, frame_mses(predicted, actual), dot_errors(predicted, actual),
                   frame_mses(repeat, actual))


# -----------------------------------------------------------------------------
# whole-session evaluation


@dataclass
class Evaluation:
    """The model on every transition t -> t+1 of a session (all float64/int64 (T,)): frame t, the
    action after it, MSE of the prediction and of repeating frame t, dot error (inf: no dot
    predicted; NaN: the actual frame has none). model_step/model_iteration: the model's counters."""

    session_name: str
    frame_index: np.ndarray
    action: np.ndarray
    mse: np.ndarray
    copy_mse: np.ndarray
    dot_error: np.ndarray
    model_step: int
    model_iteration: int
    seconds: float

    def summary(self, action: int | None = None) -> dict:
        """Means over all transitions, or those after ``action``: n, prediction_mse, copy_mse,
        mse_ratio (model / copy), dot_present (share of predictions with a dot, of frames that
        have one), within_3px (share of those within ``WITHIN_PX``), median_dot_error_px."""
        pick = np.ones(len(self.mse), bool) if action is None else self.action == action  # (T,)
        n = int(pick.sum())
        if n == 0:
            return {"n": 0}
        errors = self.dot_error[pick & ~np.isnan(self.dot_error)]  # frames that have a dot
        mse, copy = float(self.mse[pick].mean()), float(self.copy_mse[pick].mean())
        return {
            "n": n,
            "prediction_mse": mse,
            "copy_mse": copy,
            "mse_ratio": mse / copy if copy > 0 else float("nan"),
            "dot_present": float(np.isfinite(errors).mean()) if errors.size else float("nan"),
            "within_3px": float((errors <= WITHIN_PX).mean()) if errors.size else float("nan"),
            "median_dot_error_px": float(np.median(errors)) if errors.size else float("nan"),
        }


def evaluate_session(wm: AutoencoderConcatPredictorWorldModel, session, batch_size: int = 32) -> Evaluation:
    """Predict every next frame of ``session`` in batches (no gradient, no training, no state change)."""
    cfg = wm.config
    start = time.perf_counter()
    first, last = prediction_frames(session, cfg)
    t = np.arange(first, last + 1)  # (T,)
    acts = _actions(session, np.arange(_size(session) - 1))  # (n-1,)
    idx = history_indices(t, cfg)  # (T, K-1)
    mse, copy, dot = (np.empty(len(t)) for _ in range(3))
    for i in range(0, len(t), batch_size):  # chunks bound the memory: frames, canvases, activations
        rows = slice(i, i + batch_size)
        needed = np.concatenate([idx[rows], t[rows, None] + 1], axis=1)  # (b, K) history frames, then the next
        frames = _frames(session, needed)  # (b, K, H, W, 3)
        canvases = build_prediction_canvases(frames[:, :-1], acts[idx[rows]], cfg.separator_width)  # (b, H, Wc, 3)
        predicted = wm.predict_slots(canvases, batch_size)  # (b, H, W, 3)
        actual = frames[:, -1]  # (b, H, W, 3)
        mse[rows], dot[rows] = frame_mses(predicted, actual), dot_errors(predicted, actual)
        copy[rows] = frame_mses(frames[:, -2], actual)  # frame t repeated
    return Evaluation(_name(session), t, acts[t], mse, copy, dot, wm.step, wm.iteration, time.perf_counter() - start)


# -----------------------------------------------------------------------------
# single-canvas training


def training_canvas(session, t: int, cfg) -> np.ndarray:
    """The training canvas ending in frame ``t``: ``[f(t-K+1)][a]...[f(t)]``, uint8 (H, Wc, 3)."""
    first = cfg.canvas_history_size - 1
    if _size(session) <= first:
        raise ValueError(f"session {_name(session)} has {_size(session)} frames; a training canvas needs "
                         f"{cfg.canvas_history_size}")
    t = whole_number(t, "Frame index", first, _size(session) - 1)
    idx = np.arange(t - first, t + 1)  # (K,)
    frames, actions = _frames(session, idx), _actions(session, idx[:-1])
    items = [x for pair in zip(frames[:-1], actions) for x in pair] + [frames[-1]]  # f, a, f, a, f
    return build_canvas(items, cfg.frame_size, cfg.separator_width)


def single_canvas_steps(wm: AutoencoderConcatPredictorWorldModel, canvas: np.ndarray, steps: int,
                        stop_event: threading.Event | None = None) -> Iterator[dict]:
    """``steps`` optimizer steps on ``canvas`` alone (no replayed canvases), each yielding
    {'step', 'loss', 'mse', 'lr', 'grad_norm'}; ends early when ``stop_event`` is set."""
    for _ in range(int(steps)):
        if stop_event is not None and stop_event.is_set():
            return
        result = wm.train_step(canvas, replay=False)
        yield {"step": wm.step, **result}
