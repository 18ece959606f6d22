"""Concat World Model Explorer: the Gradio web app.

Load a recorded toroidal-dot session, scrub its frames, press Run and watch the canvas-inpainting
world model (``AutoencoderConcatPredictorWorldModel``) learn to predict the next frame, then ask
why it predicts what it does by exploring its decoder attention.

Each numbered section of the page has its own module, holding its event handlers (plain module-level
functions that tests import and call) and its layout builder:

1. ``page_sessions.py``: session and frames;
2-5. ``page_run.py``: run the world model, training views, prediction views, metric graphs;
6. ``page_attention.py``: decoder attention, and one patch's attention;
7. ``page_analysis.py``: analysis (counterfactuals, rollouts, evaluation, single-canvas training), and
   ``page_play.py``: play the model with your own actions, compare two models;
8. ``page_workflow.py``: your work (recording, run history, named checkpoints, reset, export);

on top of ``page_outputs.py`` (what every section shows of a tab's model after changing it) and
``page_common.py`` (per-tab state, input checks, formatting and layout helpers).

This file is the entry. ``build_demo()`` makes the model pool and the tab registry, lays the
sections out in page order and wires every component to its handler (event options, API names,
concurrency groups and cancellations are all set here, in ``_wire`` and its two helpers). ``main()``
reads the settings from the environment once (``config.from_env()``,
``server_guard.configure_from_env()``) and passes them down, checks the folders the app writes into
outside ``saved/`` and gives Gradio a private cache (``private_temp_folders``), records demo sessions when
the sessions folder has no loadable one and serves the page (``launch``, behind ``server_guard``'s
upload refusal and, with ``--auth``, its login guard); on exit (SIGTERM and Ctrl-C included) it deletes
the parked models and its private folders. Importing it launches nothing and reads no setting.

Endpoints (``api_name``, tests and tools call them): section 1 ``/refresh_sessions``,
``/load_session``, ``/update_frame``, ``/jump_to_frame``; section 2 ``/run_world_model`` (a
generator), ``/stop``; section 6 ``/update_attention_viz``, ``/patch_attention``; section 7
``/counterfactual``, ``/rollout``, ``/evaluate_session``, ``/train_single_canvas`` (a generator),
``/play_start``, ``/play``, ``/compare_models``;
section 8 ``/record_session`` (a generator), ``/browse_history``, ``/save_checkpoint``,
``/load_checkpoint``, ``/reset_model``, ``/export``. Usage::

    python concat_world_model_explorer_gradio.py [--host 0.0.0.0] [--port 7860] [--share]
        [--auth USER:PASS] [--public] [--no-browser]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import torch
from starlette.middleware import Middleware

import config
import server_guard
from autoencoder_concat_predictor_world_model import compute_path, default_device
from config import AppConfig, AutoencoderConcatPredictorWorldModelConfig
from model_pool import ModelPool, limit_malloc_arenas
from page_analysis import SECTION_TITLE as ANALYSIS_TITLE
from page_analysis import (
    CANVAS_OUTPUT_KEYS,
    analysis_section,
    check_evaluate_session,
    check_frame_analysis,
    check_rollout,
    check_train_single_canvas,
    counterfactual,
    evaluate_session,
    rollout,
    session_names,
    train_single_canvas,
)
from page_attention import SECTION_TITLE as ATTENTION_TITLE
from page_attention import (
    attention_section,
    check_patch_attention,
    check_update_attention_viz,
    patch_attention,
    pick_patch,
    update_attention_viz,
)
from page_play import (
    check_compare_models,
    check_play,
    check_play_start,
    check_play_step,
    check_play_typed,
    compare_models,
    play,
    play_move,
    play_section,
    play_start,
    play_stay,
    play_typed,
    refresh_compare_lists,
)
from page_common import APP, LOG, MODEL_CFG, TabRegistry, UserState, display_path, export_folder, release_user
from page_outputs import RUN_OUTPUT_KEYS
from page_run import check_run_world_model, metrics_section, run_section, run_world_model, stop_run, views_sections
from page_sessions import (
    check_jump_to_frame,
    check_load_session,
    check_update_frame,
    jump_to_frame,
    load_session,
    refresh_sessions,
    session_section,
    update_frame,
)
from private_files import PrivateFolder, UnsafeFolderError, check_folder, readable_by_others
from page_workflow import SECTION_TITLE as WORKFLOW_TITLE
from page_workflow import (
    browse_history,
    check_browse_history,
    check_load_checkpoint,
    check_record_new_session,
    check_save_checkpoint,
    export_info,
    export_results,
    list_checkpoints,
    load_checkpoint,
    play_history,
    record_new_session,
    reset_model,
    save_checkpoint,
    workflow_section,
)
from record_session import RecordingGate, record_session
from run_controller import reproducible_mkl
from server_guard import MAX_UPLOAD_BYTES, LoginDelay, LoginGuard, UploadRefusal, never_served_paths
from session_explorer_lib import scan_sessions

# -----------------------------------------------------------------------------
# constants

CSS = """
.pixelated .image-container { padding-top: 36px; box-sizing: border-box; }
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: scale-down; }
#app-title h1 { margin-bottom: 0; }
.section-title h2 { margin: 0.6em 0 0.1em 0; }
.section-fold > button span { font-size: 1.5em; font-weight: 600; }
"""
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")


# -----------------------------------------------------------------------------
# layout and wiring


def _wire(demo: gr.Blocks, registry: TabRegistry, user: gr.State, c: dict[str, Any], app: AppConfig = APP) -> None:
    """Connect the page's components (``c``, by name) to the handlers and name the API endpoints."""
    run_outputs = [c[key] for key in RUN_OUTPUT_KEYS]
    refresh_outputs = [c["session_dropdown"], c["broken_md"]]
    demo.load(refresh_sessions, None, refresh_outputs, api_name="initial_sessions", api_visibility="private")
    demo.load(registry.register, [user], [user], api_name="register_tab", api_visibility="private")
    demo.unload(registry.release)
    c["refresh_btn"].click(refresh_sessions, None, refresh_outputs, api_name="refresh_sessions")
    c["load_btn"].click(load_session, [c["session_dropdown"], user],
                        [user, c["session_info"], c["frame_slider"], c["frame_image"], c["frame_info"], c["jump_number"]],
                        api_name="load_session", preprocess=False, validator=check_load_session, show_progress="hidden")
    c["frame_slider"].change(update_frame, [c["frame_slider"], user], [c["frame_image"], c["frame_info"], c["jump_number"]],
                             api_name="update_frame", preprocess=False, validator=check_update_frame, trigger_mode="always_last",
                             concurrency_limit=None, show_progress="hidden")
    jump_inputs, jump_outputs = [c["jump_number"], user], [c["frame_slider"], c["frame_image"], c["frame_info"]]
    # a refused input never reaches the handler (validator=): the outputs stay as they were, the message
    # shows under the input, an API client gets it as a validation error; the handler's own refusals
    # (a file gone bad since) come as a toast with show_progress="hidden", so no "Error" badge covers them
    jump = dict(preprocess=False, validator=check_jump_to_frame, show_progress="hidden")
    c["jump_btn"].click(jump_to_frame, jump_inputs, jump_outputs, api_name="jump_to_frame", **jump)
    c["jump_number"].submit(jump_to_frame, jump_inputs, jump_outputs, api_visibility="private", **jump)
    # concurrency_id is global across users, so the limit lets several tabs train at once;
    # each tab's own runs are serialised by its controller
    run_event = c["run_btn"].click(run_world_model, [c["iterations"], user], [user, *run_outputs],
                                   api_name="run_world_model", preprocess=False, validator=check_run_world_model,
                                   concurrency_id="model",
                                   concurrency_limit=4, show_progress="minimal", show_progress_on=[c["progress"]])
    canvas_event = _wire_analysis(demo, user, c)
    _wire_play(demo, user, c)
    record_event = _wire_workflow(demo, user, c, run_event, app)
    # Stop also ends the tab's recording: the cancel closes its handler, and stop_run stops it for API clients
    c["stop_btn"].click(stop_run, [user], run_outputs, api_name="stop", cancels=[run_event, canvas_event, record_event],
                        concurrency_limit=None, show_progress="hidden")
    controls = [c["quantile"], *c["layer_boxes"], *c["head_boxes"], c["aggregation"], c["viz_type"]]
    gr.on([control.change for control in controls], update_attention_viz, [*controls, user],
          [c["attn_image"], c["attn_stats"]], api_name="update_attention_viz", preprocess=False,
          validator=check_update_attention_viz,
          trigger_mode="always_last", concurrency_limit=None, show_progress="hidden")


