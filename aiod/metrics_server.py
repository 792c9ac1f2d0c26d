"""The HTTP endpoint: /metrics, /healthz, /readyz, /status on threads of its own.

HTTP/1.1 with keep-alive, so Prometheus reuses its connection; a connection
idle for long is closed, a bounded number are served at once (beyond, 503 and
close), and requests are paced (:mod:`aiod.scrape_pacing`), because every
request costs Python time under the GIL the I/O loop needs.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Hashable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from aiod.scrape_pacing import RequestPacer, SharedRender

Response = tuple[int, bytes, str]   # status, body, Content-Type
Route = Callable[[], Response]

TEXT = "text/plain; charset=utf-8"
LISTEN_BACKLOG = 512        # many scrapers connecting at once queue instead of SYN-retrying
IDLE_TIMEOUT = 30.0         # an idle or stalled connection is closed after this long
MAX_REQUEST_RATE = 50.0     # requests answered per second, all clients together ...
REQUEST_BURST = 50          # ... after a burst of this many
MAX_CONNECTIONS = 1024      # connections served at once (a thread each); beyond, 503 and close


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    max_connections = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int],
                 handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        # One thread per connection, but never more than max_connections:
        # a flood of idle connections must not cost a thread each.
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _server_class(host: str, max_connections: int) -> type[_Server]:
    """A _Server for host's address family (IPv6 when it has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_Server):
        address_family = family

    Server.max_connections = max_connections
    return Server


def _handler_class(routes: dict[str, Route], pacer: RequestPacer,
                   idle_timeout: float) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler answering GET from routes (read at each request), paced by pacer."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = idle_timeout
        # Headers and body go out in two writes: with Nagle on, the body
        # waited for the client's delayed ACK, 40 ms on every keep-alive scrape.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            pacer.wait()
            path = self.path.split("?", 1)[0]
            route = routes.get(path)
            if route is not None:
                self._reply(*route())
            elif path == "/":
                names = ", ".join(sorted(routes))
                self._reply(200, f"aiod: see {names}\n".encode(), TEXT)
            else:
                self._reply(404, b"not found\n", TEXT)

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would flood the journal

    return Handler


class MetricsServer:
    """Serves /metrics, /healthz, /readyz, /status (and any added route) on threads of its own.

    HTTP/1.1 with keep-alive, so Prometheus reuses its connection; a
    connection idle for ``idle_timeout`` is closed, at most
    ``max_connections`` are served at once, and requests are paced to
    ``request_rate`` a second (:class:`RequestPacer`).
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 healthy: Callable[[], bool], ready: Callable[[], bool],
                 status: Callable[[], bytes] | None = None, *,
                 render_key: Callable[[], Hashable] = lambda: None,
                 idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 max_render_window: float = 1.0,
                 request_rate: float = MAX_REQUEST_RATE,
                 request_burst: int = REQUEST_BURST) -> None:
        self.render = SharedRender(lambda: generate_latest(registry), key=render_key,
                                   max_window=max_render_window)
        self.routes: dict[str, Route] = {}
        self.pacer = RequestPacer(request_rate, request_burst)
        self._add_standard_routes(healthy, ready, status)
        handler = _handler_class(self.routes, self.pacer, idle_timeout)
        self._httpd = _server_class(host, max_connections)((host, port), handler)
        self.host = host
        self.port = self._httpd.server_address[1]
        # serve_forever checks for shutdown every poll_interval: the default
        # 0.5 s would be most of a fast SIGTERM-to-exit.
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="metrics-http", daemon=True)

    def _add_standard_routes(self, healthy: Callable[[], bool], ready: Callable[[], bool],
                             status: Callable[[], bytes] | None) -> None:
        def health() -> Response:
            ok = healthy()
            return (200 if ok else 503), (b"ok\n" if ok else b"I/O loop stalled\n"), TEXT

        def readiness() -> Response:
            ok = ready()
            return (200 if ok else 503), (b"ready\n" if ok else b"not ready\n"), TEXT

        self.add_route("/metrics", lambda: (200, self.render.get(), CONTENT_TYPE_LATEST))
        self.add_route("/healthz", health)
        self.add_route("/readyz", readiness)
        if status is not None:
            self.add_route("/status", lambda: (200, status(), "application/json"))

    def add_route(self, path: str, route: Route) -> None:
        """Serve GET path with route() -> (status, body, Content-Type), on an HTTP thread."""
        self.routes[path] = route

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the address; safe before start() and twice."""
        if self._thread.ident is not None:  # shutdown() waits forever on a server never started
            self._httpd.shutdown()
        self._httpd.server_close()
