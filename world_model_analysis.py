"""Ask a trained world model questions about a recorded session, without training it.

- ``counterfactual``: frame t+1 as the model predicts it under every action, beside the recorded one;
- ``rollout``: k steps imagined open-loop from frame t (each prediction fed back as history);
- ``evaluate_session``: every transition of a session in batches, summarised for stays and moves;
- ``start_play`` / ``play_steps``: the user's own actions imagined open loop from frame t, beside the
  world's truth (the toroidal dot simulated from frame t's state with the same actions);
- ``compare_models``: two models on every transition of one session, and where they disagree most;
- ``single_canvas_steps``: the one exception, optimizer steps on one canvas (can it fit one example?).

Frame t of a session is predicted from the canvas ``[f(t-K+2)][a]...[f(t)][a(t)][blank]`` (K =
``canvas_history_size``, 3 by default: ``[f(t-1)][a(t-1)][f(t)][a(t)][blank]``) and compared with
the recorded frame t+1. A missing action (a torn recording) counts as stay, as in the replay.
Nothing here imports gradio or matplotlib; the app turns the results into pictures and tables.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from frame_metrics import WITHIN_PX, dot_centroid, dot_centroids, dot_errors, frame_mses
from models import build_canvas, build_prediction_canvases
from toroidal_dot_robot import ACTION_SPACE, STAY, ToroidalDotRobot, parse_action
from validation import is_int, whole_number

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


def _transition_canvases(session, t: np.ndarray, acts: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The prediction canvases of transitions t -> t+1 and the frames they use.

    Args:
        t: int64 (b,) frame indices; acts: int64 (n-1,) the action after every frame of the session.

    Returns:
        (uint8 (b, H, Wc, 3) canvases, uint8 (b, K, H, W, 3) their history frames, then frame t+1).
    """
    idx = history_indices(t, cfg)  # (b, K-1)
    frames = _frames(session, np.concatenate([idx, t[:, None] + 1], axis=1))  # (b, K, H, W, 3)
    return build_prediction_canvases(frames[:, :-1], acts[idx], cfg.separator_width), frames


def evaluate_models(models: list[AutoencoderConcatPredictorWorldModel], session, batch_size: int = 32,
                    progress: Callable[[int, int], None] | None = None) -> list[Evaluation]:
    """Predict every next frame of ``session`` with each model, in chunks of ``batch_size`` transitions
    (each chunk's frames are read once for all models); no gradient, no training, no state change.

    Args:
        models: models of the same canvas settings.
        progress: called as ``progress(transitions_done, transitions)`` after each chunk.
    """
    cfg = models[0].config
    start = time.perf_counter()
    first, last = prediction_frames(session, cfg)
    t = np.arange(first, last + 1)  # (T,)
    acts = _actions(session, np.arange(_size(session) - 1))  # (n-1,)
    mse, dot = np.empty((len(models), len(t))), np.empty((len(models), len(t)))  # (M, T) each
    copy = np.empty(len(t))  # (T,)
    for i in range(0, len(t), batch_size):  # chunks bound the memory: frames, canvases, activations
        rows = slice(i, i + batch_size)
        canvases, frames = _transition_canvases(session, t[rows], acts, cfg)  # (b, H, Wc, 3), (b, K, H, W, 3)
        actual = frames[:, -1]  # (b, H, W, 3)
        for m, wm in enumerate(models):
            predicted = wm.predict_slots(canvases, batch_size)  # (b, H, W, 3)
            mse[m, rows], dot[m, rows] = frame_mses(predicted, actual), dot_errors(predicted, actual)
        copy[rows] = frame_mses(frames[:, -2], actual)  # frame t repeated
        if progress is not None:
            progress(min(i + batch_size, len(t)), len(t))
    seconds = time.perf_counter() - start
    return [Evaluation(_name(session), t, acts[t], mse[m], copy, dot[m], wm.step, wm.iteration, seconds)
            for m, wm in enumerate(models)]


def evaluate_session(wm: AutoencoderConcatPredictorWorldModel, session, batch_size: int = 32) -> Evaluation:
    """Predict every next frame of ``session`` in batches (no gradient, no training, no state change)."""
    return evaluate_models([wm], session, batch_size)[0]