def _wire_workflow(demo: gr.Blocks, user: gr.State, c: dict[str, Any], run_event, app: AppConfig = APP):
    """Connect section 8 (the checkpoint list is reread when the page opens and after every run's save);
    returns the recording event (Stop cancels it)."""
    listing = [c["ckpt_md"], c["ckpt_choice"]]
    demo.load(list_checkpoints, [user], listing, api_visibility="private")
    run_event.then(list_checkpoints, [user], listing, api_visibility="private")
    c["ckpt_save"].click(save_checkpoint, [c["ckpt_name"], user], listing, api_name="save_checkpoint", preprocess=False,
                         validator=check_save_checkpoint, show_progress="hidden")
    run_outputs = [c[key] for key in RUN_OUTPUT_KEYS]
    c["ckpt_load"].click(load_checkpoint, [c["ckpt_choice"], user], [c["ckpt_md"], *run_outputs],
                         api_name="load_checkpoint", preprocess=False, validator=check_load_checkpoint,
                         concurrency_id="model", concurrency_limit=4, show_progress="hidden")
    c["reset_btn"].click(reset_model, [user], [c["ckpt_md"], *run_outputs], api_name="reset_model", preprocess=False,
                         concurrency_id="model", concurrency_limit=4, show_progress="hidden")
    shown = [c["history_current"], c["history_predicted"], c["history_error"], c["history_md"]]
    c["history_slider"].release(browse_history, [c["history_slider"], user], shown, api_name="browse_history",
                                preprocess=False, validator=check_browse_history, trigger_mode="always_last", concurrency_limit=None,
                                show_progress="hidden")
    play = c["play_btn"].click(play_history, [c["history_slider"], user], [c["history_slider"], *shown],
                               api_visibility="private", preprocess=False, validator=check_browse_history,
                               show_progress="hidden")
    c["pause_btn"].click(None, None, None, cancels=[play], api_visibility="private")
    c["export_btn"].click(export_results, [user], [c["export_file"]], api_name="export", preprocess=False,
                          show_progress="hidden").then(export_info, [user], [c["export_md"]], preprocess=False,
                                                     api_visibility="private")
    record_inputs = [c[k] for k in ("record_pattern", "record_steps", "record_seed", "record_radius", "record_move")]
    # the tab's state is an input (not part of the API): one recording per tab, the gate's limits for all
    return c["record_btn"].click(record_new_session, [*record_inputs, user],
                                 [c["record_md"], c["session_dropdown"], c["eval_session"]], api_name="record_session",
                                 preprocess=False, validator=check_record_new_session,
                                 concurrency_id="record", concurrency_limit=app.max_recordings,
                                 show_progress="minimal", show_progress_on=[c["record_md"]])


