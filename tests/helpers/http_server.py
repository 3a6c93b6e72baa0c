"""A loopback HTTP server for download tests: well-behaved and misbehaving image hosts.

``image_server()`` serves the fixed routes below; ``serve_directory(path)`` serves a folder
of files (a sample pool's images) the same way, with the fixed routes still available.
Both are context managers yielding a :class:`LoopbackHTTPServer` bound to 127.0.0.1 on a
free port, with ``base_url`` and a log of what was requested.

Routes:
    /img/<name>.png | .jpg     a small image, distinct per name (or ``images[name]``)
    /slow/<name>.png           the same after ``slow_delay`` seconds
    /status/<code>             that status, text body
    /stall                     accepts the request, never answers
    /trickle                   200 image/png headers, then one byte per ``trickle_interval``
    /corrupt.png               image/png content type, garbage bytes
    /page.html                 text/html
    /loop, /loop-a, /loop-b    redirect loops (self, and a two-step cycle)
    /chain/<k>                 k redirects, then an image
    /to-img                    302 to /img/redirected.png
    /to-private                302 to http://10.0.0.1/x.png
    /to-metadata               302 to http://169.254.169.254/latest
    /huge.png                  Content-Length ``huge_size``, body streamed until the client leaves
    /huge-stream.png           no Content-Length, ``huge_size`` bytes streamed
    /noai.png                  an image with ``X-Robots-Tag: noai``
    /tagged.png?tag=<value>    an image with ``X-Robots-Tag: <value>``
    /flaky.png                 503 for the first ``flaky_failures`` requests, then an image
    /dup-a.png, /dup-b.png     the same bytes
    /dup-c.png                 the same pixels as /dup-a.png, different bytes (extra PNG chunk)
    anything else              a file under ``root`` if one was given, else 404
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

PRIVATE_TARGET = "http://10.0.0.1/x.png"
METADATA_TARGET = "http://169.254.169.254/latest"


def make_image(name: str, size: tuple[int, int] = (32, 24)) -> Image.Image:
    """A small RGB image whose colours derive from ``name``, so distinct names look distinct."""
    digest = hashlib.sha256(name.encode()).digest()
    img = Image.new("RGB", size, tuple(digest[:3]))
    w, h = size
    ImageDraw.Draw(img).rectangle([digest[3] % (w // 2), digest[4] % (h // 2), w - 1, h - 1], fill=tuple(digest[5:8]))
    return img


def encode(img: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    """Encode ``img`` with PIL (``fmt`` ``PNG`` or ``JPEG``)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


