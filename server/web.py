"""The metrics port: ``/metrics`` (Prometheus), ``/api/stats`` (JSON) and the dashboard page at ``/``.

With tokens configured, the numbers need ``Authorization: Bearer`` (:class:`~.security.MetricsAccess`).

A small WSGI app on a threaded stdlib server in a daemon thread, as prometheus_client's own
``start_http_server`` does, so scrapes never wait on the gRPC event loop. The page and its
vendored chart library are files under ``dashboard/``, read once at start; nothing is fetched
from outside at run time.
"""

from __future__ import annotations

import errno
import json
import logging
import mimetypes
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .metrics import ServerMetrics
from .ports import PortInUse
from .security import AccessDenied, MetricsAccess
from .stats_view import StatsView
from .status import http_status

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
#: The window of ``/api/stats`` when the query names none (``?window=S``).
DEFAULT_WINDOW_S = 10.0

_StartResponse = Callable[..., Any]


def _static_files(root: Path) -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type) of every file under ``root``; ``/`` is index.html."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type == "application/javascript":
            content_type += "; charset=utf-8"
        files["/" + path.relative_to(root).as_posix()] = (path.read_bytes(), content_type)
    files["/"] = files["/index.html"]
    return files


class MetricsApp:
    """Routes the metrics port's requests; anything else is 404.

    ``/metrics`` and ``/api/stats`` need a bearer token when ``access`` says so; the dashboard's files
    hold no numbers and are open (the page sends the token with its own requests).
    """

    def __init__(self, metrics: ServerMetrics, view: StatsView, access: MetricsAccess) -> None:
        self._prometheus = make_wsgi_app(metrics.registry)
        self._view = view
        self._access = access
        self._files = _static_files(DASHBOARD_DIR)

    def __call__(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path in ("/metrics", "/api/stats"):
            try:
                self._access.check(environ.get("HTTP_AUTHORIZATION", ""))
            except AccessDenied as denied:
                return _respond(
                    start_response,
                    http_status(denied.code),
                    f"{denied.message}\n".encode(),
                    cache=False,
                    extra_headers=[("WWW-Authenticate", 'Bearer realm="vitcache metrics"')],
                )
        if path == "/metrics":
            return self._prometheus(environ, start_response)
        if path == "/api/stats":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            try:
                window_s = float(query.get("window", [DEFAULT_WINDOW_S])[0])
            except ValueError:
                return _respond(start_response, "400 Bad Request", b"window must be a number of seconds\n")
            body = json.dumps(self._view.stats(window_s)).encode()
            return _respond(start_response, "200 OK", body, "application/json", cache=False)
        if path in self._files:
            body, content_type = self._files[path]
            return _respond(start_response, "200 OK", body, content_type)
        return _respond(start_response, "404 Not Found", b"not found\n")


def _respond(
    start_response: _StartResponse,
    status: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    cache: bool = True,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra_headers]
    if not cache:
        headers.append(("Cache-Control", "no-store"))
    start_response(status, headers)
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


class MetricsHttpServer:
    """Serves :class:`MetricsApp` on ``host:port`` (0 picks a free port) until :meth:`stop`."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int, access: MetricsAccess) -> None:
        self._view = StatsView(metrics.registry)
        app = MetricsApp(metrics, self._view, access)
        try:
            self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host, port, "--metrics-port") from exc
            raise
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="vitcache-metrics", daemon=True)
        self._thread.start()
        self._view.start()

    def stop(self) -> None:
        self._view.stop()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