# -----------------------------------------------------------------------------
# play: the user's actions, imagined open loop, beside the world's truth


def world_at(session, t: int) -> ToroidalDotRobot:
    """The toroidal dot world in the state frame ``t`` shows: the dot where the frame has it (its
    centre on the torus, to the pixel), the radius and move distance from the session's metadata.

    Raises:
        ValueError: the metadata lacks the radius or move distance (older recordings), the frame is
            not square, or it shows no dot.
    """
    meta = getattr(session, "metadata", None) or {}
    missing = [key for key in ("dot_radius", "move_pixels") if not is_int(meta.get(key))]
    if missing:
        raise ValueError(f"the metadata of session {_name(session)} lacks {' and '.join(missing)} (an older "
                         "recording), so the world's truth cannot be simulated")
    frame = session.frame(t)
    H, W = frame.shape[:2]
    if H != W:
        raise ValueError(f"frame {t} is {W}x{H}: the toroidal dot world is square")
    centre = dot_centroid(frame)
    if centre is None:
        raise ValueError(f"frame {t} of session {_name(session)} shows no dot, so the world's state cannot be read from it")
    x, y = (round(c) % W for c in centre)
    return ToroidalDotRobot(W, meta["dot_radius"], meta["move_pixels"], start=(x, y))


def simulate(world: ToroidalDotRobot, actions) -> np.ndarray:
    """The frames the world shows after each action (the robot's own logic), uint8 (k, H, W, 3)."""
    frames = []
    for action in actions:  # the world steps one action at a time
        world.execute_action(int(action))
        frames.append(world.get_observation())
    return np.stack(frames)


def true_frames(session, t: int, actions) -> np.ndarray:
    """Frames t+1..t+k of the world simulated from frame ``t``'s state under ``actions``: uint8 (k, H, W, 3)."""
    return simulate(world_at(session, t), actions)


def play_frames(session, cfg) -> tuple[int, int]:
    """The frames a play may start from: (first, last) = (K-1, n-1)."""
    return cfg.canvas_history_size - 1, _size(session) - 1


@dataclass
class Play:
    """An open-loop play from frame t of a session with the user's actions.

    history: the K-1 newest frames the model sees next (recorded at first, then its own predictions),
    history_actions: the K-2 actions after all but the newest of them; world: the simulated truth;
    start, start_truth: uint8 (H, W, 3) recorded and simulated frame t. Per step (the lists grow by
    one per action): actions, imagined and truth (uint8 (H, W, 3)), mse and dot_error (inf: no dot
    imagined).
    """

    session: object
    frame_index: int
    world: ToroidalDotRobot
    history: list
    history_actions: list
    start: np.ndarray
    start_truth: np.ndarray
    actions: list = field(default_factory=list)
    imagined: list = field(default_factory=list)
    truth: list = field(default_factory=list)
    mse: list = field(default_factory=list)
    dot_error: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.actions)

    def dot_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Dot centres (x, y) per step, float64 (k, 2) each: the truth's, the imagined (NaN: no dot)."""
        if not self.steps:
            return np.zeros((0, 2)), np.zeros((0, 2))
        return dot_centroids(np.stack(self.truth)), dot_centroids(np.stack(self.imagined))


def start_play(session, t: int, cfg) -> Play:
    """A new play from frame ``t`` (``play_frames``); needs no model. ValueError naming the problem."""
    first, last = play_frames(session, cfg)
    t = whole_number(t, "Frame index", first, last)
    world = world_at(session, t)
    idx = history_indices(np.array([t]), cfg)[0]  # (K-1,)
    history = list(_frames(session, idx))  # K-1 frames, oldest first
    return Play(session, t, world, history, list(_actions(session, idx[:-1])), history[-1], world.get_observation())


def play_actions(actions, play: Play, max_steps: int) -> np.ndarray:
    """``actions`` (a string of 0 = stay and 1 = move right; spaces ignored) as int64 (k,), when the
    play can take them all (at most ``max_steps`` in a play); ValueError naming the problem otherwise."""
    text = "".join(actions.split()) if isinstance(actions, str) else None
    if not text or len(text) > max_steps or set(text) - {"0", "1"}:
        raise ValueError(f"Actions must be 1-{max_steps} characters, each 0 (stay) or 1 (move right) "
                         f"(got {str(actions)[:60]!r})")
    if play.steps + len(text) > max_steps:
        raise ValueError(f"this play has {play.steps} of its {max_steps} steps; {len(text)} more would pass "
                         "that: start again from frame t")
    return np.frombuffer(text.encode(), np.uint8).astype(np.int64) - ord("0")  # (k,)


