"""Canvas building, last-slot patch masks and the targeted MAE wrapper.

A canvas puts the recent frames side by side with a thin action-coloured band between each
pair, ``[f(t-2)][a][f(t-1)][a][f(t)]``; masking every patch of the last slot turns next-frame
prediction into inpainting (the spec's "Canvas-Based Architecture"). Everything here is pure and
vectorised: arrays in, arrays out, no loops over frames, patches or pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from config import AutoencoderConcatPredictorWorldModelConfig
from models.masked_autoencoder_vit import (
    MaskedAutoencoderViT,
    capture_attention,
    init_column_lookup_attention,
    init_correspondence_attention,
    init_torus_correspondence_attention,
    patchify,
    patchify_channels_last,
    unpatchify,
)
from toroidal_dot_robot import parse_action

# separator colour per action (RGB): stay red, move green; any other integer action is drawn blue
ACTION_COLOURS = np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8)
UNKNOWN_ACTION_COLOUR = np.array([0, 0, 255], dtype=np.uint8)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int, np.integer)) else (int(x[0]), int(x[1]))


def separator_colours(actions: Sequence) -> np.ndarray:
    """RGB colour of each action's separator band: stay red, move green, any other integer blue.

    Args:
        actions: action dicts (``{'action': a}``) or ints, length A.

    Returns:
        uint8 array (A, 3).

    Raises:
        ValueError: an entry that is not an action (``toroidal_dot_robot.parse_action``).
    """
    values = np.array([parse_action(a, valid=None) for a in actions], dtype=np.int64)  # (A,)
    known = (values >= 0) & (values < len(ACTION_COLOURS))
    colours = ACTION_COLOURS[np.clip(values, 0, len(ACTION_COLOURS) - 1)]  # (A, 3)
    return np.where(known[:, None], colours, UNKNOWN_ACTION_COLOUR[None, :]).astype(np.uint8)


def build_canvas(interleaved: Sequence, frame_size: int | Sequence[int] = (224, 224), sep_width: int = 8) -> np.ndarray:
    """Concatenate frames horizontally with an action-coloured separator between each pair.

    Args:
        interleaved: ``[frame, action, frame, action, ..., frame]`` or the same ending in an action,
            in which case a black slot is appended for the frame to predict. Frames are uint8
            (H, W, 3); actions are ``{'action': int}`` dicts or ints.
        frame_size: (H, W) every frame must have.
        sep_width: separator width in pixels.

    Returns:
        uint8 canvas (H, K * W + (K - 1) * sep_width, 3), K = number of frame slots.
    """
    H, W = _pair(frame_size)
    frames = list(interleaved[0::2])
    actions = list(interleaved[1::2])
    if not frames:
        raise ValueError("build_canvas needs at least one frame")
    if len(actions) == len(frames):  # ends in an action: the next frame's slot is blank
        frames.append(np.zeros((H, W, 3), dtype=np.uint8))
    bad = [np.asarray(f) for f in frames if np.asarray(f).shape != (H, W, 3) or np.asarray(f).dtype != np.uint8]
    if bad:
        raise ValueError(f"frames must be uint8 {(H, W, 3)}, got {bad[0].dtype} {bad[0].shape}")
    stacked = np.stack(frames)  # (K, H, W, 3)
    K = stacked.shape[0]
    if K == 1:
        return stacked[0].copy()
    seps = np.broadcast_to(separator_colours(actions)[:, None, None, :], (K - 1, H, sep_width, 3))  # (K-1, H, sep, 3)
    pairs = np.concatenate([stacked[:-1], seps], axis=2)  # (K-1, H, W+sep, 3)
    body = pairs.transpose(1, 0, 2, 3).reshape(H, (K - 1) * (W + sep_width), 3)  # (H, (K-1)(W+sep), 3)
    return np.ascontiguousarray(np.concatenate([body, stacked[-1]], axis=1))  # (H, K*W + (K-1)*sep, 3)


def build_prediction_canvases(frames: np.ndarray, actions: np.ndarray, sep_width: int = 8) -> np.ndarray:
    """A batch of prediction canvases ``[f][a][f][a]...[blank]`` at once (``build_canvas`` for
    histories that end in an action, without a loop over the batch).

    Args:
        frames: uint8 (B, K-1, H, W, 3), each canvas's history frames, oldest first.
        actions: int (B, K-1), the action taken after each of those frames.
        sep_width: separator width in pixels.

    Returns:
        uint8 (B, H, K * W + (K - 1) * sep_width, 3) with the last slot black.
    """
    frames = np.asarray(frames)
    B, n, H, W, _ = frames.shape
    if frames.dtype != np.uint8 or np.shape(actions) != (B, n):
        raise ValueError(f"frames must be uint8 (B, K-1, H, W, 3) and actions (B, K-1), got {frames.dtype} "
                         f"{frames.shape} and {np.shape(actions)}")
    seps = separator_colours(np.asarray(actions).reshape(-1)).reshape(B, n, 1, 1, 3)  # (B, K-1, 1, 1, 3)
    seps = np.broadcast_to(seps, (B, n, H, sep_width, 3))  # (B, K-1, H, sep, 3)
    pairs = np.concatenate([frames, seps], axis=3)  # (B, K-1, H, W+sep, 3)
    body = pairs.transpose(0, 2, 1, 3, 4).reshape(B, H, n * (W + sep_width), 3)  # (B, H, (K-1)(W+sep), 3)
    blank = np.zeros((B, H, W, 3), np.uint8)
    return np.concatenate([body, blank], axis=2)  # (B, H, K*W + (K-1)*sep, 3)


def canvas_to_tensor(canvas: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 canvas (H, W, 3) or batch (B, H, W, 3) -> float tensor (B, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.asarray(canvas), device=device)
    if x.ndim == 3:
        x = x.unsqueeze(0)  # (1, H, W, 3)
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()  # (B, 3, H, W)


def canvas_to_patches(canvas: np.ndarray, patch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 canvas (H, W, 3) or batch (B, H, W, 3) -> float patches (B, L, p*p*3) in [0, 1], equal to
    ``patchify(canvas_to_tensor(canvas), p)``: cut on uint8 in the canvas's own layout, moved to the
    device as uint8 (a quarter of the bytes), converted there."""
    x = torch.as_tensor(np.asarray(canvas))
    if x.ndim == 3:
        x = x.unsqueeze(0)  # (1, H, W, 3)
    if x.device.type == "cpu" and torch.device(device or "cpu").type == "cuda":
        x = x.pin_memory()  # an asynchronous upload
    x = x.to(device, non_blocking=True)  # (B, H, W, 3) uint8
    return patchify_channels_last(x, patch_size).float().div_(255.0)  # (B, L, p*p*3)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float image tensor (3, H, W) or (B, 3, H, W) in [0, 1] -> uint8 (H, W, 3) or (B, H, W, 3)."""
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return (x.permute(1, 2, 0) if x.ndim == 3 else x.permute(0, 2, 3, 1)).numpy()


