"""All tunables of the Concat World Model Explorer, in one place.

Every value is read-only data: frozen dataclasses (nanoGPT's ``GPTConfig``, CleanRL's ``Args``).
Code that needs a variant builds a new object with ``dataclasses.replace(cfg, ...)``; derived
sizes (canvas width, patch grid) are properties, never stored twice.

Importing this module reads no environment variable: a program's ``main()`` calls ``from_env()``
once, which applies ``CWM_SAVED_ROOT`` and returns the app and model settings built from the other
``CWM_*`` variables, and passes them down.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

# -----------------------------------------------------------------------------
# paths

PROJECT_ROOT = Path(__file__).resolve().parent  # the folder holding this file
LOGGER_NAME = "concat_world_model_explorer"  # the app's logger; the engine logs to its child "<this>.engine"
SAVED_ROOT = PROJECT_ROOT / "saved"  # all user data lives below here ($CWM_SAVED_ROOT through from_env())
SESSIONS_ROOT = SAVED_ROOT / "sessions" / "toroidal_dot"  # one folder per recorded session
CHECKPOINT_DIR = SAVED_ROOT / "checkpoints" / "toroidal_dot"  # where the world model keeps its weights
CHECKPOINT_PATH = CHECKPOINT_DIR / "autoencoder.pth"  # the default checkpoint file (spec "Model Checkpoints")


def use_saved_root(root: str | os.PathLike) -> None:
    """Keep all user data below ``root``: sets ``SAVED_ROOT``, ``SESSIONS_ROOT``, ``CHECKPOINT_DIR`` and
    ``CHECKPOINT_PATH``, which the functions defaulting to them read when called."""
    global SAVED_ROOT, SESSIONS_ROOT, CHECKPOINT_DIR, CHECKPOINT_PATH
    SAVED_ROOT = Path(root)
    SESSIONS_ROOT = SAVED_ROOT / "sessions" / "toroidal_dot"
    CHECKPOINT_DIR = SAVED_ROOT / "checkpoints" / "toroidal_dot"
    CHECKPOINT_PATH = CHECKPOINT_DIR / "autoencoder.pth"


# -----------------------------------------------------------------------------
# environment


@dataclass(frozen=True)
class ToroidalDotConfig:
    """The toroidal dot world: a white dot on a black square that wraps at its edges."""

    img_size: int = 224  # frame height and width in pixels
    dot_radius: int = 5  # dot radius in pixels (a filled disc of about 80 pixels)
    move_pixels: int = 27  # how far action 1 ("move right") shifts the dot, in pixels


# -----------------------------------------------------------------------------
# session files


@dataclass(frozen=True)
class RecordingConfig:
    """How sessions are written to disk."""

    shard_size: int = 1000  # events per events_shard_NNN.jsonl file
    frame_format: str = "png"  # lossless; the reader also accepts the original tools' .jpg frames
    max_session_bytes: int | None = None  # stop a recording (never delete) once a session exceeds this; None = no limit


# -----------------------------------------------------------------------------
# world model

# architecture fields a model made for a checkpoint takes on from the file (they change no weight: the decoder's
# fixed position code and which tokens its blocks compute), each with the value a file that does not record it
# was trained with (such files are older than the field)
ADOPTED_FROM_CHECKPOINT = MappingProxyType({"decoder_position": "canvas", "decoder_mode": "self"})


@dataclass(frozen=True)
class AutoencoderConcatPredictorWorldModelConfig:
    """Canvas, model and optimiser settings of the canvas-inpainting world model.

    The spec's numbers are the defaults: 224x224 frames, 8 px separators, 3 frames of history
    (a 224x688 canvas), 16 px patches, the whole last slot masked.
    """

    # canvas -----------------------------------------------------------------
    frame_size: tuple[int, int] = (224, 224)  # (height, width) of one frame slot in pixels
    separator_width: int = 8  # width in pixels of the action-coloured band between frames
    canvas_history_size: int = 3  # frame slots on a canvas: 2 of history + the one to predict
    in_chans: int = 3  # RGB

    # masking ----------------------------------------------------------------
    patch_size: int = 16  # ViT patch side in pixels: 224x688 -> a 14 x 43 grid of 602 patches
    mask_ratio: float = 1.0  # share of the last slot's patches masked per training canvas (random ones below 1.0); prediction masks the whole slot

    # MAE ViT (decoder depth and heads fixed by the spec; widths chosen for learning per second) ---------
    embed_dim: int = 128  # encoder token width; narrower than the spec's 256 for more iterations per second
    depth: int = 1  # encoder blocks: the decoder does the look-ups, the encoder only describes each patch
    num_heads: int = 4  # encoder attention heads
    decoder_embed_dim: int = 64  # decoder token width; narrow, so an iteration is cheap
    decoder_depth: int = 5  # decoder blocks (the attention explorer shows layers 0-4)
    decoder_num_heads: int = 4  # decoder attention heads (the attention explorer shows heads 0-3)
    mlp_ratio: float = 2.0  # MLP hidden width / token width in every block; below the usual 4, so an iteration is cheap
    decoder_position: str = "torus"  # decoder position code: "torus" (2-D sin-cos over the canvas, plus each patch's column round its frame and its slot, so look-ups wrap at frame edges; a decoder >= 64 wide) or "canvas" (the sin-cos alone; checkpoints from before the field) ($CWM_DECODER_POSITION)
    decoder_mode: str = "cross_self"  # "cross_self": the 196 masked tokens are the decoder's only queries, over visible + masked keys (CrossMAE); "self": the MAE decoder, every token a query; "cross", "cross_mlp": visible keys only

    # optimisation -----------------------------------------------------------
    learning_rate: float = 6e-4  # AdamW peak rate; higher rates localised the dot less precisely
    weight_decay: float = 0.05  # AdamW decay on weight matrices only (never on biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas, the MAE recipe
    warmup_steps: int = 30  # linear warm-up length in optimizer steps; short, so learning starts at once
    lr_decay_steps: int = 20_000  # cosine decay horizon in optimizer steps; the rate then stays at min_lr
    min_lr: float = 1e-5  # floor of the cosine schedule
    grad_clip: float = 1.0  # max gradient norm; keeps a rare large dot error from blowing up a step

    correspondence_init_layers: int = 1  # decoder blocks that start out reading the same place one slot back (0 = none)
    correspondence_offsets: tuple[float, ...] = (-0.5, 0.5, 1.5, 2.5)  # per head, columns read past the 14.5 slot pitch
    correspondence_gain: float = 16.0  # query scale of that look-up: ~99% of a query's weight on its source at init
    decoder_embed_init_gain: float = 0.25  # initial token content scale, low so the look-ups land on positions
    action_lookup_heads: int = 1  # heads of the next decoder block that start out reading the action band
    zero_init_pred_head: bool = True  # the first predictions are black frames, far closer than noise

    # loss ------------------------------------------------------------------
    foreground_weight: float = 2.0  # weight of a dot pixel over a background one; unweighted, black frames win; 5 made the torus code's dot drift and swell
    foreground_weight_final: float | None = None  # anneal geometrically to this value; None keeps foreground_weight
    foreground_weight_decay_steps: int = 400  # length of that anneal in optimizer steps
    foreground_threshold: float = 0.5  # a target pixel brighter than this (0-1 scale) counts as dot

    # batch of the one optimizer step ---------------------------------------
    replay_batch_size: int = 3  # replayed canvases added to the current one (batch of 4): both actions, many places
    replay_buffer_size: int = 64  # recent training canvases kept for that (uint8, ~0.46 MB each)
    torus_roll: bool = True  # roll each replayed canvas by a random (dy, dx): a true transition elsewhere on the torus

    # quality gate -------------------------------------------------------------
    canvas_inpainting_threshold: float = 0.0001  # spec: with the gate on, train until the masked loss is below this
    quality_gate: bool = False  # off by default: one optimizer step per iteration keeps the loop live
    quality_gate_max_steps: int = 20  # cap on extra steps one iteration may spend with the gate on

    # device execution ------------------------------------------------------------
    cpu_precision: str = "fp32"  # on a CPU: "fp32", "bf16" autocast over fp32 master weights, or "auto" (bf16 where the CPU has AMX) ($CWM_CPU_PRECISION)
    cuda_precision: str = "bf16"  # on CUDA: "bf16" autocast over fp32 master weights, or "fp32" ($CWM_CUDA_PRECISION)
    cuda_graphs: bool = True  # on CUDA: replay the loop's training step and prediction as CUDA graphs ($CWM_CUDA_GRAPHS=0: off)
    cuda_graph_warmup: int = 3  # eager steps (on a side stream) before a graph is recorded, as CUDA graph capture asks

    # run ------------------------------------------------------------------
    seed: int = 0  # seeds torch, numpy and python's random in one place

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AutoencoderConcatPredictorWorldModelConfig:
        """The defaults with ``CWM_DECODER_POSITION``, ``CWM_CPU_PRECISION``, ``CWM_CUDA_PRECISION`` and
        ``CWM_CUDA_GRAPHS`` applied."""
        env = os.environ if environ is None else environ
        return cls(decoder_position=env.get("CWM_DECODER_POSITION", cls.decoder_position),
                   cpu_precision=env.get("CWM_CPU_PRECISION", cls.cpu_precision),
                   cuda_precision=env.get("CWM_CUDA_PRECISION", cls.cuda_precision),
                   cuda_graphs=env.get("CWM_CUDA_GRAPHS", "1") != "0")

    # derived sizes --------------------------------------------------------------
    @property
    def canvas_size(self) -> tuple[int, int]:
        """(height, width) of the canvas: frames side by side with a separator between each pair."""
        h, w = self.frame_size
        k = self.canvas_history_size
        return h, k * w + (k - 1) * self.separator_width

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid over the canvas."""
        h, w = self.canvas_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens on the canvas (CLS excluded)."""
        gh, gw = self.grid_size
        return gh * gw

    def architecture(self) -> dict:
        """The fields a checkpoint must agree on to be loadable into this model."""
        return {
            "frame_size": list(self.frame_size),
            "separator_width": self.separator_width,
            "canvas_history_size": self.canvas_history_size,
            "in_chans": self.in_chans,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "decoder_embed_dim": self.decoder_embed_dim,
            "decoder_depth": self.decoder_depth,
            "decoder_num_heads": self.decoder_num_heads,
            "mlp_ratio": self.mlp_ratio,
        } | {name: getattr(self, name) for name, older in ADOPTED_FROM_CHECKPOINT.items()  # only when not what
             if getattr(self, name) != older}  # the older checkpoints (without the field) were trained with

    def adopting(self, architecture) -> AutoencoderConcatPredictorWorldModelConfig:
        """The settings of a model made for a checkpoint of ``architecture`` (what the file records): these,
        with the file's values of the ``ADOPTED_FROM_CHECKPOINT`` fields when the file differs from these
        settings in those fields alone; these unchanged otherwise (the file is then refused as another
        architecture)."""
        if not isinstance(architecture, dict):
            return self
        fixed = {k: v for k, v in self.architecture().items() if k not in ADOPTED_FROM_CHECKPOINT}
        if {k: v for k, v in architecture.items() if k not in ADOPTED_FROM_CHECKPOINT} != fixed:
            return self
        adopted = replace(self, **{name: architecture.get(name, older) for name, older in ADOPTED_FROM_CHECKPOINT.items()})
        return self if adopted == self else adopted


# -----------------------------------------------------------------------------
# app


@dataclass(frozen=True)
class AppConfig:
    """Web app defaults (spec "Server Settings")."""

    host: str = "0.0.0.0"  # listen address; 127.0.0.1 keeps the app private to this machine
    port: int = 7860  # listen port
    min_iterations: int = 1  # smallest Run request
    max_iterations: int = 500  # largest Run request (spec: 1-500)
    default_iterations: int = 20  # Run box default
    torch_threads: int = 0  # torch CPU threads of a run, or of a batched analysis, each in a thread of its own; the server's other threads compute with one ($CWM_TORCH_THREADS); 0: every core on a machine of 1 or 2 (measured: 2 threads beat 1 in the page on 2 cores), one core fewer on a bigger one (the page's work gets a core), at most 4
    run_views_every: int = 3  # while a run goes, the training views, prediction canvas and graphs are redrawn every this many updates (the progress and predicted frame every update): every 3 s
    update_interval_s: float = 1.0  # the page shows a running Run's latest state this often; the training never waits for it, but each update's work in the server and the browser takes CPU from it (Chromium, 2 cores, Run 300: 49.8 s at 0.5 s, 46.9 s at 1 s; docs/SPEED.md, "The page's share")
    run_lock_wait_s: float = 5.0  # a Run waits this long for the tab's previous run to wind down
    stop_wait_s: float = 30.0  # Stop waits this long for the run to end so it can show the final state
    stop_grace_s: float = 1.0  # a Stop that finds nothing running also stops a Run that starts within this long (still queued)
    idle_park_s: float = 300.0  # ($CWM_IDLE_PARK_S) a model unused this long is saved to a temporary file and freed; its tab's next event reloads it
    max_resident_models: int = 4  # models kept in memory at once; beyond that the least recently used idle one is parked
    park_sweep_s: float = 15.0  # how often idle models are looked for
    mkl_cbwr: str = "AUTO,STRICT"  # MKL's reproducibility mode, set as $MKL_CBWR at start unless the environment has one: with STRICT every thread gets the same sums whatever its memory's alignment, so a run in the page takes exactly the bare loop's iterations (without it the two part after ~27 iterations); no measurable cost at 2 threads, ~8% at 1 (docs/SPEED.md); "" leaves MKL's default
    malloc_arenas: int = 2  # ($CWM_MALLOC_ARENAS) glibc malloc arenas (MALLOC_ARENA_MAX); 0 keeps glibc's default (8 per core)
    park_dir: str | None = None  # ($CWM_PARK_DIR) where parked models go (default: the system temp folder; avoid a RAM-backed tmpfs); the app makes a private 0700 folder inside and refuses one another account could change
    park_retry_s: float = 60.0  # a model whose parking failed (a full disk) is not tried again for this long; each cause is logged once
    dot_window: int = 50  # predictions in the rolling 'within 3 px' share of the Dot found graph
    error_window: int = 10  # predictions in the rolling means of the Prediction error graph (its strong lines)
    default_quantile: float = 99.8  # attention filter: keep connections above this percentile (strongest 0.2%: ~800 lines a person can follow)
    max_rollout_steps: int = 20  # longest open-loop rollout the Analysis section imagines
    default_rollout_steps: int = 5  # its Steps box default
    max_canvas_steps: int = 200  # most optimizer steps one single-canvas training may take
    default_canvas_steps: int = 50  # its Steps box default
    max_record_steps: int = 10_000  # longest recording the page starts (about 40 MB of PNG frames)
    max_recordings: int = 2  # recordings the page runs at once, all tabs together (one per tab)
    record_orphan_s: float = 10.0  # a recording whose page has not asked for its progress this long (a client gone without a word) stops
    record_budget_bytes: int = 1 * 2**30  # ($CWM_RECORD_BUDGET_MB) the sessions folder stops growing through page recordings at this size; 0: the page records nothing
    history_snapshots: int = 500  # run-history pictures kept per tab (thinned evenly when full)
    history_bytes: int = 100 * 2**20  # and at most this many bytes of them (zlib-compressed frames)
    history_play_frames: int = 60  # Play steps through at most this many of them (evenly spread)
    evaluation_batch: int = 16  # canvases per forward pass when a whole session is evaluated (bounds its activation memory)
    max_play_steps: int = 50  # most actions one play (from frame t to Reset) may take, typed or pressed; bounds its frames in memory
    compare_top_frames: int = 5  # transitions shown where two compared models disagree most
    demo_sessions: tuple[str, ...] = ("always_move", "alternate", "double_move")  # recorded when none exist
    demo_session_steps: int = 200  # steps in each demo session
    tensorboard_dir: str | None = None  # ($CWM_TENSORBOARD_DIR) TensorBoard logs go here, one run folder per tab; None: off
    tensorboard_images_every: int = 50  # TensorBoard: the current, predicted and error pictures every this many iterations
    tensorboard_flush_s: float = 10.0  # TensorBoard: logged values reach the disk at least this often

    def run_threads(self) -> int:
        """``torch_threads``, or for 0: this machine's cores when it has 1 or 2, else one core fewer (at most 4)."""
        cores = os.cpu_count() or 1
        return self.torch_threads or min(4, cores if cores <= 2 else cores - 1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppConfig:
        """The defaults with ``CWM_IDLE_PARK_S``, ``CWM_TORCH_THREADS``, ``CWM_MALLOC_ARENAS``, ``CWM_PARK_DIR``
        ``CWM_TENSORBOARD_DIR`` and ``CWM_RECORD_BUDGET_MB`` (mebibytes) applied."""
        env = os.environ if environ is None else environ
        app = cls()
        budget = env.get("CWM_RECORD_BUDGET_MB")
        return replace(app, idle_park_s=float(env.get("CWM_IDLE_PARK_S", app.idle_park_s)),
                       torch_threads=int(env.get("CWM_TORCH_THREADS", app.torch_threads)),
                       malloc_arenas=int(env.get("CWM_MALLOC_ARENAS", app.malloc_arenas)),
                       park_dir=env.get("CWM_PARK_DIR") or None,
                       tensorboard_dir=env.get("CWM_TENSORBOARD_DIR") or None,
                       record_budget_bytes=app.record_budget_bytes if not budget else max(0, int(float(budget) * 2**20)))


# -----------------------------------------------------------------------------
# overrides typed on a command line


def with_overrides(cfg, items: Sequence[str]):
    """``cfg`` (any of the dataclasses above) with ``FIELD=VALUE`` overrides applied, for experiments
    from a command line. VALUE is JSON (``32``, ``0.5``, ``true``, ``[1, 2]``, ``null``), or plain
    text for a text field; it must have the field's type (a whole number for an int field).

    Raises:
        ValueError: naming the item that is not FIELD=VALUE, names no field, or has a wrong value.
    """
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{item!r} is not FIELD=VALUE with a field of {type(cfg).__name__} (see config.py)")
        current = getattr(cfg, key)
        try:
            value = text if isinstance(current, str) else json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{item!r}: {text!r} is not a JSON value") from None
        changes[key] = _typed(key, value, current)
    return replace(cfg, **changes)


def _typed(key: str, value, current):
    """``value`` as the type of the field's ``current`` value; ValueError when it is not one."""
    if current is None or isinstance(current, str):
        return value  # optional fields take any JSON value; text fields take the text
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    kinds = {bool: (bool,), int: (int,), float: (int, float)}.get(type(current), (type(current),))
    if isinstance(value, bool) != isinstance(current, bool) or not isinstance(value, kinds):
        raise ValueError(f"{key} must be {type(current).__name__} like {json.dumps(current)}, got {json.dumps(value)}")
    return type(current)(value)


# -----------------------------------------------------------------------------
# the environment, read once


def from_env(environ: Mapping[str, str] | None = None) -> tuple[AppConfig, AutoencoderConcatPredictorWorldModelConfig]:
    """Read the ``CWM_*`` variables once, in a program's ``main()``: ``CWM_SAVED_ROOT`` moves the data
    folder (``use_saved_root``); returns the app and world-model settings built from the others."""
    env = os.environ if environ is None else environ
    if env.get("CWM_SAVED_ROOT"):
        use_saved_root(env["CWM_SAVED_ROOT"])
    return AppConfig.from_env(env), AutoencoderConcatPredictorWorldModelConfig.from_env(env)