def _wire_analysis(demo: gr.Blocks, user: gr.State, c: dict[str, Any]):
    """Connect section 7 and the patch attention controls; returns the single-canvas training event
    (Stop cancels it like a run)."""
    # the analysis frame follows the slider in the browser (no server call, /update_frame unchanged)
    c["frame_slider"].change(None, [c["frame_slider"]], [c["analysis_frame"]], js="(v) => v", api_visibility="private")
    gr.on([demo.load, c["refresh_btn"].click], session_names, None, [c["eval_session"]], api_visibility="private")
    frame = c["analysis_frame"]
    quick = dict(preprocess=False, concurrency_id="analysis", concurrency_limit=2)
    c["cf_btn"].click(counterfactual, [frame, user], [*c["cf_pictures"], c["cf_actual"], c["cf_md"]],
                      api_name="counterfactual", validator=check_frame_analysis, **quick)
    c["rollout_btn"].click(rollout, [frame, c["rollout_k"], user], [c["rollout_image"], c["rollout_table"], c["rollout_md"]],
                           api_name="rollout", validator=check_rollout, **quick)
    c["eval_btn"].click(evaluate_session, [c["eval_session"], user], [c["eval_md"], c["eval_plot"]],
                        api_name="evaluate_session", validator=check_evaluate_session, **quick)
    patch_outputs = [c["patch_image"], c["patch_md"]]
    c["patch_btn"].click(patch_attention, [c["patch_row"], c["patch_col"], user], [*patch_outputs, c["attn_picker"]],
                         api_name="patch_attention", validator=check_patch_attention, **quick)
    c["attn_picker"].select(pick_patch, [user], [c["patch_row"], c["patch_col"], c["attn_picker"], *patch_outputs],
                            api_visibility="private", **quick)
    return c["canvas_btn"].click(train_single_canvas, [frame, c["canvas_steps"], user],
                                 [user, *(c[key] for key in CANVAS_OUTPUT_KEYS)], api_name="train_single_canvas",
                                 preprocess=False, validator=check_train_single_canvas, concurrency_id="model", concurrency_limit=4, show_progress="minimal",
                                 show_progress_on=[c["canvas_progress"]])


