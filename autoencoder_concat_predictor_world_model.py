"""The canvas world model: observe, train by inpainting, predict the next frame, repeat.

``AutoencoderConcatPredictorWorldModel`` runs the spec's loop over any robot with the
``get_observation() / execute_action() / action_space`` interface (the live ``ToroidalDotRobot``
or ``ReplayRobot`` over a recorded session). One iteration:

1. observe frame t and append it to the history;
2. score the previous prediction against it (MSE);
3. with 3 frames of history, train on the canvas ``[f(t-2)][a][f(t-1)][a][f(t)]`` (one step,
   or until the quality gate passes);
4. choose an action and append it;
5. inpaint ``[f(t-1)][a(t-1)][f(t)][a(t)][blank]`` -> predicted frame t+1;
6. execute the action; 7. trim the history.

Nothing here imports gradio or matplotlib: the app turns the state and metrics into pictures.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import logging
import math
import os
import pickle
import random
import shutil
import tempfile
import threading
import time
import uuid
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from config import CHECKPOINT_PATH, AutoencoderConcatPredictorWorldModelConfig
from models import TargetedMAEWrapper, build_canvas, canvas_to_patches, canvas_to_tensor, tensor_to_uint8
from models.autoencoder_concat_predictor import (
    compute_randomized_patch_mask_for_last_slot,
    last_slot_x0,
    roll_canvas_frames,
)
from toroidal_dot_robot import ACTION_SPACE, MOVE_RIGHT, STAY, action_dict, parse_action

CHECKPOINT_FORMAT = "concat-world-model/1"  # bump when the checkpoint layout changes
LOG = logging.getLogger("concat_world_model_explorer.engine")  # a child of the app's logger: its level applies


class CheckpointError(Exception):
    """A checkpoint that cannot be saved or loaded; the live model is left as it was."""


# -----------------------------------------------------------------------------
# helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) in one place."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_lr(step: int, cfg: AutoencoderConcatPredictorWorldModelConfig) -> float:
    """Learning rate at an optimizer step: linear warm-up, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.lr_decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.lr_decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def get_foreground_weight(step: int, cfg: AutoencoderConcatPredictorWorldModelConfig) -> float:
    """Dot-pixel loss weight at an optimizer step: ``foreground_weight``, annealed geometrically to
    ``foreground_weight_final`` over ``foreground_weight_decay_steps`` (a large weight finds the dot;
    a small one keeps the predicted dot from growing into a large blob)."""
    start, end, n = cfg.foreground_weight, cfg.foreground_weight_final, cfg.foreground_weight_decay_steps
    if end is None or n <= 0:
        return start
    t = min(1.0, step / n)
    return float(start * (end / start) ** t)


def configure_optimizer(model: torch.nn.Module, cfg: AutoencoderConcatPredictorWorldModelConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms or learned tokens)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and not n.endswith("_token")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or n.endswith("_token"))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA) takes ~3 ms a step here against ~10 ms for the foreach one
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=True)


def frame_mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two uint8 frames on the 0-1 scale."""
    return float(np.mean((a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0) ** 2))


def frame_mses(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``frame_mse`` of each pair of a batch: uint8 (B, H, W, 3) twice -> float64 (B,)."""
    diff = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0  # (B, H, W, 3)
    return np.mean(diff.reshape(len(diff), -1) ** 2, axis=1, dtype=np.float64)  # (B,)