def play_steps(wm: AutoencoderConcatPredictorWorldModel, play: Play, actions: np.ndarray) -> Play:
    """Imagine one frame per action (each prediction fed back as history) and step the world alike."""
    cfg = wm.config
    for action in actions:  # sequential by nature: each step reads the previous step's output
        acts = np.array([*play.history_actions, action])  # (K-1,)
        canvas = build_prediction_canvases(np.stack(play.history)[None], acts[None], cfg.separator_width)  # (1, H, Wc, 3)
        frame = wm.predict_slots(canvas)[0]  # (H, W, 3)
        play.history, play.history_actions = [*play.history[1:], frame], [int(a) for a in acts[1:]]  # one slot on
        play.imagined.append(frame)
        play.actions.append(int(action))
    new = play.imagined[-len(actions):]
    truth = simulate(play.world, actions)  # (k, H, W, 3)
    play.truth.extend(truth)
    play.mse.extend(frame_mses(np.stack(new), truth))
    play.dot_error.extend(dot_errors(np.stack(new), truth))
    return play


# -----------------------------------------------------------------------------
# two models on the same frames


@dataclass
class Comparison:
    """Two models (A, B) on every transition of one session.

    evaluations: ``evaluate_models``'s for A and B; disagreement: float64 (T,) |dot error A - dot
    error B| (a missing dot counts as ``no_dot_px``, the torus's largest distance; 0 where the actual
    frame has no dot); top: int64 (m,) the transitions where they disagree most (dot errors, then MSE; only those
    that differ at all), with top_predictions uint8 (2, m, H, W, 3) (A's, B's) and top_actual uint8
    (m, H, W, 3) the recorded frames t+1.
    """

    names: tuple[str, str]
    evaluations: tuple[Evaluation, Evaluation]
    no_dot_px: float
    disagreement: np.ndarray
    top: np.ndarray
    top_predictions: np.ndarray
    top_actual: np.ndarray
    seconds: float


def compare_models(wm_a: AutoencoderConcatPredictorWorldModel, wm_b: AutoencoderConcatPredictorWorldModel, session,
                   names: tuple[str, str] = ("A", "B"), batch_size: int = 32, top: int = 5,
                   progress: Callable[[int, int], None] | None = None) -> Comparison:
    """Evaluate both models on every transition (``evaluate_models``: batched, chunked) and predict
    again the ``top`` transitions where they disagree most, for their pictures."""
    start = time.perf_counter()
    ev = evaluate_models([wm_a, wm_b], session, batch_size, progress)
    H, W = wm_a.config.frame_size
    far = math.hypot(H / 2, W / 2)  # the largest distance on the torus
    dots = np.nan_to_num(np.stack([ev[0].dot_error, ev[1].dot_error]), nan=0.0, posinf=far)  # (2, T)
    disagreement = np.abs(dots[0] - dots[1])  # (T,)
    mse_gap = np.abs(ev[0].mse - ev[1].mse)  # (T,)
    order = np.lexsort((-mse_gap, -disagreement))  # most different first
    chosen = order[(disagreement[order] > 0) | (mse_gap[order] > 0)][:top]  # (m,)
    predictions, actual = np.zeros((2, 0, H, W, 3), np.uint8), np.zeros((0, H, W, 3), np.uint8)
    if len(chosen):
        acts = _actions(session, np.arange(_size(session) - 1))  # (n-1,)
        canvases, frames = _transition_canvases(session, ev[0].frame_index[chosen], acts, wm_a.config)
        predictions = np.stack([wm.predict_slots(canvases, batch_size) for wm in (wm_a, wm_b)])  # (2, m, H, W, 3)
        actual = frames[:, -1]  # (m, H, W, 3)
    return Comparison(names, (ev[0], ev[1]), far, disagreement, chosen, predictions, actual, time.perf_counter() - start)


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