def _wire_play(demo: gr.Blocks, user: gr.State, c: dict[str, Any]) -> None:
    """Connect play and compare: Reset is ``/play_start``, Enter in the actions box ``/play``; the
    Stay, Move and Play buttons also start a play at frame t when none is going."""
    frame, typed = c["analysis_frame"], c["play_typed"]
    quick = dict(preprocess=False, concurrency_id="analysis", concurrency_limit=2)
    shown = [c[key] for key in ("play_imagined", "play_truth", "play_strip", "play_table", "play_info")]
    # each validator refuses a bad input before the handler runs: the play's pictures stay as they were
    c["play_reset"].click(play_start, [frame, user], shown, api_name="play_start", validator=check_play_start, **quick)
    typed.submit(play, [typed, user], shown, api_name="play", validator=check_play, **quick)
    c["play_typed_btn"].click(play_typed, [frame, typed, user], shown, api_visibility="private",
                              validator=check_play_typed, **quick)
    c["play_stay"].click(play_stay, [frame, user], shown, api_visibility="private", validator=check_play_step, **quick)
    c["play_move"].click(play_move, [frame, user], shown, api_visibility="private", validator=check_play_step, **quick)
    lists = [c["compare_a"], c["compare_b"], c["compare_session"]]
    gr.on([demo.load, c["refresh_btn"].click], refresh_compare_lists, [user], lists, api_visibility="private")
    c["compare_btn"].click(compare_models, [*lists, user], [c[k] for k in ("compare_md", "compare_plot", "compare_top", "compare_top_md")],
                           api_name="compare_models", validator=check_compare_models, show_progress_on=[c["compare_md"]], **quick)