def dot_centroids(frames: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Centre (x, y) of the bright pixels of each frame on the torus; NaN where a frame has none.

    A circular mean per axis, so a dot split across an edge is found where it is, not in the middle.

    Args:
        frames: uint8 (B, H, W, 3).

    Returns:
        float64 (B, 2).
    """
    bright = frames.astype(np.float32).mean(-1) > threshold  # (B, H, W)
    B, H, W = bright.shape
    count = bright.sum(axis=(1, 2)).astype(np.float64)  # (B,)
    per_x, per_y = bright.sum(axis=1), bright.sum(axis=2)  # (B, W), (B, H) bright pixels per column / row
    ax, ay = np.arange(W) * (2 * np.pi / W), np.arange(H) * (2 * np.pi / H)  # (W,), (H,)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.arctan2(per_x @ np.sin(ax) / count, per_x @ np.cos(ax) / count) * W / (2 * np.pi) % W  # (B,)
        y = np.arctan2(per_y @ np.sin(ay) / count, per_y @ np.cos(ay) / count) * H / (2 * np.pi) % H  # (B,)
    centres = np.stack([x, y], axis=1)  # (B, 2)
    centres[count == 0] = np.nan
    return centres


def dot_errors(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``dot_error`` of each pair of a batch: uint8 (B, H, W, 3) twice -> float64 (B,), inf where a
    prediction has no dot, NaN where the actual frame has none."""
    guess, truth = dot_centroids(predicted), dot_centroids(actual)  # (B, 2) each
    H, W = actual.shape[1:3]
    d = np.abs(guess - truth)  # (B, 2) |dx|, |dy|
    d = np.minimum(d, np.array([W, H]) - d)  # the short way round the torus
    errors = np.hypot(d[:, 0], d[:, 1])  # (B,)
    errors[np.isnan(guess[:, 0])] = np.inf
    errors[np.isnan(truth[:, 0])] = np.nan
    return errors


def dot_centroid(frame: np.ndarray, threshold: int = 127) -> tuple[float, float] | None:
    """``dot_centroids`` of one uint8 (H, W, 3) frame: (x, y), or None when it has no bright pixel."""
    x, y = dot_centroids(frame[None], threshold)[0]
    return None if math.isnan(x) else (float(x), float(y))


def dot_error(predicted: np.ndarray, actual: np.ndarray) -> float | None:
    """Toroidal distance in pixels between the dots of two frames; inf when the prediction has no
    dot, None when the actual frame has none."""
    error = float(dot_errors(predicted[None], actual[None])[0])
    return None if math.isnan(error) else error


def _is_frame(item) -> bool:
    return isinstance(item, np.ndarray)


# -----------------------------------------------------------------------------
# replaying a recorded session


class ReplayRobot:
    """Plays a recorded session back as if it were the robot, looping at its end.

    Args:
        session: any object with ``frame(i) -> uint8 (H, W, 3)``, ``action_after(i) -> int | None``
            and ``observations`` (a sized sequence), such as ``session_explorer_lib.Session``.
        start_index: the recorded frame to start from.
    """

    def __init__(self, session, start_index: int = 0):
        self.session = session
        self.num_frames = len(session.observations)
        if self.num_frames < 1:
            raise ValueError("the session has no frames to replay")
        self.index = int(start_index) % self.num_frames
        self.episode_boundary = False  # True right after looping: the next frame does not follow from the action

    @property
    def action_space(self) -> list[dict]:
        return [dict(a) for a in ACTION_SPACE]

    def get_observation(self) -> np.ndarray:
        return self.session.frame(self.index)

    def recorded_action(self) -> dict:
        """The action recorded after the current frame (stay at the session's last frame)."""
        a = self.session.action_after(self.index)
        return action_dict(STAY if a is None else a)

    def execute_action(self, action) -> None:
        parse_action(action)  # refused like the live robot would; the recording decides what happens next
        self.index += 1
        self.episode_boundary = self.index >= self.num_frames
        if self.episode_boundary:
            self.index = 0

    def cleanup(self) -> None:
        pass


def create_replay_action_selector(robot: ReplayRobot) -> Callable:
    """A selector that returns the action the session recorded after the current frame."""

    def selector(observation, action_space):
        return robot.recorded_action()

    return selector


# -----------------------------------------------------------------------------
# the world model


@dataclass
class AttentionCapture:
    """Decoder attention of one prediction, for the attention explorer.

    weights: float32 (layers, heads, N, N), N = 1 + patches (token 0 is CLS).
    patch_mask: bool (L,), True = masked (the predicted slot).
    grid_size: (rows, columns) of the patch grid.
    canvas: uint8 (H, W, 3) canvas the attention was computed on.
    patch_size: patch side in pixels.
    prediction: uint8 (H, W_frame, 3) the frame the model inpainted into the masked slot, or None.
    """

    weights: np.ndarray
    patch_mask: np.ndarray
    grid_size: tuple[int, int]
    canvas: np.ndarray
    patch_size: int
    prediction: np.ndarray | None = None


class _GraphedCall:
    """A function of fixed-shape CUDA tensors, recorded once as a CUDA graph and then replayed.

    The first ``warmup`` calls run the function eagerly on a side stream (real work: for a training
    step these are real steps), as capture asks; the next call copies its inputs into static
    buffers, records the graph and replays it, and every later call only copies and replays. The
    outputs are static tensors that each replay overwrites: copy what must outlive the next call.
    If recording fails the function runs eagerly from then on (``failed`` says why).
    """

    def __init__(self, fn: Callable, warmup: int, keep: Callable[[], object] | None = None):
        self.fn, self.warmup, self.calls = fn, int(warmup), 0
        self.keep = keep  # returns what the recorded graph reads by address besides its inputs (cached indices)
        self.kept = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out = None
        self.failed: str | None = None

    def __call__(self, *inputs: torch.Tensor):
        self.calls += 1
        if self.failed is not None:
            return self.fn(*inputs)
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            try:
                self.static_in = [x.clone() for x in inputs]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.static_out = self.fn(*self.static_in)
                self.graph = graph
                self.kept = self.keep() if self.keep is not None else None  # alive as long as the graph
            except Exception as e:  # capture is all or nothing: nothing ran, run this call eagerly
                self.failed = f"{type(e).__name__}: {e}"[:300]
                self.static_in, self.static_out = [], None
                LOG.warning("CUDA graph capture failed, running eagerly: %s", self.failed)
                return self.fn(*inputs)
        else:
            for buf, x in zip(self.static_in, inputs):
                buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out


@dataclass
class _TrainProducts:
    canvas: np.ndarray  # uint8 (H, W, 3) the canvas of the latest training step
    mask: torch.Tensor  # bool (L,) its patch mask
    pred: torch.Tensor  # (1, L_mask, P) the model's output for its masked patches, detached
    last_input: torch.Tensor  # (1, 1 + L, Dd) the last decoder block's input for it, detached
    full: torch.Tensor | None = None  # (1, L, P) every patch, computed when the views first ask


class AutoencoderConcatPredictorWorldModel:
    """Learns to predict the next frame of a robot by inpainting the last slot of a canvas.

    Args:
        robot_interface: the robot to observe and act on.
        action_selector: ``selector(observation, action_space) -> action dict``; defaults to the
            replay selector for a ``ReplayRobot`` and to always-move otherwise.
        device: torch device; CUDA when present, else CPU.
        training_callback: called with each iteration's metrics dict.
        config: canvas, model and optimiser settings.
    """

    def __init__(
        self,
        robot_interface,
        action_selector: Callable | None = None,
        device: torch.device | str | None = None,
        training_callback: Callable[[dict], None] | None = None,
        config: AutoencoderConcatPredictorWorldModelConfig | None = None,
    ):
        self.config = cfg = config or AutoencoderConcatPredictorWorldModelConfig()
        self.robot = robot_interface
        if action_selector is None:
            action_selector = (
                create_replay_action_selector(robot_interface)
                if isinstance(robot_interface, ReplayRobot)
                else (lambda observation, action_space: action_dict(MOVE_RIGHT))
            )
        self.action_selector = action_selector
        self.device = torch.device(device) if device is not None else default_device()
        self.training_callback = training_callback
        self.lock = threading.RLock()  # one model, many callers (app events, checkpoint saves)

        if cfg.cuda_precision not in ("bf16", "fp32"):
            raise ValueError(f"cuda_precision must be 'bf16' or 'fp32', got {cfg.cuda_precision!r}")
        seed_everything(cfg.seed)
        self.model = TargetedMAEWrapper(cfg).to(self.device)
        self.optimizer = configure_optimizer(self.model, cfg)
        cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if cuda and cfg.cuda_precision == "bf16" else None  # None: fp32
        self.use_graphs = cuda and cfg.cuda_graphs and cfg.mask_ratio >= 1.0  # random masks change shapes' contents
        self._graphs: dict[str, _GraphedCall] = {}  # "train" (the loop's batch), "predict" (one canvas)
        self._foreground_weight = torch.zeros((), device=self.device)  # the loss weight as a tensor a graph can read
        self._stats_host = torch.zeros(3, pin_memory=cuda)  # loss, masked MSE, grad norm of the latest step
        self._stats_ready: torch.cuda.Event | None = None  # recorded when their copy to the host was queued
        self.patch_mask = self.model.default_mask()  # (L,) True = last slot; kept on the host (read without a device sync)

        self.step = 0  # optimizer steps taken
        self.iteration = 0  # loop iterations run
        self.interleaved_history: list = []  # [frame, action, frame, action, ...] uint8 frames, action dicts
        self.last_training_canvas: np.ndarray | None = None
        self.last_training_mask: torch.Tensor | None = None
        self.last_training_loss: float | None = None  # the optimised loss of the latest step
        self.last_training_mse: float | None = None  # plain masked MSE of the latest step
        self.last_grad_norm: float | None = None  # total gradient norm of the latest step, before clipping
        self.last_prediction: np.ndarray | None = None  # predicted frame t+1, uint8 (H, W, 3)
        self.last_prediction_canvas: np.ndarray | None = None  # canvas it was inpainted from
        self.last_observation: np.ndarray | None = None  # frame t
        self.last_checked_prediction: np.ndarray | None = None  # the prediction that frame t was compared with
        self.last_prediction_error: float | None = None  # MSE(last_checked_prediction, frame t)
        self._train_products: _TrainProducts | None = None
        self.replay_buffer: collections.deque = collections.deque(maxlen=cfg.replay_buffer_size)  # uint8 canvases
        self.replay_rng = np.random.default_rng(cfg.seed)  # replay sampling, seeded with the rest
        self.mask_rng = torch.Generator().manual_seed(cfg.seed)  # training masks when mask_ratio < 1

    # -- training and prediction -------------------------------------------------

    def _set_lr(self) -> float:
        lr = get_lr(self.step, self.config)
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # a graph reads the rate from this tensor
            else:
                group["lr"] = lr
        return lr

    def _autocast(self):
        """bf16 autocast on CUDA unless fp32 is configured; a no-op on the CPU."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _forget_graphs(self) -> None:
        """Drop the recorded graphs (after the optimizer state was replaced: they point at the old one)."""
        self._graphs.clear()

    def graph_status(self) -> dict:
        """Which calls run as CUDA graphs: {'train': 'graph' | 'eager (warming up)' | 'eager: <why>', ...}."""
        out = {}
        for name, g in self._graphs.items():
            out[name] = "graph" if g.graph is not None else (f"eager: {g.failed}" if g.failed else "eager (warming up)")
        return out

    def _train_body(self, patches: torch.Tensor, mask: torch.Tensor, first: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward, loss, backward, clipping and the optimizer step on a batch of patches (B, L, P),
        with no read on the host (a CUDA graph can record it). Returns device tensors: the stats
        [loss, masked MSE of canvas 0, grad norm before clipping] (3,), canvas 0's masked-patch
        prediction (1, L_mask, P) and its last-decoder-block input (1, 1 + L, Dd)."""
        cfg = self.config
        tap: list = []
        with self._autocast():
            pred = self.model.forward_patches(patches, mask, masked_only=True, tap=tap)  # (B, L_mask, P)
        loss, _ = self.model.masked_loss(patches, pred, mask, self._foreground_weight)  # fp32
        _, mse = self.model.masked_loss(patches[:1], pred[:1].detach(), first)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        stats = torch.stack([loss.detach().float(), mse.detach().float(), grad_norm.detach().float()])  # (3,)
        return stats, pred[:1].detach(), tap[0][:1].detach()

    def _graphed(self, name: str, fn: Callable) -> _GraphedCall:
        if name not in self._graphs:
            if name == "train":  # a graph reads the rate from the device and steps with capturable state
                for group in self.optimizer.param_groups:
                    if not torch.is_tensor(group["lr"]):
                        group["lr"] = torch.full((), float(group["lr"]), device=self.device)  # no blocking upload
                    group["capturable"] = True
            # the graph reads the patch index sets by address: keep every cached one alive with it, since
            # the cache may be cleared (other batch sizes) while the graph is still replayed
            keep = lambda: tuple(self.model.mae.__dict__.get("_split_cache", {}).values())  # noqa: E731
            self._graphs[name] = _GraphedCall(fn, self.config.cuda_graph_warmup, keep)
        return self._graphs[name]

    def _training_batch(self, canvas: np.ndarray, replay: bool = True) -> np.ndarray:
        """The canvas plus ``replay_batch_size`` canvases drawn from the replay buffer (which holds
        this one too), each rolled on the torus when ``torus_roll`` is on; uint8 (B, H, W, 3)."""
        cfg = self.config
        k = cfg.replay_batch_size if self.replay_buffer and replay else 0
        if not k:
            return canvas[None]  # (1, H, W, 3)
        picks = self.replay_rng.integers(0, len(self.replay_buffer), size=k)  # with replacement: the buffer starts small
        extra = np.stack([self.replay_buffer[i] for i in picks])  # (k, H, W, 3)
        if cfg.torus_roll:
            shifts = self.replay_rng.integers(0, np.array(cfg.frame_size), size=(k, 2))  # (k, 2) dy, dx
            extra = roll_canvas_frames(extra, shifts, cfg.frame_size, cfg.separator_width)
        return np.concatenate([canvas[None], extra])  # (B, H, W, 3)

    def _training_mask(self, batch_size: int) -> torch.Tensor:
        """The patch mask of a training batch: the whole last slot, or with ``mask_ratio`` < 1 a random
        share of it per canvas, bool (L,) or (B, L). Prediction always masks the whole slot."""
        cfg = self.config
        if cfg.mask_ratio >= 1.0:
            return self.patch_mask
        mask = compute_randomized_patch_mask_for_last_slot(
            cfg.frame_size, cfg.patch_size, cfg.canvas_history_size, cfg.separator_width,
            mask_ratio=cfg.mask_ratio, batch_size=batch_size, generator=self.mask_rng)
        return mask  # (B, L) on the host, like patch_mask

    def train_step(self, canvas: np.ndarray, replay: bool = True) -> dict:
        """One optimizer step on a canvas (plus replayed ones, unless ``replay`` is False); returns
        {'loss', 'mse', 'lr', 'grad_norm'} as Python floats, where 'mse' is the plain masked MSE of
        the given canvas alone and 'grad_norm' the gradient's total norm before clipping."""
        with self.lock:
            lr = self._queue_step(canvas, replay)
            return {**self._read_step(), "lr": lr}

    def _queue_step(self, canvas: np.ndarray, replay: bool = True) -> float:
        """Take the step and queue its numbers' copy to the host without waiting for them
        (``_read_step`` collects them; the loop does that after the prediction, so that on a GPU one
        iteration waits for the device once). Returns the step's learning rate."""
        cfg = self.config
        if not self.model.training:  # train() walks every module: about 1 ms a step
            self.model.train()
        patches = canvas_to_patches(self._training_batch(canvas, replay), cfg.patch_size, self.device)  # (B, L, P)
        mask = self._training_mask(patches.shape[0])  # (L,) or (B, L), on the host
        first = mask if mask.ndim == 1 else mask[0]  # (L,) the given canvas's mask
        lr = self._set_lr()
        self._foreground_weight.fill_(get_foreground_weight(self.step, cfg))
        body = self._train_body
        if self.use_graphs and mask.ndim == 1 and patches.shape[0] == 1 + cfg.replay_batch_size:
            body = self._graphed("train", self._train_body)  # the loop's batch; other sizes run eagerly
        stats, pred, last_input = body(patches, mask, first)
        self.step += 1
        # graph outputs are overwritten by the next replay: keep fp32 copies (a few hundred kB on the device)
        self._train_products = _TrainProducts(canvas=canvas, mask=first, pred=pred.float().clone(),
                                              last_input=last_input.float().clone())
        self.last_training_canvas = canvas
        self.last_training_mask = first
        self._stats_host.copy_(stats, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._stats_ready = torch.cuda.Event()
            self._stats_ready.record()
        return lr

    def _read_step(self) -> dict:
        """The numbers of the step ``_queue_step`` took, as Python floats (waits for their copy)."""
        if self._stats_ready is not None:
            self._stats_ready.synchronize()
            self._stats_ready = None
        loss, mse, grad_norm = self._stats_host.tolist()
        self.last_training_loss, self.last_training_mse, self.last_grad_norm = loss, mse, grad_norm
        return {"loss": loss, "mse": mse, "grad_norm": grad_norm}

    def train_autoencoder(self, canvas: np.ndarray) -> float:
        """Train on a canvas: one step, or with the quality gate on, until the masked MSE falls
        under ``canvas_inpainting_threshold`` (at most ``quality_gate_max_steps`` steps).

        Returns:
            The optimised loss of the last step taken.
        """
        with self.lock:
            self._queue_training(canvas)
            return self._read_step()["loss"]

    def _queue_training(self, canvas: np.ndarray) -> None:
        """``train_autoencoder`` without reading the last step's numbers (``_read_step`` does)."""
        cfg = self.config
        if cfg.replay_batch_size:
            self.replay_buffer.append(canvas)
        self._queue_step(canvas)
        if cfg.quality_gate:
            for _ in range(cfg.quality_gate_max_steps - 1):
                if self._read_step()["mse"] < cfg.canvas_inpainting_threshold:
                    break
                self._queue_step(canvas)

    @torch.no_grad()
    def predict_canvas(self, canvas: np.ndarray) -> np.ndarray:
        """Inpaint the masked slot of a canvas; returns the canvas, uint8 (H, W, 3), with the model's
        pixels in the masked slot and black elsewhere (only the masked patches are computed)."""
        cfg = self.config
        with self.lock:
            patches = canvas_to_patches(canvas, cfg.patch_size, self.device)  # (1, L, P)
            forward = self._predict_body
            if self.use_graphs:
                forward = self._graphed("predict", self._predict_body)
            pred = forward(patches)  # (1, L_mask, P)
            full = self.model.scatter_masked(pred.float(), self.patch_mask)  # (1, L, P) visible patches black
            return tensor_to_uint8(self.model.reconstruct(full)[0])

    @torch.no_grad()
    def _predict_body(self, patches: torch.Tensor) -> torch.Tensor:
        """The masked slot's patches (B, L_mask, P) of canvases' patches (B, L, P); no host read."""
        with self._autocast():
            return self.model.forward_patches(patches, self.patch_mask, masked_only=True)

    @torch.no_grad()
    def predict_slots(self, canvases: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Inpaint the last slot of a batch of canvases, ``batch_size`` at a time; changes nothing
        in the model or its state (no training, no "latest prediction").

        Args:
            canvases: uint8 (B, H, W_canvas, 3), last slot blank.

        Returns:
            uint8 (B, H, W_frame, 3): the predicted frames.
        """
        cfg = self.config
        x0 = last_slot_x0(cfg.frame_size[1], cfg.canvas_history_size, cfg.separator_width)
        out = np.empty((len(canvases), *cfg.frame_size, 3), np.uint8)  # (B, H, W_frame, 3)
        with self.lock:
            for i in range(0, len(canvases), batch_size):  # chunks bound the activations' memory
                patches = canvas_to_patches(canvases[i : i + batch_size], cfg.patch_size, self.device)  # (b, L, P)
                pred = self._predict_body(patches).float()  # (b, L_mask, P)
                full = self.model.reconstruct(self.model.scatter_masked(pred, self.patch_mask))  # (b, 3, H, W_canvas)
                full = full[..., x0 : x0 + cfg.frame_size[1]]  # (b, 3, H, W_frame)
                out[i : i + batch_size] = tensor_to_uint8(full)
        return out

    def predict_next_frame(self, history: list) -> np.ndarray:
        """Predict the frame that follows a history.

        Args:
            history: ``[..., f(t-1), a(t-1), f(t), a(t)]``, ending in the action about to be taken.

        Returns:
            uint8 (H, W, 3): the inpainted last slot.
        """
        cfg = self.config
        K = cfg.canvas_history_size
        items = history[-(2 * (K - 1)) :]  # (K-1) frames with the action after each
        if len(items) < 2 * (K - 1) or not _is_frame(items[0]):
            raise ValueError(f"predict_next_frame needs {K - 1} frames, each followed by its action")
        canvas = build_canvas(items, cfg.frame_size, cfg.separator_width)  # blank last slot
        full = self.predict_canvas(canvas)
        x0 = last_slot_x0(cfg.frame_size[1], K, cfg.separator_width)
        self.last_prediction_canvas = canvas
        return np.ascontiguousarray(full[:, x0 : x0 + cfg.frame_size[1]])

    def forget_views(self) -> None:
        """Drop the latest observation, predictions and training products (after loading other weights,
        they describe another model); the next iterations rebuild them."""
        with self.lock:
            self.interleaved_history.clear()
            self.last_prediction = self.last_prediction_canvas = self.last_checked_prediction = None
            self.last_observation = self.last_prediction_error = None
            self.last_training_canvas = self.last_training_mask = self._train_products = None
            self.last_training_loss = self.last_training_mse = self.last_grad_norm = None

    # -- the loop -------------------------------------------------------------------

    def run_iter(self, max_iterations: int, stop_event: threading.Event | None = None) -> Iterator[dict]:
        """Run the loop, yielding each iteration's metrics; stops early when ``stop_event`` is set."""
        for _ in range(int(max_iterations)):
            if stop_event is not None and stop_event.is_set():
                return
            yield self.run_one_iteration()

    def run(self, max_iterations: int, stop_event: threading.Event | None = None) -> list[dict]:
        """Run ``max_iterations`` iterations of the loop; returns their metrics."""
        return list(self.run_iter(max_iterations, stop_event))

    def run_one_iteration(self) -> dict:
        """One pass of the spec's loop. Returns metrics as Python floats (None where not yet defined):
        iteration, step, prediction_error (MSE of the previous prediction against frame t),
        dot_error (px between their dots; inf when no dot was predicted), copy_error (MSE of
        simply repeating frame t-1), training_loss, training_mse, lr and grad_norm (of the latest
        step, before clipping; None in an iteration that did not train), iteration_time."""
        cfg = self.config
        K = cfg.canvas_history_size
        with self.lock:
            t0 = time.perf_counter()
            obs = np.asarray(self.robot.get_observation(), dtype=np.uint8)
            self.interleaved_history.append(obs)  # 1. observe
            self.last_observation = obs

            prediction_error = prediction_dot_error = copy_error = None  # 2. score the previous prediction
            if self.last_prediction is not None:
                prediction_error = frame_mse(self.last_prediction, obs)
                prediction_dot_error = dot_error(self.last_prediction, obs)
                copy_error = frame_mse(self.interleaved_history[-3], obs)  # baseline: repeat frame t-1
                self.last_checked_prediction = self.last_prediction
                self.last_prediction_error = prediction_error

            trained = False  # 3. train on the canvas ending in frame t (its numbers are read after step 5)
            if len(self.interleaved_history) >= 2 * K - 1:
                canvas = build_canvas(self.interleaved_history[-(2 * K - 1) :], cfg.frame_size, cfg.separator_width)
                self._queue_training(canvas)
                trained = True

            action = self.action_selector(obs, self.robot.action_space)  # 4. act
            self.interleaved_history.append(action)

            self.last_prediction = None  # 5. predict frame t+1
            if len(self.interleaved_history) >= 2 * (K - 1):
                self.last_prediction = self.predict_next_frame(self.interleaved_history)

            self.robot.execute_action(action)  # 6. execute
            if getattr(self.robot, "episode_boundary", False):
                # a replay looped: the next frame does not follow from this action
                self.interleaved_history.clear()
                self.last_prediction = None
            del self.interleaved_history[: -(2 * (K - 1))]  # 7. keep what the next canvas needs
            train = self._read_step() if trained else None  # on a GPU, ready since the prediction came back

            self.iteration += 1
            metrics = {
                "iteration": self.iteration,
                "step": self.step,
                "prediction_error": prediction_error,
                "dot_error": prediction_dot_error,
                "copy_error": copy_error,
                "training_loss": None if train is None else train["loss"],
                "training_mse": None if train is None else train["mse"],
                "lr": None if train is None else get_lr(self.step - 1, cfg),
                "grad_norm": None if train is None else self.last_grad_norm,
                "iteration_time": time.perf_counter() - t0,
            }
        if self.training_callback is not None:
            self.training_callback(metrics)
        return metrics

    # -- views ---------------------------------------------------------------------

    def get_training_views(self) -> dict[str, np.ndarray] | None:
        """The spec's four training views of the latest training step, uint8 (H, W, 3) each:
        ``original``, ``masked`` (masked patches greyed), ``inpainting`` (the model's output for
        every patch), ``composite`` (visible patches from the canvas, masked ones from the model).
        None before the first training step.

        Training computes the masked patches only (nothing learns from the others); the visible
        patches of ``inpainting`` are computed here, once per step, from the last decoder block's
        input that the step kept, through the last block and pixel head as they are now (one
        optimizer step later than the masked patches)."""
        with self.lock:
            products = self._train_products
            if products is None:
                return None
            cfg = self.config
            p = cfg.patch_size
            gh, gw = self.model.grid_size
            canvas = products.canvas
            mask_px = products.mask.reshape(gh, gw).cpu().numpy().repeat(p, 0).repeat(p, 1)  # (H, W) True = masked
            if products.full is None:
                with torch.no_grad():
                    full = self.model.mae.finish_decoder(products.last_input)  # (1, L, P)
                products.full = self.model.scatter_masked(products.pred, products.mask, into=full)  # masked: the step's
            inpainting = tensor_to_uint8(self.model.reconstruct(products.full)[0])
        masked = canvas.copy()
        masked[mask_px] = (0.35 * canvas[mask_px] + 0.65 * np.array([128, 128, 128])).astype(np.uint8)
        grid = np.zeros_like(mask_px)  # patch borders inside the masked area, so single patches show
        grid[::p, :] = True
        grid[:, ::p] = True
        masked[grid & mask_px] = (90, 90, 90)
        composite = np.where(mask_px[..., None], inpainting, canvas)
        return {"original": canvas, "masked": masked, "inpainting": inpainting, "composite": composite}

    def get_prediction_views(self, canvas: bool = True) -> dict:
        """The spec's prediction views, uint8 (H, W, 3) or None: ``current`` (frame t),
        ``predicted`` (predicted frame t+1), ``checked`` (the prediction frame t was compared with),
        ``error`` (|checked - current| per pixel, amplified to full range for display),
        ``error_mse`` (its MSE, or None) and ``canvas`` (the canvas ``predicted`` was inpainted
        from, with it filled into the last slot; None when ``canvas`` is False)."""
        cfg, want_canvas = self.config, canvas
        with self.lock:
            current, predicted, checked = self.last_observation, self.last_prediction, self.last_checked_prediction
            error_mse, canvas = self.last_prediction_error, self.last_prediction_canvas
        error = None
        if current is not None and checked is not None:
            error = np.abs(checked.astype(np.int16) - current.astype(np.int16)).astype(np.uint8)
        if want_canvas and canvas is not None and predicted is not None:
            x0 = last_slot_x0(cfg.frame_size[1], cfg.canvas_history_size, cfg.separator_width)
            canvas = canvas.copy()
            canvas[:, x0 : x0 + cfg.frame_size[1]] = predicted
        else:
            canvas = None
        return {"current": current, "predicted": predicted, "checked": checked, "error": error, "error_mse": error_mse,
                "canvas": canvas}

    @torch.no_grad()
    def capture_decoder_attention(self, canvas: np.ndarray | None = None) -> AttentionCapture | None:
        """Decoder attention of an inpainting pass (default: the latest prediction canvas)."""
        with self.lock:
            canvas = self.last_prediction_canvas if canvas is None else canvas
            if canvas is None:
                return None
            cfg = self.config
            imgs = canvas_to_tensor(canvas, self.device)
            pred, attn = self.model.forward_with_patch_mask(imgs, self.patch_mask, return_attn=True)
            weights = torch.stack([a[0] for a in attn]).float().cpu().numpy()  # (layers, heads, N, N)
            x0 = last_slot_x0(cfg.frame_size[1], cfg.canvas_history_size, cfg.separator_width)
            slot = tensor_to_uint8(self.model.reconstruct(pred)[0])[:, x0 : x0 + cfg.frame_size[1]]  # (H, W_frame, 3)
            return AttentionCapture(
                weights=weights,
                patch_mask=self.patch_mask.cpu().numpy().copy(),
                grid_size=tuple(self.model.grid_size),
                canvas=canvas,
                patch_size=cfg.patch_size,
                prediction=np.ascontiguousarray(slot),
            )

    # -- checkpoints ------------------------------------------------------------------

    def _checkpoint_payload(self, extra: dict | None = None) -> dict:
        cfg = self.config
        config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
        return {
            "format": CHECKPOINT_FORMAT,
            "architecture": cfg.architecture(),
            "config": config_dict,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _portable_optimizer_state(self.optimizer.state_dict()),
            "step": int(self.step),
            "iteration": int(self.iteration),
            "saved_at": time.time(),
            **(extra or {}),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None, extra: dict | None = None,
                        replace: bool = True) -> Path:
        """Write model, optimizer, step and config atomically (temp file, fsync, rename).

        A crash mid-save leaves the previous file intact; concurrent saves leave one complete file.
        ``extra`` adds plain entries to the file (e.g. the session trained on). With ``replace``
        False an existing file is never replaced (a hard link, not a rename): ``CheckpointError``.
        """
        path = Path(path) if path is not None else CHECKPOINT_PATH
        with self.lock:
            payload = self._checkpoint_payload(extra)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails when the name exists, even if another save took it a moment ago
                Path(tmp).unlink()
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, FileExistsError):
                raise CheckpointError(f"a checkpoint named {path.stem} already exists: choose another name") from e
            if isinstance(e, OSError):
                raise CheckpointError(f"could not save the checkpoint {path.name}: {e.strerror or e}") from e
            raise
        _fsync_dir(path.parent)
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> dict:
        """Load a checkpoint saved by ``save_checkpoint``; returns a summary dict.

        Only plain tensors and containers are unpickled (``weights_only=True``), so a file cannot
        run code. A file that is missing, corrupt, of another architecture or without weights
        raises ``CheckpointError`` and leaves the live model and optimizer untouched.
        """
        path = Path(path) if path is not None else CHECKPOINT_PATH
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file named {path.name}")
        try:
            with zipfile.ZipFile(path) as zf:  # torch.load skips the CRC-32s: a flipped bit would load silently
                bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"checksum mismatch in {bad}")
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling and zip errors come in many types
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"{path.name} is not a readable checkpoint ({type(e).__name__}: {first_line})") from e
        model_state, optim_state = self._validate_payload(payload, path)
        with self.lock:
            backup = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict()), self.step, self.iteration)
            try:
                self.model.load_state_dict(model_state, strict=True)
                if optim_state is not None:
                    self.optimizer.load_state_dict(optim_state)
                    self._forget_graphs()  # new optimizer state tensors: a recorded step would use the old ones
                self.step = int(payload.get("step", 0))
                self.iteration = int(payload.get("iteration", 0))
            except Exception as e:
                self.model.load_state_dict(backup[0])
                self.optimizer.load_state_dict(backup[1])
                self._forget_graphs()
                self.step, self.iteration = backup[2], backup[3]
                raise CheckpointError(f"{path.name} does not fit this model: {str(e)[:200]}") from e
        return {"path": str(path), "step": self.step, "iteration": self.iteration}

    def _validate_payload(self, payload, path: Path) -> tuple[dict, dict | None]:
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path.name} is not a world-model checkpoint of format {CHECKPOINT_FORMAT}")
        arch = payload.get("architecture")
        if arch != self.config.architecture():
            diff = {k: (v, (arch or {}).get(k)) for k, v in self.config.architecture().items() if (arch or {}).get(k) != v}
            raise CheckpointError(f"{path.name} was trained with another architecture (this model vs file: {diff})")
        model_state = payload.get("model")
        live = self.model.state_dict()
        if not isinstance(model_state, dict) or set(model_state) != set(live):
            raise CheckpointError(f"{path.name} holds no complete set of model weights")
        for k, v in live.items():
            t = model_state[k]
            if not isinstance(t, torch.Tensor) or t.shape != v.shape or not torch.isfinite(t).all():
                raise CheckpointError(f"{path.name}: weight {k} is missing, misshapen or not finite")
        for key in ("step", "iteration"):
            value = payload.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{path.name}: '{key}' must be a whole number >= 0, got {value!r}")
        optim_state = payload.get("optimizer")
        if optim_state is not None:
            self._validate_optimizer_state(optim_state, path)
        return model_state, optim_state

    def _validate_optimizer_state(self, state, path: Path) -> None:
        """AdamW moments must match their parameters, be finite, and second moments >= 0; a bad
        moment would otherwise load and turn the weights to NaN at the next step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        groups = state.get("param_groups") if isinstance(state, dict) else None
        moments = state.get("state") if isinstance(state, dict) else None
        if not isinstance(groups, list) or not isinstance(moments, dict):
            raise CheckpointError(f"{path.name}: the optimizer state is malformed")
        for index, entry in moments.items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
                raise CheckpointError(f"{path.name}: the optimizer state names an unknown parameter {index!r}")
            for name in ("exp_avg", "exp_avg_sq"):
                t = entry.get(name)
                if not isinstance(t, torch.Tensor) or t.shape != params[index].shape or not torch.isfinite(t).all():
                    raise CheckpointError(f"{path.name}: optimizer {name} of parameter {index} is missing, misshapen or not finite")
            if (entry["exp_avg_sq"] < 0).any():
                raise CheckpointError(f"{path.name}: optimizer exp_avg_sq of parameter {index} is negative")


def _portable_optimizer_state(state: dict) -> dict:
    """An optimizer state dict on the CPU, as an eager optimizer on any device loads it: a rate held
    as a tensor (for CUDA graphs) saved as a float, the graphs' ``capturable`` flag cleared."""
    state = _to_cpu(state)
    for group in state.get("param_groups", []):
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _remove_stale_temp_files(path: Path, older_than_s: float = 600.0) -> None:
    """Delete temp files that a killed save of this checkpoint left behind (ours by their name)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# one tab's run lifecycle

_CHECKPOINT_FILES_LOCK = threading.Lock()  # "set a refused file aside, then save" is one step across tabs
_REFUSED_FILES: set = set()  # FileIdentity of every checkpoint file a tab refused; whoever saves next sets it aside


@dataclass(frozen=True)
class FileIdentity:
    """Which file sits at a path (device, inode, size, modification time): tells the file a tab
    refused from one another tab wrote there since."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileIdentity | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CheckpointOrigin:
    """Where a controller's model came from: ``kind`` is "fresh" (no file), "loaded", "refused" or
    "reset" (a fresh model asked for by the user, whatever the files hold)."""

    kind: str
    path: Path
    step: int = 0
    iteration: int = 0
    reason: str = ""  # why the file was refused


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


