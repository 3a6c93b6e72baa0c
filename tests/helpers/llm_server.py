"""A loopback OpenAI-compatible server for tests: scriptable answers, recorded requests.

``FakeLLMServer`` listens on 127.0.0.1 (port 0: the OS picks a free one) in a thread and
serves ``POST /v1/completions`` and ``POST /v1/chat/completions``. Each request is
recorded (path, headers, JSON body) and answered by a *handler*: a function of the
request and its attempt number (how many earlier requests carried the same caption),
which returns a ``Reply``. Handlers for the cases the tests need are built by
``echo``, ``fixed``, ``fail_then``, ``always`` and ``slow``. A request whose bearer token
is not ``api_key`` gets 401 before any handler runs, like the real API.

Example::

    with FakeLLMServer(api_key="sk-test", handler=fail_then(429, times=2)) as server:
        ...  # point a writer at server.base_url
        assert server.requests[0].headers["authorization"] == "Bearer sk-test"
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROMPT_SEPARATOR = "\n##\n"


@dataclass
class RecordedRequest:
    """One request as the server saw it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def caption(self) -> str | None:
        """The caption the request is about (completions prompt or last chat user message)."""
        return caption_of(self.body)


@dataclass
class Reply:
    """What the server sends back: a status, a JSON body (or raw bytes), headers, a delay."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Handler = Callable[[RecordedRequest, int], Reply]


def caption_of(body: Any) -> str | None:
    """The caption inside a completions or chat request body."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("prompt"), str):
        prompt = body["prompt"]
        if prompt.endswith(PROMPT_SEPARATOR):
            prompt = prompt[: -len(PROMPT_SEPARATOR)]
        return prompt.split("\n")[-1]
    messages = body.get("messages") or []
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else None


def echo_text(caption: str) -> str:
    """A valid InstructPix2Pix completion derived from the caption."""
    return f"make it snowy\n%%\n{caption} in the snow\nEND"


def completion_reply(request: RecordedRequest, text: str, finish_reason: str = "stop",
                     model: str = "fake-llm-0001") -> Reply:
    """A 200 reply carrying ``text`` in the shape of the request's API, with ``stop`` applied."""
    body = request.body if isinstance(request.body, dict) else {}
    for stop in body.get("stop") or []:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    if request.path.endswith("/chat/completions"):
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return Reply(200, {"id": "cmpl-test", "object": obj, "model": model, "choices": [choice],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """An OpenAI-style error reply."""
    return Reply(status, {"error": {"message": message, "type": "test_error", "code": status}}, headers or {})


def echo() -> Handler:
    """Answer every caption with ``echo_text(caption)``."""
    return lambda req, attempt: completion_reply(req, echo_text(req.caption or ""))


def fixed(text: str | Callable[[str], str], finish_reason: str = "stop") -> Handler:
    """Answer with a given completion text (or a function of the caption): malformed answers."""
    return lambda req, attempt: completion_reply(
        req, text(req.caption or "") if callable(text) else text, finish_reason)


def fail_then(status: int, times: int, then: Handler | None = None,
              retry_after: float | None = None) -> Handler:
    """Fail each caption's first ``times`` requests with ``status``, then hand over to ``then``."""
    after = then or echo()
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}

    def handler(req: RecordedRequest, attempt: int) -> Reply:
        if attempt < times:
            return error_reply(status, f"scripted failure {attempt + 1} of {times}", headers)
        return after(req, attempt)
    return handler


def always(status: int, message: str = "scripted failure") -> Handler:
    """Fail every request with ``status``."""
    return lambda req, attempt: error_reply(status, message)


def slow(delay: float, then: Handler | None = None) -> Handler:
    """Answer like ``then`` (default ``echo``) after ``delay`` seconds."""
    after = then or echo()

    def handler(req: RecordedRequest, attempt: int) -> Reply:
        reply = after(req, attempt)
        reply.delay = delay
        return reply
    return handler


class FakeLLMServer:
    """A threaded OpenAI-compatible HTTP server on 127.0.0.1 for one test (a context manager).

    Args:
        api_key: the bearer token it accepts; None accepts any request, with or without one.
        handler: answers each request (default ``echo()``); may be replaced while running.
    """

    def __init__(self, api_key: str | None = "sk-test-key", handler: Handler | None = None) -> None:
        self.api_key = api_key
        self.handler: Handler = handler or echo()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The API root to configure a client with (``http://127.0.0.1:PORT/v1``)."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeLLMServer:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(data) if data else None
                except ValueError:
                    body = data.decode("utf-8", "replace")
                req = RecordedRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                reply = server._dispatch(req)
                try:
                    if reply.delay:
                        time.sleep(reply.delay)
                    payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        httpd = self._httpd
        self._thread = threading.Thread(target=lambda: httpd.serve_forever(poll_interval=0.05), name="fake-llm",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _dispatch(self, req: RecordedRequest) -> Reply:
        with self._lock:
            self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            key = req.caption or ""
            attempt = self._attempts[key]
            self._attempts[key] += 1
        if self.api_key is not None and req.headers.get("authorization") != f"Bearer {self.api_key}":
            return error_reply(401, "Incorrect API key provided.")
        if req.path not in ("/v1/completions", "/v1/chat/completions"):
            return error_reply(404, f"no route {req.path}")
        return self.handler(req, attempt)
