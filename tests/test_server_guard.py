"""The server's guards (server_guard.py) through the launched app, and the login delay on its own.

- wrong passwords posted to ``/login`` are answered ever slower; the right one still logs in;
- one client waiting out its delay holds up no other client, and the table of clients stays bounded;
- Gradio's upload routes refuse every file, an empty one included, with or without ``--auth``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.cookiejar import CookieJar

import pytest

import server_guard
from conftest import AUTH_PASSWORD, AUTH_USER, LOGIN_DELAY_BASE_S, LOGIN_DELAY_CAP_S

USER, PASSWORD = AUTH_USER, AUTH_PASSWORD
DELAY_BASE_S, DELAY_CAP_S = LOGIN_DELAY_BASE_S, LOGIN_DELAY_CAP_S  # the guarded app's login delays
WRONG_PASSWORD = 400  # Gradio's answer to wrong credentials
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -----------------------------------------------------------------------------
# helpers


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         opener: urllib.request.OpenerDirector | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; never raises for an HTTP error status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with (opener or urllib.request.build_opener()).open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def timed_login(url: str, password: str, opener=None) -> tuple[int, float]:
    """(status, seconds) of one login attempt."""
    form = urllib.parse.urlencode({"username": USER, "password": password}).encode()
    start = time.monotonic()
    status, _ = http(url + "login", "POST", form, FORM, opener)
    return status, time.monotonic() - start


def multipart(field: str, name: str, content: bytes) -> tuple[bytes, dict]:
    body = (b"--b0undary\r\nContent-Disposition: form-data; name=\"" + field.encode() + b"\"; filename=\"" +
            name.encode() + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--b0undary--\r\n")
    return body, {"Content-Type": "multipart/form-data; boundary=b0undary"}


async def fake_gradio_login(scope, receive, send) -> None:
    """Gradio's /login in miniature: 200 for the body ``right``, 400 for anything else."""
    body = (await receive()).get("body", b"")
    status = 200 if body == b"right" else WRONG_PASSWORD
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def login(guard, address: str, password: str) -> tuple[int, float]:
    """(status, seconds) of one login posted to ``guard`` from ``address``."""
    scope = {"type": "http", "method": "POST", "path": "/login", "root_path": "", "client": (address, 50000),
             "headers": []}
    sent = []

    async def receive():
        return {"type": "http.request", "body": password.encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    start = time.monotonic()
    await guard(scope, receive, send)
    return sent[0]["status"], time.monotonic() - start


@pytest.fixture
def guarded(guarded_server):
    return guarded_server


@pytest.fixture
def short_delays(monkeypatch):
    monkeypatch.setattr(server_guard, "LOGIN_DELAY_BASE_S", 0.05)
    monkeypatch.setattr(server_guard, "LOGIN_DELAY_CAP_S", 0.4)


# -----------------------------------------------------------------------------
# failed logins


def test_wrong_passwords_are_answered_ever_slower_and_the_right_one_still_logs_in(guarded):
    url = guarded.url
    answers = [timed_login(url, f"guess-{k}") for k in range(6)]
    assert [status for status, _ in answers] == [WRONG_PASSWORD] * 6
    for k, (_, seconds) in enumerate(answers):  # failure k + 1 in a row waits min(base * 2**k, cap)
        assert seconds >= min(DELAY_BASE_S * 2**k, DELAY_CAP_S) - 0.01, (k, answers)
    # the right password is answered at once and logs in; the next failure starts again from the base delay
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    status, seconds = timed_login(url, PASSWORD, opener)
    assert status == 200 and seconds < DELAY_BASE_S, seconds
    assert http(url + "config", opener=opener)[0] == 200
    status, seconds = timed_login(url, "guess-again")
    assert status == WRONG_PASSWORD and DELAY_BASE_S - 0.01 <= seconds < DELAY_CAP_S, seconds


def test_a_client_waiting_out_its_delay_holds_up_no_other_client(short_delays):
    async def scenario():
        guard = server_guard.LoginDelay(fake_gradio_login)
        for _ in range(4):  # client A's delay climbs to the cap
            await login(guard, "10.0.0.1", "wrong")
        slow = asyncio.create_task(login(guard, "10.0.0.1", "wrong"))
        await asyncio.sleep(0.01)
        at_once = await login(guard, "10.0.0.1", "wrong")  # A again while its answer waits
        others = await asyncio.gather(login(guard, "10.0.0.2", "right"), login(guard, "10.0.0.2", "wrong"))
        return await slow, at_once, others

    slow, at_once, (right, wrong) = asyncio.run(scenario())
    assert slow[0] == WRONG_PASSWORD and slow[1] >= 0.39
    assert at_once[0] == 429 and at_once[1] < 0.05  # one login at a time per client: no guessing in parallel
    assert right[0] == 200 and right[1] < 0.05  # client B: answered at once while A waits ...
    assert wrong[0] == WRONG_PASSWORD and 0.04 <= wrong[1] < 0.3  # ... and its own first failure waits the base


def test_a_success_resets_the_delay_and_the_client_table_stays_bounded(short_delays, monkeypatch):
    monkeypatch.setattr(server_guard, "LOGIN_MAX_CLIENTS", 3)

    async def scenario():
        guard = server_guard.LoginDelay(fake_gradio_login)
        for _ in range(3):
            await login(guard, "10.0.0.1", "wrong")
        assert (await login(guard, "10.0.0.1", "right"))[0] == 200
        after_success = await login(guard, "10.0.0.1", "wrong")
        for k in range(5):
            await login(guard, f"10.0.1.{k}", "wrong")
        full = len(guard.clients)
        monkeypatch.setattr(server_guard, "LOGIN_FORGET_S", 0.0)  # every client is now idle long enough
        await login(guard, "10.0.2.1", "wrong")
        return after_success, full, list(guard.clients)

    after_success, full, left = asyncio.run(scenario())
    assert after_success[0] == WRONG_PASSWORD and after_success[1] < 0.1
    assert full == 3 and left == ["10.0.2.1"]


# -----------------------------------------------------------------------------
# uploads


@pytest.mark.parametrize("login", [False, True], ids=["without-auth", "logged-in"])
def test_every_upload_is_refused_an_empty_one_included(login, app_server, guarded):
    server = guarded if login else app_server
    opener = None
    if login:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        assert timed_login(server.url, PASSWORD, opener)[0] == 200
    names = []
    for route, field in (("gradio_api/upload", "files"), ("gradio_api/process_recording", "video")):
        for content in (b"", b"hello"):
            name = f"upload-{uuid.uuid4().hex}.txt"
            names.append(name)
            status, answer = http(server.url + route, "POST", *multipart(field, name, content), opener)
            assert status == 413, (route, content, status, answer)
            assert "accepts no uploads" in json.loads(answer)["detail"], answer
    time.sleep(0.5)  # Gradio moves uploaded files in a background task
    for name in names:
        assert not list(server.temp_dir.rglob(name)), name
