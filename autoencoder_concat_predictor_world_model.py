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
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    portable_optimizer_state,
    read_checkpoint,
    validate_payload,
    write_checkpoint,
)
import config
from config import LOGGER_NAME, AutoencoderConcatPredictorWorldModelConfig
from frame_metrics import dot_error, frame_mse
from models import TargetedMAEWrapper, build_canvas, canvas_to_patches, canvas_to_tensor, tensor_to_uint8
from models.autoencoder_concat_predictor import (
    compute_randomized_patch_mask_for_last_slot,
    last_slot_x0,
    roll_canvas_frames,
)
from models.cuda_graphs import GraphedCall
from toroidal_dot_robot import ACTION_SPACE, MOVE_RIGHT, STAY, action_dict, parse_action

LOG = logging.getLogger(f"{LOGGER_NAME}.engine")  # a child of the app's logger: its level applies


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


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where bf16 matmuls run several
    times faster than fp32 ones."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up defensively
    return bool(is_amx and is_amx())


def cpu_uses_bf16(cpu_precision: str) -> bool:
    """Whether a CPU model trains and predicts under bf16 autocast for the setting ``cpu_precision``."""
    return cpu_precision == "bf16" or (cpu_precision == "auto" and cpu_has_amx())


def compute_path(device: torch.device | str, cfg: AutoencoderConcatPredictorWorldModelConfig,
                 threads: int | None = None) -> str:
    """How a model on ``device`` with ``cfg`` computes, in words: device, precision, CUDA graphs or
    ``threads`` (default: the calling thread's torch threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        graphs = "CUDA graphs" if cfg.cuda_graphs and cfg.mask_ratio >= 1.0 else "eager"
        return f"cuda, {'bf16 autocast' if cfg.cuda_precision == 'bf16' else 'fp32'}, {graphs}"
    if device.type == "cpu":
        amx = "this CPU has AMX" if cpu_has_amx() else "no AMX on this CPU"
        precision = "bf16 autocast" if cpu_uses_bf16(cfg.cpu_precision) else "fp32"
        threads = threads or torch.get_num_threads()
        return f"cpu, {precision} (cpu_precision={cfg.cpu_precision}; {amx}), {threads} torch thread{'s' * (threads != 1)}"
    return f"{device.type}, fp32"


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
    # the fused kernel (CPU and CUDA): one kernel for all parameters instead of one per tensor group
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=True)




def _is_frame(item) -> bool:
    return isinstance(item, np.ndarray)


def _to_tensor(frame: np.ndarray | None) -> torch.Tensor | None:
    return None if frame is None else torch.from_numpy(np.ascontiguousarray(frame))


def _to_array(frame: torch.Tensor | None) -> np.ndarray | None:
    return None if frame is None else frame.numpy()


# the latest frames and numbers ``training_state`` keeps (uint8 (H, W, 3) arrays; floats or None)
_PARKED_FRAMES = ("last_training_canvas", "last_prediction", "last_prediction_canvas", "last_observation",
                  "last_checked_prediction")
_PARKED_NUMBERS = ("last_training_loss", "last_training_mse", "last_grad_norm", "last_prediction_error")

# the metrics of one loop iteration, in the order ``run_iter`` records them (the columns of an export's
# metrics.csv, written even when a history is empty)
METRIC_KEYS = ("iteration", "step", "prediction_error", "dot_error", "copy_error", "training_loss", "training_mse",
               "lr", "grad_norm", "iteration_time")


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


def _default_selector(robot) -> Callable:
    """The replay selector for a ``ReplayRobot``, always-move otherwise."""
    if isinstance(robot, ReplayRobot):
        return create_replay_action_selector(robot)
    return lambda observation, action_space: action_dict(MOVE_RIGHT)


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
        self.action_selector = action_selector or _default_selector(robot_interface)
        self.device = torch.device(device) if device is not None else default_device()
        self.training_callback = training_callback
        self.lock = threading.RLock()  # one model, many callers (app events, checkpoint saves)

        if cfg.cuda_precision not in ("bf16", "fp32"):
            raise ValueError(f"cuda_precision must be 'bf16' or 'fp32', got {cfg.cuda_precision!r}")
        if cfg.cpu_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"cpu_precision must be 'auto', 'bf16' or 'fp32', got {cfg.cpu_precision!r}")
        seed_everything(cfg.seed)
        self.model = TargetedMAEWrapper(cfg).to(self.device)
        self.optimizer = configure_optimizer(self.model, cfg)
        cuda = self.device.type == "cuda"
        bf16 = cfg.cuda_precision == "bf16" if cuda else cpu_uses_bf16(cfg.cpu_precision)
        self.autocast_dtype = torch.bfloat16 if bf16 and self.device.type in ("cuda", "cpu") else None  # None: fp32
        self.use_graphs = cuda and cfg.cuda_graphs and cfg.mask_ratio >= 1.0  # random masks change shapes' contents
        self._graphs: dict[str, GraphedCall] = {}  # "train" (the loop's batch), "predict" (one canvas)
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
        """bf16 autocast where the device's precision setting asks for it; otherwise a no-op (fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _forget_graphs(self) -> None:
        """Drop the recorded graphs (after the optimizer state was replaced: they point at the old one)."""
        self._graphs.clear()

    def graph_status(self) -> dict:
        """Which calls run as CUDA graphs: {'train': 'graph' | 'eager (warming up)' | 'eager: <why>', ...}."""
        out = {}
        for name, g in self._graphs.items():
            out[name] = "graph" if g.graph is not None else (f"eager: {g.failed}" if g.failed else "eager (warming up)")
        return out

    def graph_kept(self, name: str):
        """What the recorded graph ``name`` ('train' or 'predict') keeps alive besides its inputs: the
        cached patch index sets it reads by address, as ``model.mae.cached_index_sets()`` returned
        them when it was recorded. None before it is recorded (or without graphs)."""
        graph = self._graphs.get(name)
        return graph.kept if graph is not None else None

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

    def _graphed(self, name: str, fn: Callable) -> GraphedCall:
        if name not in self._graphs:
            if name == "train":  # a graph reads the rate from the device and steps with capturable state
                for group in self.optimizer.param_groups:
                    if not torch.is_tensor(group["lr"]):
                        group["lr"] = torch.full((), float(group["lr"]), device=self.device)  # no blocking upload
                    group["capturable"] = True
            # the graph reads the patch index sets by address: keep every cached one alive with it, since
            # the cache may be cleared (other batch sizes) while the graph is still replayed
            self._graphs[name] = GraphedCall(fn, self.config.cuda_graph_warmup, self.model.mae.cached_index_sets)
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
        if not self.model.training:  # train() walks every module: only call it when the mode changes
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

    def train_autoencoder(self, canvas: np.ndarray, deferred: bool = False) -> float | None:
        """Train on a canvas: one step, or with the quality gate on, until the masked MSE falls
        under ``canvas_inpainting_threshold`` (at most ``quality_gate_max_steps`` steps).

        Args:
            deferred: return at once without reading the last step's numbers back from the device;
                ``read_training_step()`` reads them later. The loop does that after the prediction,
                so that on a GPU one iteration waits for the device once.

        Returns:
            The optimised loss of the last step taken (None when ``deferred``).
        """
        cfg = self.config
        with self.lock:
            if cfg.replay_batch_size:
                self.replay_buffer.append(canvas)
            self._queue_step(canvas)
            if cfg.quality_gate:
                for _ in range(cfg.quality_gate_max_steps - 1):
                    if self._read_step()["mse"] < cfg.canvas_inpainting_threshold:
                        break
                    self._queue_step(canvas)
            return None if deferred else self._read_step()["loss"]

    def read_training_step(self) -> dict:
        """{'loss', 'mse', 'grad_norm'} of the latest step as Python floats (waits for the device);
        after ``train_autoencoder(..., deferred=True)``."""
        with self.lock:
            return self._read_step()

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

    # -- the robot and parking -------------------------------------------------------

    def attach_robot(self, robot, action_selector: Callable | None = None) -> None:
        """Observe and act on ``robot`` from the next iteration, choosing actions with
        ``action_selector`` (default: as in the constructor). The history and the pending prediction
        are cleared: the next frame does not follow from them."""
        with self.lock:
            self.robot = robot
            self.action_selector = action_selector or _default_selector(robot)
            self.interleaved_history.clear()
            self.last_prediction = None

    def detach_robot(self):
        """Let go of the robot (and its selector); returns it. History and pending prediction are
        cleared as in ``attach_robot``; ``run_one_iteration`` needs a robot attached again."""
        with self.lock:
            robot = self.robot
            self.robot = self.action_selector = None
            self.interleaved_history.clear()
            self.last_prediction = None
            return robot

    def training_state(self) -> dict:
        """Everything needed to continue training exactly where this model is, as tensors and plain
        Python data only (frames as uint8 tensors, no pickled objects): weights, optimizer state,
        counters, random generator states, replay buffer, the loop's history and the latest
        products the views show. The robot, its selector and device plumbing are not included.
        ``load_training_state`` restores it into a model of the same config."""
        with self.lock:
            products = self._train_products
            return {
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": portable_optimizer_state(self.optimizer.state_dict()),
                "mask_rng": self.mask_rng.get_state(),
                "replay_rng": self.replay_rng.bit_generator.state,
                "step": int(self.step),
                "iteration": int(self.iteration),
                "interleaved_history": [_to_tensor(x) if _is_frame(x) else dict(x) for x in self.interleaved_history],
                "replay_buffer": [_to_tensor(c) for c in self.replay_buffer],
                "train_products": None if products is None else {
                    "canvas": _to_tensor(products.canvas), "mask": products.mask.cpu(), "pred": products.pred.cpu(),
                    "last_input": products.last_input.cpu(),
                    "full": None if products.full is None else products.full.cpu()},
                **{name: _to_tensor(getattr(self, name)) for name in _PARKED_FRAMES},
                "last_training_mask": None if self.last_training_mask is None else self.last_training_mask.cpu(),
                **{name: getattr(self, name) for name in _PARKED_NUMBERS},
            }

    def load_training_state(self, state: dict) -> None:
        """Restore what ``training_state`` returned (the inverse of it); the robot stays as it is."""
        with self.lock:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._forget_graphs()  # new optimizer state tensors: a recorded step would use the old ones
            self.mask_rng.set_state(state["mask_rng"])
            self.replay_rng.bit_generator.state = state["replay_rng"]
            self.step, self.iteration = int(state["step"]), int(state["iteration"])
            self.interleaved_history = [_to_array(x) if torch.is_tensor(x) else dict(x)
                                        for x in state["interleaved_history"]]
            self.replay_buffer.clear()
            self.replay_buffer.extend(_to_array(c) for c in state["replay_buffer"])
            products = state["train_products"]
            self._train_products = None if products is None else _TrainProducts(
                canvas=_to_array(products["canvas"]), mask=products["mask"],
                pred=products["pred"].to(self.device), last_input=products["last_input"].to(self.device),
                full=None if products["full"] is None else products["full"].to(self.device))
            for name in _PARKED_FRAMES:
                setattr(self, name, _to_array(state[name]))
            self.last_training_mask = state["last_training_mask"]
            for name in _PARKED_NUMBERS:
                setattr(self, name, state[name])

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
                self.train_autoencoder(canvas, deferred=True)
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
            train = self.read_training_step() if trained else None  # on a GPU, ready since the prediction came back

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
            "optimizer": portable_optimizer_state(self.optimizer.state_dict()),
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
        path = Path(path) if path is not None else config.CHECKPOINT_PATH
        with self.lock:
            payload = self._checkpoint_payload(extra)
        return write_checkpoint(path, payload, replace=replace)

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> dict:
        """Load a checkpoint saved by ``save_checkpoint``; returns a summary dict.

        Only plain tensors and containers are unpickled (``weights_only=True``), so a file cannot
        run code. A file that is missing, corrupt, of another architecture or without weights
        raises ``CheckpointError`` and leaves the live model and optimizer untouched.

        A file that differs from ``config`` only in fields a new model can take on
        (``config.ADOPTED_FROM_CHECKPOINT``: the decoder's position code and mode, which change no
        weight) is loaded into a model and optimizer built with the file's values, which then
        replace this model's; ``config`` holds those values from then on, so later saves record them.
        """
        path = Path(path) if path is not None else config.CHECKPOINT_PATH
        payload = read_checkpoint(path)
        adopted = self.config.adopting(payload.get("architecture") if isinstance(payload, dict) else None)
        if adopted != self.config:
            return self._load_into_new_model(payload, path, adopted)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        model_state, optim_state = validate_payload(payload, path, self.config.architecture(),
                                                    self.model.state_dict(), params)
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

    def _load_into_new_model(self, payload: dict, path: Path, cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict:
        """Load a checkpoint into a new model and optimizer built with ``cfg`` (the file's decoder code),
        then put them in this model's place; a refused file changes nothing here."""
        try:
            with torch.random.fork_rng(devices=[]):  # the new model's initial weights leave the seeded streams alone
                model = TargetedMAEWrapper(cfg).to(self.device)
        except ValueError as e:  # a file that claims a decoder code no model of its sizes can have
            raise CheckpointError(f"{path.name} records a decoder this model cannot be built with: {str(e)[:200]}") from e
        optimizer = configure_optimizer(model, cfg)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        model_state, optim_state = validate_payload(payload, path, cfg.architecture(), model.state_dict(), params)
        try:
            model.load_state_dict(model_state, strict=True)
            if optim_state is not None:
                optimizer.load_state_dict(optim_state)
        except Exception as e:
            raise CheckpointError(f"{path.name} does not fit this model: {str(e)[:200]}") from e
        with self.lock:
            self.config, self.model, self.optimizer = cfg, model, optimizer
            self._forget_graphs()  # they were recorded on the replaced model
            self.step = int(payload.get("step", 0))
            self.iteration = int(payload.get("iteration", 0))
        return {"path": str(path), "step": self.step, "iteration": self.iteration}