class LoopbackHTTPServer(ThreadingHTTPServer):
    """Threaded ``http.server`` on 127.0.0.1 serving the routes of this module.

    Args:
        root: optional folder served for paths no fixed route claims.
        images: ``name -> PIL image or encoded bytes`` for ``/img/<name>.<ext>``.
        huge_size: bytes declared (``/huge.png``) or streamed (``/huge-stream.png``).
        flaky_failures: 503s ``/flaky.png`` answers before the image.
        slow_delay: seconds ``/slow/...`` waits.
        trickle_interval: seconds between ``/trickle`` bytes.

    Attributes:
        base_url: ``http://127.0.0.1:<port>``.
        hits: requests per path (query excluded).
        requests: ``(path, Host header)`` per request, in arrival order.
        max_active_by_host: most requests in flight at once per ``Host`` header.
        bytes_sent: body bytes written per path.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | Path | None = None, images: dict[str, Image.Image | bytes] | None = None,
                 huge_size: int = 30_000_000, flaky_failures: int = 2, slow_delay: float = 0.3,
                 trickle_interval: float = 1.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root).resolve() if root is not None else None
        self.images = dict(images or {})
        self.huge_size = huge_size
        self.flaky_failures = flaky_failures
        self.slow_delay = slow_delay
        self.trickle_interval = trickle_interval
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.active_by_host: Counter[str] = Counter()
        self.max_active_by_host: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        dup = make_image("dup")
        self.dup_bytes = encode(dup)
        info = PngInfo()
        info.add_text("Comment", "same pixels, different file")
        self.dup_other_bytes = encode(dup, pnginfo=info)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def image_bytes(self, name: str, ext: str) -> bytes:
        """What ``/img/<name>.<ext>`` serves."""
        value = self.images.get(name)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        img = value if value is not None else make_image(name)
        return encode(img.convert("RGB"), "JPEG", quality=95) if ext in ("jpg", "jpeg") else encode(img)

    def start(self) -> LoopbackHTTPServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release stalled handlers, stop serving and close the socket."""
        self.stopping.set()
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        srv = self.server
        parts = urlsplit(self.path)
        path = parts.path
        host = self.headers.get("Host", "")
        with srv.lock:
            srv.hits[path] += 1
            count = srv.hits[path]
            srv.requests.append((path, host))
            srv.active_by_host[host] += 1
            srv.max_active_by_host[host] = max(srv.max_active_by_host[host], srv.active_by_host[host])
        try:
            self._route(path, parse_qs(parts.query), count)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with srv.lock:
                srv.active_by_host[host] -= 1

    def _route(self, path: str, query: dict[str, list[str]], count: int) -> None:
        srv = self.server
        if path.startswith("/img/") or path.startswith("/slow/"):
            name, _, ext = path.split("/", 2)[2].rpartition(".")
            if not name or ext not in ("png", "jpg", "jpeg"):
                return self._send(404, b"not found", "text/plain")
            if path.startswith("/slow/") and srv.stopping.wait(srv.slow_delay):
                return None
            ctype = "image/jpeg" if ext in ("jpg", "jpeg") else "image/png"
            return self._send(200, srv.image_bytes(name, ext), ctype)
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return self._send(code, f"status {code}".encode(), "text/plain")
        if path.startswith("/chain/"):
            k = int(path.rsplit("/", 1)[1])
            if k <= 0:
                return self._send(200, srv.image_bytes("chain-end", "png"), "image/png")
            return self._redirect(f"/chain/{k - 1}")
        simple = {
            "/corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 20, "image/png"),
            "/page.html": (b"<!doctype html><html><body>not an image</body></html>", "text/html; charset=utf-8"),
            "/dup-a.png": (srv.dup_bytes, "image/png"),
            "/dup-b.png": (srv.dup_bytes, "image/png"),
            "/dup-c.png": (srv.dup_other_bytes, "image/png"),
        }
        if path in simple:
            body, ctype = simple[path]
            return self._send(200, body, ctype)
        redirects = {"/loop": "/loop", "/loop-a": "/loop-b", "/loop-b": "/loop-a", "/to-img": "/img/redirected.png",
                     "/to-private": PRIVATE_TARGET, "/to-metadata": METADATA_TARGET}
        if path in redirects:
            return self._redirect(redirects[path])
        if path == "/noai.png":
            return self._send(200, srv.image_bytes("noai", "png"), "image/png", {"X-Robots-Tag": "noai"})
        if path == "/tagged.png":
            tags = query.get("tag", [])
            return self._send(200, srv.image_bytes("tagged", "png"), "image/png",
                              [("X-Robots-Tag", tag) for tag in tags])
        if path == "/flaky.png":
            if count <= srv.flaky_failures:
                return self._send(503, b"try again", "text/plain")
            return self._send(200, srv.image_bytes("flaky", "png"), "image/png")
        if path == "/stall":
            srv.stopping.wait()
            return None
        if path == "/trickle":
            self._head(200, "image/png", None)
            while not srv.stopping.is_set():
                self._write(path, b"\x89")
                srv.stopping.wait(srv.trickle_interval)
            return None
        if path in ("/huge.png", "/huge-stream.png"):
            self._head(200, "image/png", srv.huge_size if path == "/huge.png" else None)
            chunk = b"\0" * 65536
            sent = 0
            while sent < srv.huge_size and not srv.stopping.is_set():
                piece = chunk[: srv.huge_size - sent]
                self._write(path, piece)
                sent += len(piece)
            return None
        return self._file(path)

    def _file(self, path: str) -> None:
        root = self.server.root
        if root is not None:
            target = (root / path.lstrip("/")).resolve()
            if target.is_file() and target.is_relative_to(root):
                ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                return self._send(200, target.read_bytes(), ctype)
        return self._send(404, b"not found", "text/plain")

    def _head(self, status: int, ctype: str, length: int | None,
              headers: dict[str, str] | list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in (headers.items() if isinstance(headers, dict) else headers or []):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.flush()

    def _write(self, path: str, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        with self.server.lock:
            self.server.bytes_sent[path] += len(data)

    def _send(self, status: int, body: bytes, ctype: str,
              headers: dict[str, str] | list[tuple[str, str]] | None = None) -> None:
        self._head(status, ctype, len(body), headers)
        self._write(urlsplit(self.path).path, body)

    def _redirect(self, location: str) -> None:
        self._head(302, "text/plain", 0, {"Location": location})


@contextmanager
def image_server(**kwargs: Any) -> Iterator[LoopbackHTTPServer]:
    """Run a :class:`LoopbackHTTPServer` for the duration of the block.

    Args:
        kwargs: passed to :class:`LoopbackHTTPServer` (``images``, ``huge_size``, ...).
    """
    with LoopbackHTTPServer(**kwargs) as server:
        yield server


@contextmanager
def serve_directory(path: str | Path, **kwargs: Any) -> Iterator[LoopbackHTTPServer]:
    """Serve the files under ``path`` at ``<base_url>/<relative path>`` for the block.

    Content types are guessed from the file names; paths outside ``path`` are 404.

    Args:
        path: the folder to serve.
        kwargs: passed to :class:`LoopbackHTTPServer`.
    """
    with LoopbackHTTPServer(root=path, **kwargs) as server:
        yield server


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
