"""Reusable test helpers (a loopback HTTP server for download tests and demos)."""

from tests.helpers.http_server import LoopbackHTTPServer, image_server, make_image, serve_directory

__all__ = ["LoopbackHTTPServer", "image_server", "make_image", "serve_directory"]
