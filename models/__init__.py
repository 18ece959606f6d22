"""Canvas building, patch masks and the MAE ViT used by the world model (no gradio, no matplotlib)."""

from models.autoencoder_concat_predictor import (
    ACTION_COLOURS,
    TargetedMAEWrapper,
    build_canvas,
    build_prediction_canvases,
    canvas_to_patches,
    canvas_to_tensor,
    compute_patch_mask_for_last_slot,
    compute_randomized_patch_mask_for_last_slot,
    masked_frame_loss,
    roll_canvas_frames,
    separator_colours,
    tensor_to_uint8,
)
from models.masked_autoencoder_vit import (
    MaskedAutoencoderViT,
    capture_attention,
    get_2d_sincos_pos_embed,
    patchify,
    patchify_channels_last,
    unpatchify,
)

__all__ = [
    "ACTION_COLOURS",
    "MaskedAutoencoderViT",
    "TargetedMAEWrapper",
    "build_canvas",
    "build_prediction_canvases",
    "canvas_to_patches",
    "canvas_to_tensor",
    "capture_attention",
    "compute_patch_mask_for_last_slot",
    "compute_randomized_patch_mask_for_last_slot",
    "get_2d_sincos_pos_embed",
    "masked_frame_loss",
    "roll_canvas_frames",
    "patchify",
    "patchify_channels_last",
    "separator_colours",
    "tensor_to_uint8",
    "unpatchify",
]