@dataclass(frozen=True)
class Snapshot:
    """What the page showed at one iteration: frame t, the predicted frame t+1 and the error map of
    the prediction frame t was compared with (uint8 (H, W, 3) or None), and that iteration's metrics."""

    iteration: int
    current: np.ndarray | None
    predicted: np.ndarray | None
    error: np.ndarray | None
    error_mse: float | None
    metrics: dict


class RunSnapshots:
    """A run history's pictures, bounded: at most ``max_snapshots`` snapshots and ``max_bytes`` bytes.

    Frames are kept zlib-compressed (lossless; a black frame with one dot is a few kB). When either
    bound is reached every other snapshot is dropped and from then on only every ``stride``-th
    iteration is kept (the stride doubles each time), so what is kept stays evenly spread over the
    whole history, first iteration included.
    """

    def __init__(self, max_snapshots: int = 500, max_bytes: int = 100 * 2**20):
        if max_snapshots < 2 or max_bytes < 1:
            raise ValueError("a run history keeps at least 2 snapshots and 1 byte")
        self.max_snapshots, self.max_bytes = int(max_snapshots), int(max_bytes)
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._items: list[tuple[int, tuple, dict]] = []  # (iteration, packed pictures, metrics)
            self._bytes, self.stride, self._first = 0, 1, None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def iterations(self) -> list[int]:
        """The iterations kept, oldest first."""
        with self._lock:
            return [item[0] for item in self._items]

    def wants(self, iteration: int) -> bool:
        """Whether ``add`` would keep this iteration (so a caller builds the pictures only then)."""
        return self._first is None or (int(iteration) - self._first) % self.stride == 0

    def add(self, metrics: dict, views: dict) -> bool:
        """Keep iteration ``metrics['iteration']`` (views as ``get_prediction_views``) when it falls on the
        stride; returns whether it was kept."""
        iteration = int(metrics["iteration"])
        with self._lock:
            if self._first is None:
                self._first = iteration
            if (iteration - self._first) % self.stride:
                return False
            packed = tuple(_pack(views.get(key)) for key in ("current", "predicted", "error"))
            self._items.append((iteration, packed + (views.get("error_mse"),), dict(metrics)))
            self._bytes += sum(len(p[0]) for p in packed if p is not None)
            while len(self._items) > 1 and (len(self._items) > self.max_snapshots or self._bytes > self.max_bytes):
                self._thin()
            return True

    def _thin(self) -> None:
        """Drop every other snapshot (the first stays) and double the stride; call under the lock."""
        self._items = [item for item in self._items if (item[0] - self._first) % (2 * self.stride) == 0]
        self._bytes = sum(len(p[0]) for item in self._items for p in item[1][:3] if p is not None)
        self.stride *= 2

    def nearest(self, iteration: int) -> Snapshot | None:
        """The kept snapshot whose iteration is nearest (the earlier one on a tie); None when empty."""
        with self._lock:
            if not self._items:
                return None
            kept = np.array([item[0] for item in self._items])  # (n,) ascending
            it, packed, metrics = self._items[int(np.argmin(np.abs(kept - iteration)))]
        current, predicted, error = (_unpack(p) for p in packed[:3])
        return Snapshot(it, current, predicted, error, packed[3], metrics)