def roll_canvas_frames(canvases: np.ndarray, shifts: np.ndarray, frame_size, sep_width: int) -> np.ndarray:
    """Roll every frame slot of each canvas by that canvas's own (dy, dx), separators kept in place.

    The toroidal world wraps at its edges, so a transition rolled as a whole is another true
    transition with the dot elsewhere: a free, exact augmentation that takes away any prior on
    where the dot lives (the live robot never leaves its row).

    Args:
        canvases: uint8 (B, H, W_canvas, 3) canvases of frames and separators.
        shifts: int (B, 2) rows down and columns right to roll each canvas's frames by.
        frame_size: (H, W) of one frame slot.
        sep_width: separator width in pixels.

    Returns:
        uint8 (B, H, W_canvas, 3), a new array.
    """
    H, W = _pair(frame_size)
    B, _, Wc, _ = canvases.shape
    pitch = W + sep_width
    x = np.arange(Wc)  # (Wc,) canvas columns
    slot_x0, within = (x // pitch) * pitch, x % pitch  # first column of each column's slot; offset in it
    in_frame = within < W  # separator columns stay put
    dy, dx = shifts[:, :1], shifts[:, 1:]  # (B, 1) each
    rows = (np.arange(H)[None, :] - dy) % H  # (B, H) source row of each row
    cols = np.where(in_frame[None, :], slot_x0[None, :] + (within[None, :] - dx) % W, x[None, :])  # (B, Wc)
    # gather whole pixels (3 bytes as one item) by one flat index: one gather instead of indexing bytes in 3 dimensions
    pixels = np.ascontiguousarray(canvases).view(np.dtype((np.void, 3))).reshape(-1)  # (B * H * Wc,)
    flat = (np.arange(B)[:, None, None] * H + rows[:, :, None]) * Wc + cols[:, None, :]  # (B, H, Wc)
    return pixels.take(flat).view(np.uint8).reshape(B, H, Wc, 3)  # (B, H, Wc, 3)


def last_slot_x0(frame_width: int, K: int, sep_width: int) -> int:
    """First pixel column of the last frame slot on a K-slot canvas."""
    return (K - 1) * (frame_width + sep_width)


def _last_slot_columns(img_size, patch_size: int, K: int, sep_width: int) -> tuple[torch.Tensor, int]:
    H, W = _pair(img_size)
    gh, gw = H // patch_size, (K * W + (K - 1) * sep_width) // patch_size
    cols = torch.arange(gw).expand(gh, gw)  # (gh, gw) column index of each patch
    in_slot = cols * patch_size >= last_slot_x0(W, K, sep_width)  # patch starts inside the last slot
    return in_slot.reshape(-1), gh * gw  # (L,)


def compute_patch_mask_for_last_slot(img_size, patch_size: int, K: int, sep_width: int) -> torch.Tensor:
    """Mask of every patch in the last frame slot (mask ratio 1.0).

    Args:
        img_size: frame size, an int or (H, W).
        patch_size: patch side in pixels.
        K: frame slots on the canvas.
        sep_width: separator width in pixels.

    Returns:
        bool tensor (L,), L = patches on the canvas; True = masked (the model must predict it).
        For the default 224x688 canvas: 196 True values, grid columns 29-42.
    """
    mask, _ = _last_slot_columns(img_size, patch_size, K, sep_width)
    return mask


def compute_randomized_patch_mask_for_last_slot(
    img_size,
    patch_size: int,
    K: int,
    sep_width: int,
    mask_ratio: float = 1.0,
    batch_size: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random subset of the last slot's patches, the same count in every row of the batch.

    Args:
        mask_ratio: fraction of the last slot's patches to mask (rounded, at least 1).

    Returns:
        bool tensor (B, L); True = masked. Rows differ in which patches, never in how many,
        so a batch shares one encoder length.
    """
    slot, L = _last_slot_columns(img_size, patch_size, K, sep_width)
    n_slot = int(slot.sum())
    n_mask = max(1, min(n_slot, int(round(mask_ratio * n_slot))))
    noise = torch.rand(batch_size, L, generator=generator)  # (B, L)
    noise = torch.where(slot, noise, torch.full_like(noise, 2.0))  # patches outside the slot sort last
    ids = torch.argsort(noise, dim=1)[:, :n_mask]  # (B, n_mask) chosen slot patches
    mask = torch.zeros(batch_size, L, dtype=torch.bool)
    return mask.scatter_(1, ids, True)  # (B, L)


def masked_frame_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    foreground_weight: float | torch.Tensor = 1.0,
    foreground_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss over masked patches only, with dot pixels counted ``foreground_weight`` times.

    A plain MSE over a black frame with an 80-pixel dot is minimised by predicting black; weighting
    the dot pixels keeps their gradient from drowning in the background.

    Args:
        pred: (B, L, P) predicted patch pixels; P = patch_size**2 * channels.
        target: (B, L, P) true patch pixels in [0, 1].
        mask: (B, L) or (L,) bool, True = masked; None when ``pred`` and ``target`` hold the masked
            patches only (every patch counts).
        foreground_weight: weight of target pixels brighter than the threshold relative to the
            rest; 1 gives the plain masked MSE.

    Returns:
        (loss to optimise, plain masked MSE) as 0-dim tensors.
    """
    err = (pred.float() - target.float()) ** 2  # (B, L, P)
    constant = not torch.is_tensor(foreground_weight)  # a tensor weight (a CUDA graph's input) is never compared on the host
    if mask is None:  # every patch given is a masked one
        mse = err.mean()
        if constant and foreground_weight == 1.0:
            return mse, mse
        w = 1.0 + (foreground_weight - 1.0) * (target > foreground_threshold).float()  # (B, L, P)
        return (err * w).sum() / w.sum().clamp_min(1), mse
    m = mask.expand(pred.shape[0], -1).unsqueeze(-1).to(torch.float32)  # (B, L, 1)
    mse = (err * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1)
    if constant and foreground_weight == 1.0:
        return mse, mse
    w = (1.0 + (foreground_weight - 1.0) * (target > foreground_threshold).float()) * m  # (B, L, P)
    return (err * w).sum() / w.sum().clamp_min(1), mse


class TargetedMAEWrapper(nn.Module):
    """A ``MaskedAutoencoderViT`` sized for the canvas, driven by explicit patch masks.

    The MAE paper masks random patches; here the mask is chosen (the last frame slot), so the
    wrapper takes the mask as an argument and keeps the canvas geometry in one place.
    """

    def __init__(self, config: AutoencoderConcatPredictorWorldModelConfig | None = None):
        super().__init__()
        self.config = cfg = config or AutoencoderConcatPredictorWorldModelConfig()
        if cfg.decoder_position not in ("canvas", "torus"):
            raise ValueError(f"decoder_position must be 'canvas' or 'torus', got {cfg.decoder_position!r}")
        pitch = (cfg.frame_size[1] + cfg.separator_width) / cfg.patch_size  # slot pitch in patch columns
        self.mae = MaskedAutoencoderViT(
            img_size=cfg.canvas_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads,
            mlp_ratio=cfg.mlp_ratio,
            decoder_mode=cfg.decoder_mode,
            decoder_torus=(pitch, cfg.frame_size[1] / cfg.patch_size) if cfg.decoder_position == "torus" else None,
        )
        if cfg.correspondence_init_layers:
            # the same place one slot to the left, plus a few columns either side (see config)
            for blk in self.mae.decoder_blocks[: cfg.correspondence_init_layers]:
                if cfg.decoder_position == "torus":  # the shift inside the frame, wrapping round its edge
                    init_torus_correspondence_attention(blk.attn, cfg.correspondence_offsets[: blk.attn.num_heads],
                                                        cfg.correspondence_gain, cfg.frame_size[1] / cfg.patch_size)
                else:
                    shifts = [pitch + o for o in cfg.correspondence_offsets]
                    init_correspondence_attention(blk.attn, shifts[: blk.attn.num_heads], cfg.correspondence_gain)
            n_action = min(cfg.action_lookup_heads, cfg.decoder_num_heads)
            if n_action and cfg.correspondence_init_layers < cfg.decoder_depth:
                # the next block: heads that read the separator band between the last two slots (the action)
                x_sep = last_slot_x0(cfg.frame_size[1], cfg.canvas_history_size, cfg.separator_width) - cfg.separator_width
                col = (x_sep + cfg.separator_width / 2) / cfg.patch_size - 0.5  # patch column holding the band's centre
                blk = self.mae.decoder_blocks[cfg.correspondence_init_layers]
                init_column_lookup_attention(blk.attn, col, cfg.correspondence_gain, heads=range(n_action))
            with torch.no_grad():  # keep token content small next to position, so that look-up works
                self.mae.decoder_embed.weight.mul_(cfg.decoder_embed_init_gain)
        if cfg.zero_init_pred_head:
            nn.init.zeros_(self.mae.decoder_pred.weight)
            nn.init.zeros_(self.mae.decoder_pred.bias)

    def default_mask(self) -> torch.Tensor:
        """The spec's mask: every patch of the last slot, bool (L,)."""
        cfg = self.config
        return compute_patch_mask_for_last_slot(cfg.frame_size, cfg.patch_size, cfg.canvas_history_size, cfg.separator_width)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.mae.grid_size

    def forward_with_patch_mask(self, imgs: torch.Tensor, patch_mask: torch.Tensor, return_attn: bool = False,
                                masked_only: bool = False, tap: list | None = None):
        """Inpaint the masked patches of a batch of canvases.

        Args:
            imgs: (B, 3, H, W) canvases in [0, 1].
            patch_mask: (L,) or (B, L) bool, True = masked; every row masks the same count.
            return_attn: also return the decoder attention weights (slower, unfused path).
            masked_only: compute the masked patches' pixels only (what training and prediction
                use): the decoder's last block and the pixel head skip the visible tokens.
            tap: a list that receives the last decoder block's input (``masked_only`` only), from
                which ``mae.finish_decoder`` computes every patch later.

        Returns:
            pred (B, L, P) pixels for every patch, visible ones included, or with ``masked_only``
            (B, L_mask, P) for the masked patches in grid order; with ``return_attn``,
            ``(pred, attn)`` where attn is a list with one (B, heads, L+1, L+1) tensor per decoder
            layer (token 0 is CLS). A cross decoder (``decoder_mode``) computes the masked queries'
            rows only (the rest are zero) and no visible patch's pixels (zero).
        """
        if not return_attn:
            return self.mae(imgs, patch_mask, masked_only=masked_only, tap=tap)
        if self.mae.decoder_mode != "self":  # a cross decoder records its weights itself
            recorded: list = []
            pred = self.mae(imgs, patch_mask, attn=recorded)
            return pred, recorded
        with capture_attention(self.mae.decoder_blocks) as recorded:
            pred = self.mae(imgs, patch_mask)
        return pred, recorded

    def loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, patch_mask: torch.Tensor, foreground_weight: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(optimised loss, plain masked MSE) of a prediction against its canvases.

        ``foreground_weight`` overrides the config's (the world model anneals it over training)."""
        cfg = self.config
        target = patchify(imgs, cfg.patch_size)  # (B, L, P)
        fw = cfg.foreground_weight if foreground_weight is None else foreground_weight
        return masked_frame_loss(pred, target, patch_mask, fw, cfg.foreground_threshold)

    def forward_patches(self, patches: torch.Tensor, patch_mask: torch.Tensor, masked_only: bool = False,
                        tap: list | None = None) -> torch.Tensor:
        """``forward_with_patch_mask`` for canvases already cut into patches (``canvas_to_patches``):
        patches (B, L, P) -> pred (B, L, P), or (B, L_mask, P) with ``masked_only``."""
        return self.mae.forward_patches(patches, patch_mask, masked_only=masked_only, tap=tap)

    def masked_loss(
        self, patches: torch.Tensor, pred: torch.Tensor, patch_mask: torch.Tensor, foreground_weight: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss`` for a ``masked_only`` prediction: the same values, computed on the masked
        patches alone.

        Args:
            patches: (B, L, P) the canvases' patches (``canvas_to_patches``, or ``patchify`` of images).
            pred: (B, L_mask, P) the masked patches' prediction, grid order.
            patch_mask: (L,) or (B, L) bool, True = masked.
        """
        cfg = self.config
        ids = self.mae.split_by_mask(patch_mask, patches.shape[0], patches.device)[1]  # (B, L_mask) grid order
        target = torch.gather(patches, 1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # (B, L_mask, P)
        fw = cfg.foreground_weight if foreground_weight is None else foreground_weight
        return masked_frame_loss(pred, target, None, fw, cfg.foreground_threshold)

    def scatter_masked(self, pred: torch.Tensor, patch_mask: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """A ``masked_only`` prediction (B, L_mask, P) put back in its places of a (B, L, P) grid:
        a copy of ``into``, or zeros (visible patches black), for ``reconstruct``."""
        B, _, P = pred.shape
        ids = self.mae.split_by_mask(patch_mask, B, pred.device)[1]  # (B, L_mask)
        L = self.grid_size[0] * self.grid_size[1]
        full = pred.new_zeros(B, L, P) if into is None else into.clone()  # (B, L, P)
        return full.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, P), pred)

    def reconstruct(self, pred: torch.Tensor) -> torch.Tensor:
        """Per-patch pixels (B, L, P) -> canvases (B, 3, H, W)."""
        return unpatchify(pred, self.config.patch_size, self.grid_size, self.config.in_chans)
