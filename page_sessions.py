"""Section 1 of the page, "Session and frames": choose and load a recorded session, scrub its frames.

Endpoints: ``/refresh_sessions``, ``/load_session``, ``/update_frame``, ``/jump_to_frame``.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np

import config
from page_common import (
    FRAME_HEIGHT,
    UserState,
    display_path,
    hide_paths,
    image_block,
    open_session,
    refusal,
    require_session,
    session_folder,
    upscale,
    validated,
    whole_number,
)
from session_explorer_lib import (
    ACTION_NAMES,
    Session,
    SessionError,
    format_timestamp,
    markdown_escape,
    scan_sessions,
    session_info_markdown,
)

# -----------------------------------------------------------------------------
# text and pictures


def frame_markdown(session: Session, index: int) -> str:
    """Step, timestamp and the action taken after frame ``index``."""
    obs = session.observations[index]
    action = session.action_after(index)
    after = "none (the last frame)" if action is None else f"{action} = {ACTION_NAMES.get(action, '?')}"
    return (
        f"**Frame {index}** of 0-{session.num_frames - 1} | **Step:** {obs['step']} (the recording counts "
        "frames and actions in one sequence, so frame n is about step 2n) | "
        f"**Time:** {format_timestamp(obs['timestamp'])} | **Action after it:** {after}"
    )


def frame_outputs(session: Session, index: int) -> tuple[np.ndarray, str]:
    try:
        image = session.frame(index)
    except SessionError as e:
        raise refusal(f"Cannot show frame {index}: {hide_paths(e)}") from None
    return upscale(image), frame_markdown(session, index)


def broken_sessions_markdown(summaries: list) -> str:
    broken = [s for s in summaries if not s.ok]
    if not summaries:
        root = display_path(config.SESSIONS_ROOT)
        return f"No sessions in `{root}`. Record one: `python record_session.py --pattern alternate --steps 200`."
    if not broken:
        return ""
    lines = [f"**{len(broken)} session(s) cannot be loaded:**"]
    lines += [f"- {markdown_escape(s.name)}: {markdown_escape(s.reason)}" for s in broken]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# handlers


def refresh_sessions() -> tuple[gr.Dropdown, str]:
    """Scan the sessions folder: loadable sessions go in the list, broken ones are listed with the reason."""
    summaries = scan_sessions()
    names = [s.name for s in summaries if s.ok]
    return gr.Dropdown(choices=names, value=names[0] if names else None), broken_sessions_markdown(summaries)


def load_session(session_choice: Any, user: UserState) -> tuple:
    """Load a session by name; the tab's model (if any) is kept and replays it at the next Run."""
    session = open_session(session_choice)
    image, frame_md = frame_outputs(session, 0)
    user.controller.load_session(session)
    info = session_info_markdown(session)
    if user.controller.has_model:
        info += "\n\n_The world model is kept: the next Run replays this session from the slider's frame._"
    slider = gr.Slider(minimum=0, maximum=session.num_frames - 1, value=0, step=1, interactive=True)
    return user, info, slider, image, frame_md, 0


def check_load_session(session_choice: Any, user: UserState) -> list[dict]:
    """Validator of ``load_session``: a name of a folder in the sessions folder."""
    return validated(lambda: session_folder(session_choice), None)


def frame_of(value: Any, user: UserState, what: str) -> int:
    """``value`` as a frame index of the loaded session; a refusal naming ``what`` otherwise."""
    session = require_session(user)
    return whole_number(value, what, 0, session.num_frames - 1)


def update_frame(frame_index: Any, user: UserState) -> tuple[np.ndarray, str, int]:
    """Show frame ``frame_index`` (the slider) with its step, timestamp and following action; the
    next Run starts there (also when the slider moves during a run)."""
    index = frame_of(frame_index, user, "Frame index")
    image, frame_md = frame_outputs(user.controller.session, index)
    user.controller.set_start_frame(index)
    return image, frame_md, index


def check_update_frame(frame_index: Any, user: UserState) -> list[dict]:
    """Validator of ``update_frame``."""
    return validated(lambda: frame_of(frame_index, user, "Frame index"), None)


def jump_to_frame(frame_number: Any, user: UserState) -> tuple:
    """Jump straight to a frame number; moves the slider too."""
    index = frame_of(frame_number, user, "Frame number")
    image, frame_md = frame_outputs(user.controller.session, index)
    user.controller.set_start_frame(index)
    return gr.Slider(value=index), image, frame_md


def check_jump_to_frame(frame_number: Any, user: UserState) -> list[dict]:
    """Validator of ``jump_to_frame``: a refused number leaves the frame, slider and text as they were."""
    return validated(lambda: frame_of(frame_number, user, "Frame number"), None)


# -----------------------------------------------------------------------------
# layout


def session_section() -> dict[str, Any]:
    """Section 1: choose and load a session, scrub its frames."""
    gr.Markdown("## 1. Session and frames", elem_classes=["section-title"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                session_dropdown = gr.Dropdown(label="Session", choices=[], allow_custom_value=True,
                                               elem_id="session-dropdown", scale=3)
                refresh_btn = gr.Button("↻ Refresh sessions", elem_id="refresh-btn", scale=1)
                load_btn = gr.Button("Load session", variant="primary", elem_id="load-btn", scale=1)
            broken_md = gr.Markdown(elem_id="broken-sessions")
            session_info = gr.Markdown("_No session loaded._", elem_id="session-info")
        with gr.Column(scale=1):
            frame_image = image_block("Frame (shown at 2x)", "frame-image", FRAME_HEIGHT)
            frame_slider = gr.Slider(0, 1, value=0, step=1, label="Frame (the next Run starts its replay here)",
                                     elem_id="frame-slider", interactive=False)
            with gr.Row():
                jump_number = gr.Number(value=0, precision=0, label="Frame number", elem_id="jump-number", scale=2)
                jump_btn = gr.Button("Jump to frame", elem_id="jump-btn", scale=1)
            frame_info = gr.Markdown(elem_id="frame-info")
    return {"session_dropdown": session_dropdown, "refresh_btn": refresh_btn, "load_btn": load_btn, "broken_md": broken_md, "session_info": session_info, "frame_image": frame_image, "frame_slider": frame_slider, "jump_number": jump_number, "jump_btn": jump_btn, "frame_info": frame_info}