def _pack(image: np.ndarray | None) -> tuple[bytes, tuple, str] | None:
    if image is None:
        return None
    image = np.ascontiguousarray(image)
    return zlib.compress(image.tobytes(), 1), image.shape, image.dtype.str


def _unpack(packed: tuple[bytes, tuple, str] | None) -> np.ndarray | None:
    if packed is None:
        return None
    data, shape, dtype = packed
    return np.frombuffer(zlib.decompress(data), dtype=np.dtype(dtype)).reshape(shape).copy()


class RunBusyError(RuntimeError):
    """A run is already going in this controller."""


def return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def trim_host_memory() -> float:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``, which also releases
    free pages inside the heap). A run allocates and frees tens of MB of buffers per iteration
    among long-lived small objects; without this the freed pages stay resident and the app's RSS
    creeps up by ~60 MB over 2,000 iterations (docs/SPEED.md). Returns the seconds it took."""
    t = time.perf_counter()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return time.perf_counter() - t


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would): with one arena per worker thread,
    memory freed by a departed tab stays scattered and is never returned. True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    M_ARENA_MAX = -8  # from glibc's malloc.h
    return bool(libc.mallopt(M_ARENA_MAX, int(arenas)))


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "libc" not in name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only (musl and macOS lack them)
    except (OSError, AttributeError):
        return None
    return libc


# world-model attributes a parked file does not hold: rebuilt on reload
_NOT_PARKED = frozenset({"config", "robot", "action_selector", "device", "training_callback", "lock", "model",
                         "optimizer", "patch_mask", "mask_rng",
                         # device plumbing the new model makes for itself (CUDA graphs and events do not pickle)
                         "autocast_dtype", "use_graphs", "_graphs", "_foreground_weight", "_stats_host", "_stats_ready"})


class RunController:
    """One tab's run lifecycle, for a page or a script: its session, its world model, its runs.

    - the model is created at the first run, from the checkpoint file when that is compatible; a file
      it refuses is set aside (never overwritten) before this model's first save;
    - ``run(total)`` replays the session from ``start_frame`` and yields each iteration's metrics; a
      Stop (``stop()``, the stop event) ends it after the current iteration; every run ends with
      ``finish`` (atomic checkpoint save, decoder attention captured once);
    - ``park()`` saves an idle model to a private temporary file and frees it; any later call that
      needs the model reloads it (``ModelPool`` decides when).

    Args:
        checkpoint_path: the shared checkpoint (default ``config.CHECKPOINT_PATH``, read at each use).
        config: the world model's settings.
        device: torch device (default: CUDA when present).
        pool: the ``ModelPool`` that parks idle models (None: models stay in memory).
        run_lock_wait_s: how long ``run`` waits for a previous run to wind down.
        stop_grace_s: a Stop that finds nothing running also stops a run that starts this soon after.
        history_snapshots, history_bytes: bounds of the run history's pictures (``RunSnapshots``).
    """

    def __init__(self, checkpoint_path: str | os.PathLike | None = None,
                 config: AutoencoderConcatPredictorWorldModelConfig | None = None,
                 device: torch.device | str | None = None, pool: ModelPool | None = None,
                 run_lock_wait_s: float = 5.0, stop_grace_s: float = 1.0, history_snapshots: int = 500,
                 history_bytes: int = 100 * 2**20):
        self._checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.config = config or AutoencoderConcatPredictorWorldModelConfig()
        self.device = device
        self.run_lock_wait_s, self.stop_grace_s = run_lock_wait_s, stop_grace_s
        self.session = None  # the loaded session (session_explorer_lib.Session or alike)
        self.start_frame = 0  # the frame the next run starts its replay from
        self.history: list[dict] = []  # one metrics dict per iteration, across runs of this model
        self.snapshots = RunSnapshots(history_snapshots, history_bytes)  # what the page showed, bounded
        self.origin: CheckpointOrigin | None = None  # set when the model is created
        self.saved: CheckpointSave | None = None  # the latest save
        self.attention_at: tuple[int, int] | None = None  # (iteration, step) the attention was captured at
        self.stop_event = threading.Event()
        self._stop_requested_at = -math.inf  # monotonic time of the latest stop request
        self._run_lock = threading.Lock()  # one run at a time (released by whichever thread ends it)
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
        self._parked_counters: tuple[int, int] | None = None  # (step, iteration) of a parked model
        self._parked_robot: tuple | None = None  # (session, index, episode_boundary) of a parked replay
        self._shared_seen: FileIdentity | None = None  # the shared checkpoint as this tab last loaded or saved it
        self._attention_canvas: np.ndarray | None = None  # to recapture attention after a reload
        self.last_used = time.monotonic()
        self._pool = pool
        if pool is not None:
            pool.register(self)

    # -- what the page reads ---------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        from config import CHECKPOINT_PATH as default  # read at use: tests and the app may move it

        return self._checkpoint_path if self._checkpoint_path is not None else default

    @property
    def has_model(self) -> bool:
        """Whether this controller has a model (in memory or parked)."""
        return self._wm is not None or self._park_file is not None

    @property
    def is_parked(self) -> bool:
        return self._wm is None and self._park_file is not None

    @property
    def running(self) -> bool:
        return self._running

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

    def prediction_views(self) -> dict | None:
        """The prediction views of the latest iteration (see the world model), or None."""
        wm = self._model_if_any()
        return None if wm is None else wm.get_prediction_views()

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
        from world_model_analysis import counterfactual

        session = self._need_session()
        return counterfactual(self.analysis_model(), session, frame_index)

    def rollout(self, frame_index: int, k: int, max_k: int = 20):
        """k open-loop steps from frame t with the recorded actions (``world_model_analysis.rollout``)."""
        from world_model_analysis import rollout

        session = self._need_session()
        return rollout(self.analysis_model(), session, frame_index, k, max_k)

    def evaluate(self, session, batch_size: int = 32):
        """Every transition of ``session`` (any session, not only the loaded one), batched."""
        from world_model_analysis import evaluate_session

        return evaluate_session(self.analysis_model(), session, batch_size)

    # -- named checkpoints, reset (issue 12) ----------------------------------------------

    def named_checkpoint_path(self, name: str) -> Path:
        """``<checkpoint folder>/<name>.pth`` for a name that follows the session-name rule and is
        not the shared checkpoint's; ValueError naming the problem otherwise."""
        from session_explorer_lib import check_name

        folder = self.checkpoint_path.parent
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
        """Load ``<name>.pth`` into this tab's model (not during a run). Another architecture or a
        damaged file raises ``CheckpointError`` with the model untouched; after a load the metric
        history and run history (another model's) are cleared and the views start afresh.

        Raises:
            ValueError: a bad name. CheckpointError: no such file, or a file refused. RunBusyError.
        """
        path = self.named_checkpoint_path(name)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint named {name}")
        with self._not_running():
            with self._lock:
                wm = self._resident()
                info = wm.load_checkpoint(path)
                wm.forget_views()
                self.origin = CheckpointOrigin("loaded", path, info["step"], info["iteration"])
                self._forget_history()
                return self.origin

    def reset_model(self) -> None:
        """A fresh, untrained model for this tab (not during a run): metric and run history cleared,
        nothing deleted on disk; its first run saves to the shared checkpoint as usual."""
        with self._not_running():
            with self._lock:
                if self._park_file is not None:
                    self._park_file.unlink(missing_ok=True)
                    self._park_file = self._parked_robot = self._parked_counters = None
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
        n = len(self.session.observations)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise ValueError(f"frame index must be a whole number from 0 to {n - 1}, got {index!r}")
        with self._lock:
            self.start_frame = int(index)
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

    def train_single_canvas(self, frame_index: int, steps: int) -> Iterator[dict | None]:
        """``steps`` optimizer steps on the training canvas ending in frame ``frame_index`` alone (the
        "can it fit one example" check). A run like ``run`` (one at a time, Stop ends it, finish saves
        the checkpoint), except that it yields per-step dicts (see ``single_canvas_steps``), keeps
        them out of ``history`` (that is per loop iteration) and leaves the replay where it was.

        Raises:
            ValueError: no session, or a frame without the history a canvas needs (at once).
        """
        from world_model_analysis import single_canvas_steps, training_canvas

        canvas = training_canvas(self._need_session(), frame_index, self.config)
        return self._drive(steps, lambda wm: single_canvas_steps(wm, canvas, steps, self.stop_event), replay=False)

    def _drive(self, total: int, work: Callable, replay: bool) -> Iterator[dict | None]:
        """The body of every run: ``work(wm)`` yields the steps; ``replay`` marks a loop run."""
        from session_explorer_lib import SessionError

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
                    if replay:
                        self.history.append(metrics)
                        if self.snapshots.wants(metrics["iteration"]):
                            self.snapshots.add(metrics, wm.get_prediction_views(canvas=False))
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
        trim_host_memory()  # the run's freed buffers go back to the system, once per run

    def _save(self, wm: AutoencoderConcatPredictorWorldModel) -> CheckpointSave:
        path = self.checkpoint_path
        aside, note = None, ""
        with _CHECKPOINT_FILES_LOCK:
            try:
                current = FileIdentity.of(path)
                if current is not None and current in _REFUSED_FILES:  # refused by this tab or another
                    aside, note = _set_aside(path, current)
                    _REFUSED_FILES.discard(current)
                elif self._refused is not None:
                    note = "the refused file had already been set aside or replaced, so it was left alone"
                self._refused = None
                wm.save_checkpoint(path, extra={"session": getattr(self.session, "name", None)})
                self._shared_seen = FileIdentity.of(path)
            except (CheckpointError, OSError) as e:
                return CheckpointSave(False, path, wm.step, wm.iteration, aside, str(e))
        self._unsaved = False
        return CheckpointSave(True, path, wm.step, wm.iteration, aside, note)

    # -- the model ------------------------------------------------------------------

    def _resident(self) -> AutoencoderConcatPredictorWorldModel:
        """The model in memory: reloaded when parked, created at first use. Call under ``_lock``."""
        if self._released:
            raise RuntimeError("this controller was released (its tab is gone)")
        if self._wm is None:
            self._wm = self._unpark() if self._park_file is not None else self._create()
            self._park_file = self._parked_robot = self._parked_counters = None  # only now: has_model stays True
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
            self.origin = CheckpointOrigin("loaded", path, info["step"], info["iteration"])
            self._unsaved = False
            self._shared_seen = identity
        except CheckpointError as e:
            self._refused = identity
            with _CHECKPOINT_FILES_LOCK:
                _REFUSED_FILES.add(identity)
            self.origin = CheckpointOrigin("refused", path, reason=str(e))
        return wm

    def _attach_replay(self, wm: AutoencoderConcatPredictorWorldModel) -> None:
        """Point the model at the session from ``start_frame``; continuing where the last run stopped
        keeps its history, any other start clears it (the frames would not follow each other)."""
        robot = wm.robot
        if isinstance(robot, ReplayRobot) and robot.session is self.session and robot.index == self.start_frame:
            return
        robot = ReplayRobot(self.session, start_index=self.start_frame)
        with wm.lock:
            wm.robot = robot
            wm.action_selector = create_replay_action_selector(robot)
            wm.interleaved_history.clear()
            wm.last_prediction = None

    # -- parking -------------------------------------------------------------------

    def touch(self) -> None:
        """Mark this controller used now (the pool parks the least recently used first)."""
        self.last_used = time.monotonic()
        if self._pool is not None:
            self._pool.used(self)

    def park(self, folder: str | os.PathLike) -> bool:
        """Save the model to a private file in ``folder`` and free it; False when it is running,
        absent, busy or cannot be written. A run that a cancel closed is finished first. Any later
        call that needs the model reloads it."""
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
            state = {k: v for k, v in vars(wm).items() if k not in _NOT_PARKED}
            state["model"] = wm.model.state_dict()
            state["optimizer"] = _portable_optimizer_state(wm.optimizer.state_dict())
            state["mask_rng"] = wm.mask_rng.get_state()
            robot = wm.robot
            replay = (robot.session, robot.index, robot.episode_boundary) if isinstance(robot, ReplayRobot) else None
            with open(path, "wb") as f:  # our own private folder: pickle is safe to read back
                f.write(zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), 1))
        except Exception as e:  # a full disk or a vanished folder: the model simply stays in memory
            path.unlink(missing_ok=True)
            LOG.warning("could not park an idle model: %s", e)
            return False
        else:
            self._park_file, self._parked_robot = path, replay
            self._parked_counters = (wm.step, wm.iteration)
            self._wm, self._attention = None, None
            drop_cache = getattr(self.session, "drop_cache", None)
            if drop_cache is not None:
                drop_cache()  # decoded frames come back from disk when needed
            LOG.info("parked an idle model (step %d, iteration %d) in %s", wm.step, wm.iteration, path.name)
            return True
        finally:
            self._lock.release()
            self._run_lock.release()

    def _unpark(self) -> AutoencoderConcatPredictorWorldModel:
        """The parked model, as it was; a fresh model (with a note in ``status().problem``) when the
        parked file cannot be read back."""
        path, replay = self._park_file, self._parked_robot
        robot = None if replay is None else ReplayRobot(replay[0], start_index=replay[1])
        if robot is not None:
            robot.episode_boundary = replay[2]
        wm = AutoencoderConcatPredictorWorldModel(robot, device=self.device, config=self.config)
        try:
            state = pickle.loads(zlib.decompress(path.read_bytes()))
            wm.model.load_state_dict(state.pop("model"))
            wm.optimizer.load_state_dict(state.pop("optimizer"))
            wm.mask_rng.set_state(state.pop("mask_rng"))
            for key, value in state.items():
                setattr(wm, key, value)
        except Exception as e:
            LOG.warning("could not reload a parked model: %s", e)
            self._problem = f"this tab's model could not be reloaded after it was set aside while idle ({e}); a new one was made"
            self.history.clear()
            self.snapshots.clear()
            self._park_file = None
            return self._create()
        finally:
            path.unlink(missing_ok=True)
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
            if self._park_file is not None:
                self._park_file.unlink(missing_ok=True)
                self._park_file = self._parked_robot = self._parked_counters = None
        if self._pool is not None:
            self._pool.forget(self)