def build_demo(config: AutoencoderConcatPredictorWorldModelConfig = MODEL_CFG, cache_frequency_s: int = 600,
               cache_age_s: int = 3600, app: AppConfig = APP) -> gr.Blocks:
    """Declare the page and wire the handlers; launches nothing.

    Args:
        config: the world model's settings (the attention controls follow its decoder depth and heads).
        cache_frequency_s: how often Gradio sweeps its image cache.
        cache_age_s: cached image files older than this are deleted.
        app: the server's settings (the model pool's parking and the recording limits are read from it).

    Raises:
        private_files.UnsafeFolderError: the park folder is one another account could change.

    The page's ``demo`` carries ``model_pool`` and ``exports`` (a ``PrivateFolder``): whoever serves it
    closes both when it stops.
    """
    # before Gradio's first component: the pool refuses a park folder another account could change
    pool = ModelPool(app.idle_park_s, app.max_resident_models, min(app.park_sweep_s, app.idle_park_s / 2), app.park_dir,
                     app.park_retry_s)
    recordings = RecordingGate(app.max_recordings, app.record_budget_bytes)
    exports = export_folder()  # made at the first export, deleted by main() (or its finalizer) at the end
    registry = TabRegistry(recordings)
    # fill_width: three 2x frames side by side each get their 448 px on a 1500 px wide window
    with gr.Blocks(title="Concat World Model Explorer", delete_cache=(cache_frequency_s, cache_age_s), fill_width=True) as demo:
        demo.model_pool, demo.exports = pool, exports  # main() closes them when the server stops: their files go
        user = gr.State(UserState(pool, config, tensorboard_dir=app.tensorboard_dir, recordings=recordings,
                                  exports=exports, threads=app.run_threads()), delete_callback=release_user)
        gr.Markdown(
            "# Concat World Model Explorer\nLoad a recorded toroidal-dot session, scrub its frames, run the "
            "canvas-inpainting world model and explore why it predicts what it does.", elem_id="app-title")

        c = {**session_section(), **run_section(config, app.run_threads()), **views_sections(), **metrics_section(config)}
        # the later sections are folded: a newcomer first sees sessions, run, views and graphs; each
        # fold opens with a click and keeps its outputs up to date while closed
        with gr.Accordion(ATTENTION_TITLE, open=False, elem_id="fold-attention", elem_classes=["section-fold"]):
            c.update(attention_section(config))
        with gr.Accordion(ANALYSIS_TITLE, open=False, elem_id="fold-analysis", elem_classes=["section-fold"]):
            c.update(analysis_section(), **play_section())
        with gr.Accordion(WORKFLOW_TITLE, open=False, elem_id="fold-work", elem_classes=["section-fold"]):
            c.update(workflow_section())
        gr.Markdown(folders_note(), elem_id="folders-note")
        _wire(demo, registry, user, c, app)
    return demo


# -----------------------------------------------------------------------------
# command line and launch


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {port}")
    return port


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASS with a non-empty user name and password")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    """The command line; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT supply the defaults when set."""
    parser = argparse.ArgumentParser(prog="concat_world_model_explorer_gradio.py",
                                     description="Serve the Concat World Model Explorer web app.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or APP.host,
                        help="listen address (default 0.0.0.0; 127.0.0.1 keeps it private to this machine)")
    parser.add_argument("--port", type=_port, default=os.environ.get("GRADIO_SERVER_PORT") or str(APP.port),
                        help="listen port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--auth", type=_auth, default=None, metavar="USER:PASS",
                        help="require this user name and password on every page and API route")
    parser.add_argument("--public", action="store_true", help="allow --share without --auth (anyone with the link)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return parser


def share_refusal(args: argparse.Namespace) -> str | None:
    """Why the options are refused (a public link that anybody could use to run code on this machine), or None."""
    if args.share and args.auth is None and not args.public:
        return ("Refusing --share without --auth: a share link is public, and anyone who finds it could use "
                "this machine's CPU/GPU and write checkpoints. Add --auth USER:PASS, or --public if you really "
                "want an open link.")
    return None


PUBLIC_WARNING = ("Warning: --share --public without --auth: anyone who finds the share link can use this app, "
                  "its CPU/GPU and its checkpoint file.")


def should_open_browser(no_browser: bool) -> bool:
    """Open a browser tab only where there is a display to show it."""
    if no_browser:
        return False
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def ensure_demo_sessions() -> list[Path]:
    """Record the demo sessions when the sessions folder holds no loadable session."""
    if any(s.ok for s in scan_sessions()):
        return []
    patterns = APP.demo_sessions
    print(f"No loadable sessions in {config.SESSIONS_ROOT}: recording {len(patterns)} demo sessions "
          f"({', '.join(patterns)}; {APP.demo_session_steps} steps each).", flush=True)
    return [record_session(p, APP.demo_session_steps, seed) for seed, p in enumerate(patterns)]


def allow_nested_event_loop() -> None:
    """Inside a running event loop (a notebook) let Gradio's own asyncio calls nest."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    import nest_asyncio

    nest_asyncio.apply(loop)


