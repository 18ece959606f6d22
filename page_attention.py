"""Section 6 of the page, "Decoder attention": controls that redraw the attention captured at the end of the
last run (never running the model), and "One patch: where does it look?".

Endpoints: ``/update_attention_viz`` and ``/patch_attention`` (a click on the patch picker does the same).
The numbers come from ``attention_viz``, the pictures from ``attention_draw``.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np

from attention_draw import picker_patch
from attention_viz import AGGREGATIONS, VIZ_LINES, VIZ_TYPES
from config import AutoencoderConcatPredictorWorldModelConfig
from page_common import (
    APP,
    ATTENTION_HEIGHT,
    FRAME_HEIGHT,
    UserState,
    choice,
    image_block,
    parse_quantile,
    refusal,
    selected_indices,
    validated,
    whole_number,
    written_once,
)
from page_outputs import NOTHING_RUN_YET, PICK_A_PATCH, PICKER_SCALE, attention_outputs, attention_picker, patch_outputs

# -----------------------------------------------------------------------------
# constants

LAYER_COLOUR_NAMES = ("red", "gold", "green", "blue", "violet")  # attention_draw.LAYER_COLOURS in words
PATCH_ATTENTION_HEIGHT = 760  # one patch's attention: 3 rows of 2 layer panels stay legible at the page width


# -----------------------------------------------------------------------------
# handlers


def attention_controls_of(quantile: Any, controls: tuple, user: UserState) -> tuple:
    """The attention controls as (quantile, layers, heads, aggregation, visualization); a refusal
    naming the first bad one. ``controls``: one checkbox per decoder layer, one per head, the
    aggregation and the visualization type."""
    cfg = user.controller.config
    n_layers, n_heads = cfg.decoder_depth, cfg.decoder_num_heads
    if len(controls) != n_layers + n_heads + 2:
        raise refusal(f"Expected {n_layers} layer and {n_heads} head checkboxes, the aggregation and the "
                      f"visualization type (got {len(controls)} values).")
    return (parse_quantile(quantile), selected_indices(controls[:n_layers], "Decoder layer"),
            selected_indices(controls[n_layers:n_layers + n_heads], "Attention head"),
            choice(controls[-2], AGGREGATIONS, "Aggregation"), choice(controls[-1], VIZ_TYPES, "Visualization type"))


def update_attention_viz(quantile: Any, *controls: Any) -> tuple[np.ndarray | None, str]:
    """Redraw the decoder attention from the capture of the last run with new controls.

    ``controls``: one checkbox per decoder layer, one per head (as many as the model has), the
    aggregation, the visualization type and the tab's ``UserState`` last.
    """
    *controls, user = controls
    user.attention_controls = attention_controls_of(quantile, tuple(controls), user)
    return attention_outputs(user)


def check_update_attention_viz(quantile: Any, *controls: Any) -> list[dict]:
    """Validator of ``update_attention_viz`` (the page's controls send nothing else; an API client may)."""
    *controls, user = controls
    return validated(lambda: attention_controls_of(quantile, tuple(controls), user), *[None] * (len(controls) + 1))


def _patch_grid(user: UserState) -> tuple[int, int]:
    cfg = user.controller.config
    return cfg.frame_size[0] // cfg.patch_size, cfg.frame_size[1] // cfg.patch_size


def _require_capture(user: UserState) -> None:
    if user.controller.attention is None:
        raise refusal("Run the world model first: patch attention reads the decoder attention captured at the end of a run.")


def patch_of(row: Any, col: Any, user: UserState) -> tuple[int, int]:
    """(row, col) of a patch of the predicted frame, with a capture to draw it from; a refusal otherwise."""
    rows, cols = _patch_grid(user)
    r, c = whole_number(row, "Patch row", 0, rows - 1), whole_number(col, "Patch column", 0, cols - 1)
    _require_capture(user)
    return r, c


def patch_attention(row: Any, col: Any, user: UserState) -> tuple[np.ndarray, str, np.ndarray]:
    """Where one patch of the predicted frame looks: its attention in each selected decoder layer
    (heads combined with section 6's aggregation), its strongest source patches, and the predicted
    frame with that patch ringed."""
    r, c = patch_of(row, col, user)
    image, text = patch_outputs(user, r, c)
    user.selected_patch = (r, c)  # redrawn from every later capture (page_outputs.chosen_patch_outputs)
    return image, text, attention_picker(user, (r, c))


def check_patch_attention(row: Any, col: Any, user: UserState) -> list[dict]:
    """Validator of ``patch_attention``: the row and column, each under its own box."""
    rows, cols = _patch_grid(user)
    return validated(lambda: (whole_number(row, "Patch row", 0, rows - 1), _require_capture(user)),
                     lambda: whole_number(col, "Patch column", 0, cols - 1), None)


def pick_patch(user: UserState, evt: gr.SelectData) -> tuple:
    """A click on the predicted frame picks the patch under it (the picture is enlarged ``PICKER_SCALE``x)."""
    attention = user.controller.attention
    if attention is None or attention.prediction is None:
        raise refusal("Run the world model first: the predicted frame to click comes from the last run.")
    try:
        shown = tuple(PICKER_SCALE * n for n in attention.prediction.shape[:2])  # the enlarged picture's (H, W)
        row, col = picker_patch(evt.index[0], evt.index[1], shown, attention.patch_size, PICKER_SCALE)
    except (ValueError, TypeError, IndexError) as e:
        raise refusal(f"That click is not on a patch of the predicted frame: {e}") from None
    image, text = patch_outputs(user, row, col)
    user.selected_patch = (row, col)
    return row, col, attention_picker(user, (row, col)), image, text


# -----------------------------------------------------------------------------
# layout


SECTION_TITLE = "6. Decoder attention (from the last run; controls redraw without running the model)"


def attention_section(cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict[str, Any]:
    """Section 6 (titled ``SECTION_TITLE`` by the fold the page puts it in): attention controls (one
    checkbox per decoder layer and head of ``cfg``), picture and statistics."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            quantile = gr.Slider(0, 100, value=APP.default_quantile, step=0.1, elem_id="attn-quantile",
                                 label="Quantile threshold (99.8 = strongest 0.2%)")
            colours = ", ".join(f"L{i} {LAYER_COLOUR_NAMES[i % len(LAYER_COLOUR_NAMES)]}" for i in range(cfg.decoder_depth))
            gr.Markdown(f"**Decoder layers** (line colours: {colours})")
            with gr.Row():
                layer_boxes = [gr.Checkbox(value=True, label=f"L{i}", elem_id=f"attn-layer-{i}", min_width=60)
                               for i in range(cfg.decoder_depth)]
            gr.Markdown("**Attention heads** (combined by the aggregation below)")
            with gr.Row():
                head_boxes = [gr.Checkbox(value=True, label=f"H{i}", elem_id=f"attn-head-{i}", min_width=60)
                              for i in range(cfg.decoder_num_heads)]
            aggregation = gr.Radio(list(AGGREGATIONS), value="mean", label="Aggregation over heads",
                                   elem_id="attn-aggregation")
            viz_type = gr.Radio(list(VIZ_TYPES), value=VIZ_LINES, label="Visualization", elem_id="attn-viz-type")
        with gr.Column(scale=5):
            attn_image = image_block("Decoder attention", "attn-image", ATTENTION_HEIGHT)
            attn_stats = gr.Markdown(NOTHING_RUN_YET, elem_id="attn-stats")
    return {"quantile": quantile, "layer_boxes": layer_boxes, "head_boxes": head_boxes, "aggregation": aggregation,
            "viz_type": viz_type, "attn_image": attn_image, "attn_stats": attn_stats, **_patch_attention_block(cfg)}


def _patch_attention_block(cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict[str, Any]:
    """Inside section 6: click a patch of the predicted frame (or give its row and column) to see where it looks."""
    rows, cols = cfg.frame_size[0] // cfg.patch_size, cfg.frame_size[1] // cfg.patch_size
    gr.Markdown(f"### One patch: where does it look?\nClick a patch of the predicted frame (grid {rows} x {cols}) or "
                "enter its row and column. Layers, heads and aggregation follow the controls above.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300):
            attn_picker = written_once(gr.Image(format="png", label="Predicted frame of the last run: click a patch",
                                                elem_id="attn-picker", height=FRAME_HEIGHT, type="numpy",
                                                interactive=False, elem_classes=["pixelated"], buttons=["fullscreen"]))
        with gr.Column(scale=3):
            with gr.Row():
                patch_row = gr.Number(value=rows // 2, precision=0, label=f"Row (0-{rows - 1})", elem_id="patch-row")
                patch_col = gr.Number(value=cols // 2, precision=0, label=f"Column (0-{cols - 1})", elem_id="patch-col")
            patch_btn = gr.Button("Show this patch's attention", elem_id="patch-btn")
            patch_md = gr.Markdown(PICK_A_PATCH, elem_id="patch-info")
    patch_image = image_block("Attention of the chosen patch: one canvas per decoder layer (cyan ring = the patch)",
                              "patch-image", PATCH_ATTENTION_HEIGHT)
    return {"attn_picker": attn_picker, "patch_row": patch_row, "patch_col": patch_col, "patch_btn": patch_btn,
            "patch_image": patch_image, "patch_md": patch_md}