@dataclass(frozen=True)
class CheckpointSummary:
    """One ``.pth`` file of the checkpoint folder: its counters, when it was saved and on which session
    (None when the file predates that field), or why it cannot be read."""

    name: str
    path: Path
    step: int | None = None
    iteration: int | None = None
    saved_at: float | None = None
    session: str | None = None
    problem: str = ""


def checkpoint_summaries(folder: str | os.PathLike) -> list[CheckpointSummary]:
    """Every ``*.pth`` file directly in ``folder``, newest first (temporary files skipped). Reads each
    with ``weights_only=True``, so a file cannot run code; a damaged one is listed with its problem."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("*.pth") if not p.name.startswith(".") and p.is_file()]
    out = []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a world-model checkpoint of format {CHECKPOINT_FORMAT}")
            session = payload.get("session")
            out.append(CheckpointSummary(path.stem, path, int(payload.get("step", 0)), int(payload.get("iteration", 0)),
                                         float(payload.get("saved_at", path.stat().st_mtime)),
                                         session if isinstance(session, str) else None))
        except Exception as e:  # unpickling and zip errors come in many types
            first_line = (str(e).strip().splitlines() or [""])[0][:120]
            out.append(CheckpointSummary(path.stem, path, problem=f"cannot be read ({type(e).__name__}: {first_line})"))
    return out


def _set_aside(path: Path, refused: FileIdentity) -> tuple[str | None, str]:
    """Keep the refused checkpoint under a new name that cannot collide, but only when the file at
    ``path`` is still that very file. Returns (new name or None, a note when it was not moved)."""
    if FileIdentity.of(path) != refused:
        return None, "the refused file had already been replaced or set aside, so it was left alone"
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    kept = path.with_name(f"{path.stem}.refused-{stamp}{path.suffix}")
    try:
        os.link(path, kept)  # a second name for the file; never overwrites; the save then replaces `path`
        linked = True
    except FileNotFoundError:
        return None, "the refused file was already gone"
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.rename(path, kept)  # no hard links here; the name is unique, so nothing is overwritten
        linked = False
    if linked and FileIdentity.of(kept) != refused:  # another program swapped the file in between
        kept.unlink()  # only our second name of its file goes: the file itself stays at `path`
        return None, "the checkpoint file changed while it was being set aside, so it was left alone"
    return kept.name, ""


class ModelPool:
    """Keeps at most ``max_resident`` models of many controllers in memory and parks (saves to a
    private folder and frees) any model unused for ``idle_s``; a daemon thread sweeps every
    ``sweep_s`` and returns freed memory to the system. Controllers reload their parked model at
    their next use.

    Args:
        idle_s: park a model unused this long (> 0).
        max_resident: models kept in memory at once (>= 1).
        sweep_s: how often the sweeper looks (at least 0.5 s).
        folder: where the private folder of parked files is made (default: the system temp folder).
    """

    def __init__(self, idle_s: float = 300.0, max_resident: int = 4, sweep_s: float = 15.0,
                 folder: str | os.PathLike | None = None):
        if not idle_s > 0 or max_resident < 1:
            raise ValueError(f"idle_s must be > 0 and max_resident >= 1 (got {idle_s}, {max_resident})")
        self.idle_s, self.max_resident = float(idle_s), int(max_resident)
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="cwm-parked-", dir=folder))  # mode 0700: only this user reads it
        self._controllers: weakref.WeakSet[RunController] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._freed = threading.Event()  # set when memory was freed; the sweeper hands it back to the system
        self._wake = threading.Event()  # wakes the sweeper early (memory was freed, or the pool closes)
        self._finalizer = weakref.finalize(self, _close_pool, self._closed, self._wake, self.folder)
        self._thread = threading.Thread(target=_sweep_forever, args=(weakref.ref(self), max(0.5, float(sweep_s))),
                                        name="model-pool-sweeper", daemon=True)
        self._thread.start()

    def controller(self, **kwargs) -> RunController:
        """A new controller whose idle model this pool parks."""
        return RunController(pool=self, **kwargs)

    def register(self, controller: RunController) -> None:
        with self._lock:
            self._controllers.add(controller)

    def forget(self, controller: RunController) -> None:
        with self._lock:
            self._controllers.discard(controller)
        self._freed.set()
        self._wake.set()

    def resident(self) -> list[RunController]:
        """Controllers whose model is in memory, least recently used first."""
        with self._lock:
            live = [c for c in self._controllers if c._wm is not None]
        return sorted(live, key=lambda c: c.last_used)

    def used(self, controller: RunController) -> None:
        """Called when a controller uses its model: park the least recently used others until at
        most ``max_resident`` are in memory (a running or busy one is skipped, the next one tried)."""
        others = [c for c in self.resident() if c is not controller]
        excess = len(others) + 1 - self.max_resident
        for c in others:
            if excess <= 0:
                break
            if c.park(self.folder):
                excess -= 1
                self._freed.set()
                self._wake.set()

    def sweep(self, now: float | None = None) -> int:
        """Park every model unused for ``idle_s``; returns how many were parked."""
        now = time.monotonic() if now is None else now
        parked = sum(c.park(self.folder) for c in self.resident() if now - c.last_used >= self.idle_s)
        if parked:
            self._freed.set()
        if self._freed.is_set():
            self._freed.clear()
            return_freed_memory()
        return parked

    def close(self) -> None:
        """Stop sweeping and delete the parked files."""
        self._finalizer()


def _sweep_forever(pool_ref: weakref.ref, every_s: float) -> None:
    """The sweeper thread; it holds the pool weakly, so a dropped pool (and its folder) goes."""
    while True:
        pool = pool_ref()
        if pool is None or pool._closed.is_set():
            return
        try:
            pool.sweep()
        except Exception as e:  # a sweep must never kill the thread; the next one tries again
            LOG.warning("model pool sweep failed: %s", e)
        closed, wake = pool._closed, pool._wake
        del pool
        wake.wait(every_s)
        wake.clear()
        if closed.is_set():
            return


def _close_pool(closed: threading.Event, wake: threading.Event, folder: Path) -> None:
    closed.set()
    wake.set()
    shutil.rmtree(folder, ignore_errors=True)