def folders_line() -> str:
    """Where sessions and checkpoints are, said once at start (relative to the project folder where they
    are inside it); the page names folders outside the project ``<sessions>`` and ``<checkpoints>``."""
    shown = [f"{name} in {display_path(folder)}" + ("" if not display_path(folder).startswith("<") else f" = {folder}")
             for name, folder in (("sessions", config.SESSIONS_ROOT), ("checkpoints", config.CHECKPOINT_DIR))]
    return "Folders: " + "; ".join(shown)


def folders_note() -> str:
    """The page's footer: the folders the page's messages name (the terminal line of ``folders_line``
    gives the full path of one outside the project, which the page never shows)."""
    sessions, checkpoints = display_path(config.SESSIONS_ROOT), display_path(config.CHECKPOINT_DIR)
    outside = sessions.startswith("<") or checkpoints.startswith("<")
    return (f"_Sessions are read from `{sessions}` and checkpoints kept in `{checkpoints}`"
            + (" (outside the project folder: the terminal that started the app prints where)" if outside
               else " (inside the project folder)") + "._")


def launch(demo: gr.Blocks, args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    """Queue and serve ``demo``; say so when the share tunnel cannot be made and keep serving locally."""
    allow_nested_event_loop()
    if args.share and args.auth is None:
        print(PUBLIC_WARNING, file=sys.stderr, flush=True)
    demo.queue(default_concurrency_limit=1)
    guards = (LoginGuard, LoginDelay, UploadRefusal) if args.auth else (UploadRefusal,)  # the first is outermost
    app_kwargs = {"middleware": [Middleware(guard) for guard in guards]}
    # quiet: Gradio's own lines would tell a user to "set share=True in launch()"; this app's flag is --share
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=args.auth, quiet=True,
                inbrowser=should_open_browser(args.no_browser), show_error=True, prevent_thread_lock=True,
                theme=THEME, css=CSS, blocked_paths=never_served_paths(gr.utils.get_upload_folder()),
                max_file_size=MAX_UPLOAD_BYTES, app_kwargs=app_kwargs)
    print(f"Running on local URL: {demo.local_url}" + ("" if args.share else " (--share makes a public link)"), flush=True)
    if args.share and not demo.share_url:
        print(f"Could not create a public share link (is this machine offline?). "
              f"Still serving locally at {demo.local_url}", flush=True)
    if block:
        demo.block_thread()
    return demo


