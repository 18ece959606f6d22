"""What the app's server hands out, and to whom: no uploads, project and data folders never served,
and with ``--auth`` a login guard in front of every route and a growing delay after wrong passwords.

Gradio-specific ASGI middleware, kept out of the app file so the layout and handlers read alone.
The app always installs ``UploadRefusal``, with ``--auth`` also ``LoginGuard`` and ``LoginDelay``, and
passes ``never_served_paths`` and ``MAX_UPLOAD_BYTES`` to ``launch()``. The app's ``main()`` calls
``configure_from_env()`` once: ``CWM_LOGIN_DELAY_BASE_S`` and ``CWM_LOGIN_DELAY_CAP_S`` set the login
delays (tests shorten them).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

import config


# the app takes no files from a browser, so Gradio's upload route refuses any non-empty file:
# whatever the server hands out is a picture the app drew itself
MAX_UPLOAD_BYTES = 0
# Gradio's routes that store a file from a browser; UploadRefusal refuses them, empty files included
UPLOAD_PATHS = frozenset({"/gradio_api/upload", "/gradio_api/process_recording"})
# the k-th wrong password in a row from one client address is answered after min(base * 2**(k-1), cap) seconds
LOGIN_DELAY_BASE_S = 0.25
# the longest wait for a wrong password: at most one guess per 30 s from one address, once it is reached
LOGIN_DELAY_CAP_S = 30.0
# a client address that tries no login for this long is forgotten (its count of failures starts again)
LOGIN_FORGET_S = 600.0
# at most this many client addresses are remembered; the longest idle ones are forgotten first
LOGIN_MAX_CLIENTS = 10_000
# Gradio (6.31) answers a wrong user name or password posted to /login with 400 "Incorrect credentials."
WRONG_CREDENTIALS = 400
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
_NO_UPLOADS = {"detail": f"This app accepts no uploads (maximum allowed size of {MAX_UPLOAD_BYTES} bytes)."}
_ONE_LOGIN_AT_A_TIME = {"detail": "Too many login attempts: wait for the answer to the previous one."}


def configure_from_env(environ: Mapping[str, str] | None = None) -> None:
    """Set the login delays from ``CWM_LOGIN_DELAY_BASE_S`` and ``CWM_LOGIN_DELAY_CAP_S`` (once, in ``main()``)."""
    global LOGIN_DELAY_BASE_S, LOGIN_DELAY_CAP_S
    env = os.environ if environ is None else environ
    LOGIN_DELAY_BASE_S = float(env.get("CWM_LOGIN_DELAY_BASE_S", LOGIN_DELAY_BASE_S))
    LOGIN_DELAY_CAP_S = float(env.get("CWM_LOGIN_DELAY_CAP_S", LOGIN_DELAY_CAP_S))


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


def _route(scope: dict) -> str:
    """The request's path inside the app (without the ``root_path`` it is mounted under)."""
    path = scope.get("path", "")
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


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
        path = _route(scope)
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


class UploadRefusal:
    """ASGI middleware always installed: every request to ``UPLOAD_PATHS`` is refused with 413.

    ``max_file_size=0`` makes Gradio (6.31) refuse a non-empty file, but it still stores an empty one.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _route(scope).rstrip("/") in UPLOAD_PATHS:
            await JSONResponse(_NO_UPLOADS, status_code=413)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@dataclass
class _LoginClient:
    """What LoginDelay remembers of one client address."""

    seen: float  # time.monotonic() of its last login attempt
    failures: int = 0  # wrong passwords in a row
    busy: bool = False  # a login of it is being answered (or its answer waits)


class LoginDelay:
    """ASGI middleware installed with ``--auth``: wrong passwords are answered ever slower, per client address.

    The answer to the k-th wrong password in a row waits min(LOGIN_DELAY_BASE_S * 2**(k-1),
    LOGIN_DELAY_CAP_S) seconds (asyncio.sleep: other clients go on); the right password is answered at
    once and resets the count. A client sends one login at a time: another while its previous one is
    answered gets 429 without a check, so guesses cannot run in parallel. The address is the peer's
    (X-Forwarded-For could be forged); behind a proxy or the share tunnel, all visitors share one.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.clients: dict[str, _LoginClient] = {}  # address -> state, the longest idle first

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or _route(scope).rstrip("/") != "/login":
            await self.app(scope, receive, send)
            return
        client = self._client((scope.get("client") or ("",))[0])
        if client.busy:
            await JSONResponse(_ONE_LOGIN_AT_A_TIME, status_code=429)(scope, receive, send)
            return
        client.busy = True
        try:
            await self.app(scope, receive, self._slow_on_failure(send, client))
        finally:
            client.busy = False

    def _client(self, address: str) -> _LoginClient:
        """The state of ``address``, moved to the end of the table; idle and surplus clients are forgotten."""
        now = time.monotonic()
        client = self.clients.pop(address, None) or _LoginClient(seen=now)
        client.seen = now
        for oldest in list(self.clients):
            if now - self.clients[oldest].seen < LOGIN_FORGET_S and len(self.clients) < LOGIN_MAX_CLIENTS:
                break
            del self.clients[oldest]
        self.clients[address] = client
        return client

    @staticmethod
    def _slow_on_failure(send, client: _LoginClient):
        async def send_answer(message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == WRONG_CREDENTIALS:
                    client.failures += 1
                    doubled = LOGIN_DELAY_BASE_S * 2.0 ** min(client.failures - 1, 60)  # 2**60: far past any cap
                    await asyncio.sleep(min(doubled, LOGIN_DELAY_CAP_S))
                elif message["status"] == 200:
                    client.failures = 0
            await send(message)

        return send_answer
