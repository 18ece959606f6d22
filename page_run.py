"""Sections 2-5 of the page: "Run the world model" (iterations, Run and Stop, progress, checkpoint status,
training settings) and the layout of what a run shows: "Training views", "Prediction views", "Metric graphs".
The values those sections show are built in ``page_outputs``.

Endpoints: ``/run_world_model`` (a generator) and ``/stop``.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import torch

from run_controller import RunBusyError
from config import AutoencoderConcatPredictorWorldModelConfig
from page_common import (
    APP,
    CANVAS_HEIGHT,
    FRAME_HEIGHT,
    MODEL_CFG,
    UserState,
    hide_paths,
    image_block,
    line_plot,
    refusal,
    require_session,
    validated,
    whole_number,
)
from page_outputs import (
    DOT_COLOURS,
    ERROR_COLOURS,
    GRAD_COLOURS,
    LOOP_MARKS,
    LOSS_COLOURS,
    LR_COLOURS,
    MAX_PLOT_POINTS,
    NO_MODEL_YET,
    RUN_OUTPUT_KEYS,
    TIME_COLOURS,
    display_outputs,
)

# -----------------------------------------------------------------------------
# text


def training_settings_markdown(cfg: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG,
                               threads: int | None = None) -> str:
    """The training settings in use, from ``config.py``; ``threads``: a run's torch CPU threads
    (default: the calling thread's)."""
    h, w = cfg.canvas_size
    gate = (
        f"on (train until masked MSE < {cfg.canvas_inpainting_threshold:g}, at most {cfg.quality_gate_max_steps} steps)"
        if cfg.quality_gate else "off (one optimizer step per iteration)"
    )
    threads = threads or torch.get_num_threads()
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({threads} thread{'s' * (threads != 1)} for a run)"
    return "\n".join([
        f"- **Canvas:** {h}x{w} px ({cfg.canvas_history_size} frames, {cfg.separator_width} px separators), "
        f"{cfg.patch_size} px patches, grid {cfg.grid_size[0]}x{cfg.grid_size[1]}; training masks {cfg.mask_ratio:.0%} of the last slot, prediction all of it",
        f"- **Model:** encoder {cfg.embed_dim} wide x {cfg.depth} blocks x {cfg.num_heads} heads; "
        f"decoder {cfg.decoder_embed_dim} wide x {cfg.decoder_depth} blocks x {cfg.decoder_num_heads} heads",
        f"- **Optimizer:** AdamW, learning rate {cfg.learning_rate:g}, warm-up {cfg.warmup_steps} steps, cosine decay "
        f"over {cfg.lr_decay_steps} steps to {cfg.min_lr:g}, weight decay {cfg.weight_decay:g}, gradient clip {cfg.grad_clip:g}",
        f"- **Loss:** masked patches only; dot-pixel (foreground) weight {cfg.foreground_weight:g}, "
        f"foreground threshold {cfg.foreground_threshold:g}",
        f"- **Quality gate:** {gate}",
        f"- **Device:** {device}",
    ])


# -----------------------------------------------------------------------------
# handlers


def run_world_model(num_iterations: Any, user: UserState):
    """Train for ``num_iterations`` (1-500) on the loaded session, showing its progress once a second.

    The training runs in its own thread at full speed; the page shows its latest state every
    ``update_interval_s`` and never makes it wait. A frame that cannot be read (changed on disk after
    the session was loaded) ends the run: the iterations done so far are kept and saved, and the run
    fails with a message naming the frame.
    """
    total = iterations_of(num_iterations)
    require_session(user)
    c = user.controller
    final = None
    try:
        for k, metrics in enumerate(c.stream(c.run(total), APP.update_interval_s)):
            if not c.streamed_run_ended:
                views = k % APP.run_views_every == 0
                yield (user, *display_outputs(user, final=False, first=metrics is None, views=views))
            else:  # the run has ended; the tab's next run waits until its end is read here
                final = display_outputs(user, final=True)
    except RunBusyError:
        raise refusal("A run is already in progress in this tab: press Stop or wait for it to finish.") from None
    yield (user, *(final or display_outputs(user, final=True)))
    status = user.controller.status()
    if status.problem:
        raise refusal(f"The run stopped after {status.done} of {total} iterations: {hide_paths(status.problem)}.")


def iterations_of(value: Any) -> int:
    return whole_number(value, "Number of iterations", APP.min_iterations, APP.max_iterations)


def check_run_world_model(num_iterations: Any, user: UserState) -> list[dict]:
    """Validator of ``run_world_model``: a number of iterations, and a loaded session to replay."""
    return validated(lambda: (iterations_of(num_iterations), require_session(user)), None)


def stop_run(user: UserState) -> tuple:
    """Ask the tab's run (and its recording, if one is going) to stop after the current iteration
    (action), wait for the run to end, then show the final state."""
    recording = user.recordings.stop(user)  # its own handler then says what was kept
    answer = user.controller.stop(APP.stop_wait_s)
    skip = (gr.skip(),) * (len(RUN_OUTPUT_KEYS) - 1)
    if answer == "stopping":
        return ("**Stopping:** the run ends after its current iteration.",) + skip
    if answer == "idle" and recording:
        return ("**Stopped the recording** (section 8): the frames recorded so far are kept as a session.",) + skip
    if answer == "idle" and not user.controller.has_model:
        return ("_Nothing is running._",) + skip
    return display_outputs(user, final=True)


# -----------------------------------------------------------------------------
# layout


def run_section(cfg: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG, threads: int | None = None) -> dict[str, Any]:
    """Section 2: iterations, Run and Stop, progress and checkpoint status, the training settings of
    ``cfg`` (runs computing with ``threads`` torch threads)."""
    gr.Markdown("## 2. Run the world model", elem_classes=["section-title"])
    with gr.Row():
        iterations = gr.Number(value=APP.default_iterations, precision=0, elem_id="iterations",
                               label=f"Iterations ({APP.min_iterations}-{APP.max_iterations})", scale=1)
        run_btn = gr.Button("▶ Run world model", variant="primary", elem_id="run-btn", scale=1)
        stop_btn = gr.Button("■ Stop", variant="stop", elem_id="stop-btn", scale=1)
    progress = gr.Markdown("_Not run yet._", elem_id="progress")
    checkpoint = gr.Markdown(NO_MODEL_YET, elem_id="checkpoint-info")
    with gr.Accordion("Training settings (from config.py)", open=False):
        gr.Markdown(training_settings_markdown(cfg, threads), elem_id="training-settings")
    return {"iterations": iterations, "run_btn": run_btn, "stop_btn": stop_btn, "progress": progress, "checkpoint": checkpoint}


def views_sections() -> dict[str, Any]:
    """Sections 3 and 4: the four training views and the three prediction views."""
    gr.Markdown("## 3. Training views (latest training canvas)", elem_classes=["section-title"])
    with gr.Row():
        train_original = image_block("Original canvas: frames t-2, t-1, t with action separators", "train-original", CANVAS_HEIGHT)
        train_masked = image_block("Masked canvas overlay (grey = masked patches to inpaint)", "train-masked", CANVAS_HEIGHT)
    with gr.Row():
        train_inpainting = image_block("Inpainting output (the decoder computes the masked slot only)", "train-inpainting", CANVAS_HEIGHT)
        train_composite = image_block("Composite: visible patches + inpainted masked slot", "train-composite", CANVAS_HEIGHT)

    gr.Markdown("## 4. Prediction views", elem_classes=["section-title"])
    with gr.Row():
        pred_current = image_block("Current frame t (2x)", "pred-current", FRAME_HEIGHT)
        pred_next = image_block("Predicted next frame t+1 (2x)", "pred-next", FRAME_HEIGHT)
        pred_error = image_block("Error |predicted - actual| (amplified)", "pred-error", FRAME_HEIGHT)
    prediction_info = gr.Markdown(elem_id="prediction-info")
    pred_canvas = image_block("Prediction canvas: frames t-1 and t with their actions, predicted frame t+1 filled into "
                              "the last slot", "pred-canvas", CANVAS_HEIGHT)
    return {"train_original": train_original, "train_masked": train_masked, "train_inpainting": train_inpainting, "train_composite": train_composite, "pred_current": pred_current, "pred_next": pred_next, "pred_error": pred_error, "prediction_info": prediction_info, "pred_canvas": pred_canvas}


def metrics_section(cfg: AutoencoderConcatPredictorWorldModelConfig) -> dict[str, Any]:
    """Section 5: the metric graphs and their legend."""
    gr.Markdown("## 5. Metric graphs (kept across runs of this tab's model)", elem_classes=["section-title"])
    with gr.Row():
        plot_error = line_plot("Prediction error (MSE)", "plot-error", "MSE", ERROR_COLOURS)
        plot_dot = line_plot(f"Dot found: share of the last {APP.dot_window} predictions within 3 px", "plot-dot", "%",
                             DOT_COLOURS, y_lim=[0, 100])
    with gr.Row():
        plot_time = line_plot("Iteration time", "plot-time", "milliseconds", TIME_COLOURS)
        plot_loss = line_plot("Training loss", "plot-loss", "loss", LOSS_COLOURS)
    with gr.Row():
        plot_lr = line_plot("Learning rate (warm-up, then cosine decay)", "plot-lr", "learning rate", LR_COLOURS)
        plot_grad = line_plot(f"Gradient norm per step (clipped at {cfg.grad_clip:g})" if cfg.grad_clip
                              else "Gradient norm per step", "plot-grad", "norm", GRAD_COLOURS)
    gr.Markdown(
        f"**Prediction error:** the model (indigo) against a baseline that simply repeats the last frame (dark grey), "
        f"each the mean of its last {APP.error_window} predictions; the faint lines behind them are the single "
        "predictions (after a stay the baseline is exact, after a move it misses the whole dot, so on an alternating "
        "session it jumps between 0 and its full error every iteration). A model below the baseline has learned the "
        f"motion. **Dot found:** of the last {APP.dot_window} predictions, the share whose dot centre lies within 3 px "
        "of the true one (a prediction without a dot counts as a miss); it jumps when the model localises the dot. "
        "**Training loss:** the optimised, dot-weighted loss (red line) and the plain masked-patch MSE (orange line). "
        "**Learning rate:** the optimizer's rate at each iteration's step. **Gradient norm:** the total gradient norm "
        "of each step before clipping (teal line); once norms come within half of the clip threshold it is drawn too "
        "(grey line): steps above it were scaled down. **Pink vertical lines:** the replay reached the session's last "
        "frame and started again from frame 0; the two iterations after it score no prediction (the model needs two "
        "frames of history first) and the first of them does not train (hence its near-0 ms iteration time). "
        f"Histories longer than {MAX_PLOT_POINTS} points are thinned evenly; the latest {LOOP_MARKS} loops are marked.",
        elem_id="plot-legend")
    return {"plot_error": plot_error, "plot_dot": plot_dot, "plot_time": plot_time, "plot_loss": plot_loss,
            "plot_lr": plot_lr, "plot_grad": plot_grad}
