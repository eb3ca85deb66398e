"""The server's HTTP edge, apart from what it serves: JSON that never fails to encode, the web UI's error bodies for
every error a request can cause, HTTP basic auth and the body limit before any route, and a uvicorn server in a
thread (for tests, benchmarks and embedding; `ldm serve` runs uvicorn itself)."""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import math
import sys
import threading
import time
import traceback

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..pipeline.request import RequestError
from .job_queue import QueueFull


class SafeJSON(JSONResponse):
    """Every answer's JSON, whatever a request echoed into it: NaN and infinities (valid Python floats, not JSON)
    become null, lone surrogates travel as \\u escapes; FastAPI's own encoder would fail on both with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class NotFound(Exception):
    """A name that names nothing this server has (a 404)."""


class EdgeMiddleware:
    """Auth first (HTTP basic, compared in constant time), then the body size: a declared Content-Length over the
    limit is refused before anything is read, and a body sent in chunks is counted as it arrives. Last, the
    catch-all: an exception no handler answered (a failure of the server, not of the request) is logged in one line
    (with its traceback under `debug`) and answered 500 without paths or reprs (`internal_error`), and the server
    goes on serving."""

    def __init__(self, app, api_auth: str | None, max_body: int, debug: bool = False):
        self.app, self.api_auth, self.max_body, self.debug = app, api_auth, max_body, debug

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        preflight = scope["method"] == "OPTIONS"  # a browser's CORS preflight carries no credentials
        if self.api_auth is not None and not preflight and not authorized(headers.get(b"authorization"), self.api_auth):
            answer = JSONResponse(
                status_code=401,
                content={"error": "Unauthorized", "detail": "Incorrect username or password"},
                headers={"WWW-Authenticate": "Basic"},
            )
            return await answer(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            answer = JSONResponse(
                status_code=413,
                content={"error": "PayloadTooLarge", "detail": f"request body over {self.max_body} bytes"},
            )
            return await answer(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # raised inside the body read: FastAPI answers it as raised
                raise HTTPException(status_code=413, detail=f"request body over {self.max_body} bytes")
            return message

        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception as e:  # FastAPI has answered it (`internal_error`) and raised it again for the log
            print(f"ldm serve: error: {scope['method']} {scope['path']}: {one_line(e)}", file=sys.stderr)
            if self.debug:
                traceback.print_exc()
            if not started:
                await internal_error(None, e)(scope, receive, send)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def internal_error(request, e: Exception) -> JSONResponse:
    """A failure of the server on a request: one line for the client that names no path and holds no repr (the
    server's log has the rest)."""
    return error(500, "InternalError", f"the server failed on this request ({type(e).__name__}); its log has more")


def authorized(header: bytes | None, credentials: str) -> bool:
    """HTTP basic auth against "user:password", compared in constant time (no early exit on the first mismatch)."""
    scheme, _, value = (header or b"").decode("latin-1").partition(" ")
    try:
        given = base64.b64decode(value, validate=True) if scheme.lower() == "basic" else b""
    except ValueError:  # binascii.Error, and the ValueError of a header with non-ASCII characters
        given = b""
    return hmac.compare_digest(given, credentials.encode())


def error(status: int, kind: str, detail: str, errors=None, headers=None) -> JSONResponse:
    """The web UI's error body."""
    content = {"error": kind, "detail": detail, "body": "", "errors": errors or ""}
    return SafeJSON(status_code=status, headers=headers, content=content)


async def request_error(request, e: RequestError):
    return error(422, "RequestError", str(e))


async def not_found(request, e: NotFound):
    return error(404, "NotFound", str(e.args[0]))


async def invalid(request, e: RequestValidationError):
    problems = [f"{'.'.join(str(p) for p in x['loc'][1:]) or 'body'}: {x['msg']}" for x in e.errors()]
    return error(422, "RequestValidationError", "; ".join(problems), errors=str(e.errors()))


async def http_error(request, e: HTTPException):
    return error(e.status_code, type(e).__name__, str(e.detail), headers=e.headers)


async def queue_full(request, e: QueueFull):
    return error(503, "QueueFull", str(e), headers={"Retry-After": "5"})


ERROR_HANDLERS = {
    RequestError: request_error,
    NotFound: not_found,
    RequestValidationError: invalid,
    HTTPException: http_error,
    QueueFull: queue_full,
    Exception: internal_error,  # everything else: the server's failure (FastAPI answers it, then raises it again)
}


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", timeout: float = 30):
    """Run an ASGI app with uvicorn in a thread of this process, on a free port of `host` -> its base URL; the
    server stops when the block ends. For tests, benchmarks and embedding (`ldm serve` runs uvicorn itself)."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
