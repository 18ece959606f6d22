"""All tunables of the Concat World Model Explorer, in one place.

Every value is read-only data: frozen dataclasses (nanoGPT's ``GPTConfig``, CleanRL's ``Args``).
Code that needs a variant builds a new object with ``dataclasses.replace(cfg, ...)``; derived
sizes (canvas width, patch grid) are properties, never stored twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# -----------------------------------------------------------------------------
# paths

PROJECT_ROOT = Path(__file__).resolve().parent  # the folder holding this file
SAVED_ROOT = Path(os.environ.get("CWM_SAVED_ROOT", PROJECT_ROOT / "saved"))  # all user data lives below here
SESSIONS_ROOT = SAVED_ROOT / "sessions" / "toroidal_dot"  # one folder per recorded session
CHECKPOINT_DIR = SAVED_ROOT / "checkpoints" / "toroidal_dot"  # where the world model keeps its weights
CHECKPOINT_PATH = CHECKPOINT_DIR / "autoencoder.pth"  # the default checkpoint file (spec "Model Checkpoints")

RECORDING_MODE = False  # spec flag: True makes record_session.py the intended entry point; the app ignores it


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
    """How sessions are written to disk (format in DESIGN.md)."""

    shard_size: int = 1000  # events per events_shard_NNN.jsonl file
    frame_format: str = "png"  # lossless; the reader also accepts the seed's older .jpg frames
    max_session_bytes: int | None = None  # stop a recording (never delete) once a session exceeds this; None = no limit


# -----------------------------------------------------------------------------
# world model


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
    mask_ratio: float = 1.0  # fraction of the last slot's patches masked; 1.0 = predict the whole next frame

    # MAE ViT (sizes fixed by DESIGN.md) ---------------------------------------
    embed_dim: int = 256  # encoder token width
    depth: int = 5  # encoder blocks
    num_heads: int = 4  # encoder attention heads
    decoder_embed_dim: int = 128  # decoder token width
    decoder_depth: int = 5  # decoder blocks (the attention explorer shows layers 0-4)
    decoder_num_heads: int = 4  # decoder attention heads (the attention explorer shows heads 0-3)
    mlp_ratio: float = 4.0  # MLP hidden width / token width in every block

    # optimisation -----------------------------------------------------------
    learning_rate: float = 1e-3  # AdamW peak learning rate (the reference 1e-4 barely moves in minutes;
    # always_move: 2e-3 had 4% within 3 px and a median error of 53 px at 250 its where 1e-3 had 28% and
    # 5.5 px; 5e-4 had 0% and 80 px at 200 its where 1e-3 had 22% and 12.5 px)
    weight_decay: float = 0.05  # AdamW decay on weight matrices only (never on biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas, the MAE recipe
    warmup_steps: int = 30  # linear warm-up length in optimizer steps (600 wasted the first minutes)
    lr_decay_steps: int = 20_000  # cosine decay horizon in optimizer steps; the rate then stays at min_lr
    min_lr: float = 1e-5  # floor of the cosine schedule
    grad_clip: float = 1.0  # max gradient norm; keeps a rare large dot error from blowing up a step

    correspondence_init_layers: int = 1  # decoder blocks whose attention starts out looking at the same
    # place in the previous frame slot (0 = MAE's random init). With random init, each masked query
    # attends ~uniformly to 600 tokens, the dot's signal is diluted 600x and nothing is learned in
    # minutes; see models.masked_autoencoder_vit.init_correspondence_attention
    correspondence_offsets: tuple[float, ...] = (-0.5, 0.5, 1.5, 2.5)  # per head: extra columns beyond the
    # slot pitch (14.5 patches), i.e. whole-patch shifts of 14, 15, 16 and 17 columns. "Stay" reads
    # columns 14-15 to the left, "move 27 px" columns 16 (13 px of the patch) and 17 (3 px). Whole
    # shifts let each head read ONE source patch; the earlier half-patch offsets made every head
    # average two neighbours (and alias onto masked tokens), which blurred the dot sideways
    correspondence_gain: float = 16.0  # sharpness of that initial attention (query scale): at 16 a masked
    # query puts ~99% of its weight on its source patch at init (8: ~50%, the rest on neighbours/masked tokens)
    decoder_embed_init_gain: float = 0.25  # with correspondence init: scale of the initial content projection.
    # The decoder's LayerNorm mixes content and position; at 1.0 a patch's content outweighs its position
    # and the look-up lands on masked tokens instead of the previous slot (measured at init). With the
    # whole-patch offsets and gain 16, 0.25 learned fastest (always_move, 500 its: 60% within 3 px in the
    # last 50 vs 26% with the old setting); 0.5 never localised the dot (median error ~80 px at 200 its)
    action_lookup_heads: int = 1  # heads of the NEXT decoder block that start out reading the separator
    # band before the predicted slot (the action just taken), so a masked patch can tell "stay" from
    # "move". alternate, 400 its: 12-20% within 3 px, median 14-16 px with it; 0-2%, median 75-95 px without
    # (always_move is within noise either way: 34-36% vs 34-60% at 450-500 its)
    zero_init_pred_head: bool = True  # start the pixel head at exactly 0: the first predictions are black
    # frames, already close (MSE ~0.0016), instead of xavier noise (MSE ~0.25) the model must unlearn

    # loss ------------------------------------------------------------------
    foreground_weight: float = 20.0  # dot pixels count this many times a background pixel (1 = plain MSE;
    # with the old init, 5 drew no dot until ~250 its, then 16-34% within 3 px at MSE ratio 0.67-1.04;
    # 20 finds the dot sooner but overestimates the blob, ~200-400 bright px vs 80; 5-10 with the
    # current init is untested):
    # the dot is ~80 of 50,176 pixels, so a plain MSE is minimised by predicting black everywhere
    foreground_weight_final: float | None = None  # None = keep foreground_weight; else anneal to this value
    # geometrically over foreground_weight_decay_steps (a large weight finds the dot, a small one would
    # keep the predicted blob dot-sized). Off: 20 -> 3 over 300 steps lost the dot again (no dot predicted
    # at 350-400 its); a later or gentler anneal is untested
    foreground_weight_decay_steps: int = 400  # length of that anneal in optimizer steps
    foreground_threshold: float = 0.5  # a target pixel brighter than this (0-1 scale) counts as dot

    # replay ------------------------------------------------------------------
    replay_batch_size: int = 0  # earlier canvases added to each optimizer step (0 = the current canvas only;
    # 1 was no better per iteration, 16% within 3 px at 250 its vs 28%, and costs ~1.5x time per iteration)
    replay_buffer_size: int = 512  # how many recent training canvases the replay draws from

    # quality gate -------------------------------------------------------------
    canvas_inpainting_threshold: float = 0.0001  # spec: with the gate on, train until the masked loss is below this
    quality_gate: bool = False  # off by default: one optimizer step per iteration keeps the loop live
    quality_gate_max_steps: int = 20  # cap on extra steps one iteration may spend with the gate on

    # run ------------------------------------------------------------------
    seed: int = 0  # seeds torch, numpy and python's random in one place

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
        }


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
    update_interval_s: float = 0.25  # a running Run streams to the page once this much time has passed since
    # the last update (checked after each iteration): at ~0.28 s per CPU iteration 0.4 gave 1.8 updates/s, 0.25 gives one per iteration
    default_quantile: float = 95.0  # attention filter: keep connections above this percentile (strongest 5%)
    demo_sessions: tuple[str, ...] = ("always_move", "alternate", "double_move")  # recorded when none exist
    demo_session_steps: int = 200  # steps in each demo session