def private_temp_folders(environ: dict | None = None) -> tuple[Path, PrivateFolder | None]:
    """Check the folders the app writes into outside ``saved/`` and give Gradio a private cache.

    The system temp folder (where the app makes its private export and, by default, park and cache
    folders) must be one no other account can change (``/tmp``, sticky and root's, is fine). Gradio's
    cache is ``$GRADIO_TEMP_DIR`` when set (created 0700 when missing; refused when another account
    could change it), else a new private folder (0700, an unguessable name) that this sets as
    ``GRADIO_TEMP_DIR`` before any Gradio component reads it.

    Returns:
        Gradio's cache folder, and the ``PrivateFolder`` that made it (None when ``GRADIO_TEMP_DIR`` was
        set): the caller closes it when the app ends, which deletes the cache.

    Raises:
        private_files.UnsafeFolderError: a folder another account could change, said in one sentence.
    """
    env = os.environ if environ is None else environ
    check_folder(tempfile.gettempdir(), "the system temp folder ($TMPDIR)", shared=True)
    given = env.get("GRADIO_TEMP_DIR")
    owner = None
    if given:
        cache = check_folder(given, "Gradio's cache folder ($GRADIO_TEMP_DIR)")
        if readable_by_others(cache):
            LOG.warning("Gradio's cache folder ($GRADIO_TEMP_DIR) can be read by other accounts: the pictures "
                        "the app draws are readable there (exports are written 0600); make it mode 0700")
    else:
        owner = PrivateFolder("cwm-gradio-", "the system temp folder ($TMPDIR) for Gradio's cache")
        cache = owner.path()
        env["GRADIO_TEMP_DIR"] = str(cache)
    if environ is None:
        point_gradio_at(cache)
    return cache, owner


def point_gradio_at(cache: Path) -> None:
    """Some Gradio modules read ``GRADIO_TEMP_DIR`` once, when imported (before ``main()`` runs), into a
    ``DEFAULT_TEMP_DIR`` of their own; the server's routes make a folder there at launch. Point every
    one already imported at ``cache`` too, so nothing lands in ``$TMPDIR/gradio`` (a folder another
    account may have made first)."""
    for name, module in list(sys.modules.items()):
        if (name == "gradio" or name.startswith("gradio.")) and isinstance(getattr(module, "DEFAULT_TEMP_DIR", None), str):
            module.DEFAULT_TEMP_DIR = str(cache)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that Gradio closes its server and the
    parked models and private folders are deleted on the way out."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, check the folders the app writes into, record demo sessions when needed and serve
    the app; returns the exit code. On exit (SIGTERM and Ctrl-C included) the parked models, the export
    folder and the app's own Gradio cache are deleted."""
    args = build_parser().parse_args(argv)
    refusal = share_refusal(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    app, model_config = config.from_env()  # the environment is read here, once
    server_guard.configure_from_env()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    LOG.setLevel(logging.INFO)
    demo, gradio_cache, signalled = None, None, []

    def on_sigterm(signum, frame) -> None:  # Gradio's block_thread swallows the interrupt: remember it
        signalled.append(signum)
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _, gradio_cache = private_temp_folders()
        if app.tensorboard_dir:  # each tab's run folder goes in it: 0700, refused when another account could change it
            tensorboard = check_folder(app.tensorboard_dir, "the TensorBoard folder ($CWM_TENSORBOARD_DIR)")
            print(f"TensorBoard logs: one run folder per tab in {tensorboard} "
                  f"(tensorboard --logdir {tensorboard})", flush=True)
        reproducible_mkl(app.mkl_cbwr)  # before any tensor work: a Run's worker sums as the bare loop does
        if app.malloc_arenas:
            limit_malloc_arenas(app.malloc_arenas)  # before the worker threads exist: freed models' memory goes back
        torch.set_num_threads(1)  # the server's own threads; runs and batched analyses use app.run_threads() (run_controller.use_threads)
        print(f"Training on {compute_path(default_device(), model_config, app.run_threads())}", flush=True)
        print(folders_line(), flush=True)
        ensure_demo_sessions()
        demo = build_demo(model_config, app=app)
        launch(demo, args)
        if signalled:
            return 143
    except UnsafeFolderError as e:
        print(f"concat_world_model_explorer_gradio.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if demo is not None:
            demo.model_pool.close()
            demo.exports.close()
        if gradio_cache is not None:
            gradio_cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
