"""What the app's server hands out, and to whom: no uploads, project and data folders never served,
and with ``--auth`` a login guard in front of every route.

Gradio-specific ASGI middleware, kept out of the app file so the layout and handlers read alone.
The app installs ``LoginGuard`` with ``--auth`` and passes ``never_served_paths`` and
``MAX_UPLOAD_BYTES`` to ``launch()``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

import config


# the app takes no files from a browser, so Gradio's upload route refuses any non-empty file:
# whatever the server hands out is a picture the app drew itself
MAX_UPLOAD_BYTES = 0
# with --auth, the only routes open without a login: the login page, its static files and the login itself
LOGIN_FREE_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt", "/manifest.json", "/pwa_icon",
    "/gradio_api/theme.css", "/gradio_api/login_check", "/gradio_api/login_check/", "/gradio_api/user",
    "/gradio_api/user/", "/gradio_api/token", "/gradio_api/token/", "/gradio_api/app_id", "/gradio_api/app_id/",
    "/gradio_api/startup-events",
})
LOGIN_FREE_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon/")
_API_INFO_SCRIPT = re.compile(rb"<script>\s*window\.gradio_api_info\s*=.*?</script>", re.S)
_NO_API_INFO = b'<script>window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'
_NOT_AUTHENTICATED = {"detail": {"error": "Not authenticated", "auth_message": None}}


def never_served_paths(temp_dir: str | os.PathLike) -> list[str]:
    """Folders Gradio must never serve, even where ``GRADIO_ALLOWED_PATHS`` opens them by mistake: the
    project (source code, a ``.env``) and the saved data (sessions, checkpoints), plus any
    ``GRADIO_BLOCKED_PATHS``. Where Gradio's temp folder (the pictures it hands out) lies inside one of
    them, everything beside the branch that holds it is blocked instead."""
    temp = Path(temp_dir).resolve()
    blocked = [p.strip() for p in os.environ.get("GRADIO_BLOCKED_PATHS", "").split(",") if p.strip()]
    for folder in dict.fromkeys(Path(f).resolve() for f in (config.PROJECT_ROOT, config.SAVED_ROOT)):
        if not temp.is_relative_to(folder):
            blocked.append(str(folder))
        elif temp != folder:
            branch = folder / temp.relative_to(folder).parts[0]
            try:
                blocked += [str(p) for p in sorted(folder.iterdir()) if p != branch]
            except OSError:
                pass
    return blocked


def _logged_in(gradio_app: Any, scope: dict) -> bool:
    """Whether the request carries the cookie of a login to this Gradio app (as Gradio checks it)."""
    tokens = getattr(gradio_app, "tokens", None)
    cookie_id = getattr(gradio_app, "cookie_id", None)
    if not tokens or not cookie_id:
        return False
    cookies = HTTPConnection(scope).cookies
    return any(cookies.get(f"{name}-{cookie_id}") in tokens for name in ("access-token", "access-token-unsecure"))


class LoginGuard:
    """ASGI middleware installed with ``--auth``: a request without a login reaches only the login page.

    Gradio (6.31) leaves some routes open without a login (heartbeat, cancel, reset, stream, run
    history) and embeds its whole API description, which ``/gradio_api/info`` keeps behind the
    login, in the page it serves before the login. This refuses every route outside
    ``LOGIN_FREE_PATHS`` with 401 and blanks the API description in the HTML it lets through.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or _logged_in(scope.get("app"), scope):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path not in LOGIN_FREE_PATHS and not path.startswith(LOGIN_FREE_PREFIXES):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await JSONResponse(_NOT_AUTHENTICATED, status_code=401)(scope, receive, send)
            return
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, self._without_api_info(send))

    @staticmethod
    def _without_api_info(send):
        start: dict | None = None
        chunks: list[bytes] = []

        async def send_page(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if Headers(raw=message["headers"]).get("content-type", "").startswith("text/html"):
                    start = message  # hold it: the length changes
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                page = _API_INFO_SCRIPT.sub(_NO_API_INFO, b"".join(chunks))
                headers = MutableHeaders(raw=list(start["headers"]))
                headers["content-length"] = str(len(page))
                await send({**start, "headers": headers.raw})
                await send({"type": "http.response.body", "body": page})
                return
            await send(message)

        return send_page
