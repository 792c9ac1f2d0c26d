"""Prometheus exposition: a collector over pool snapshots, and the HTTP endpoint.

The collector owns no counters. At scrape time it asks the daemon for
snapshots (copied under the pools' locks) and formats them outside any lock,
so a scrape never slows the I/O loop by more than the copy.

Rendering still runs Python code that shares the GIL with the I/O loop, so
scrapes share renderings (:class:`SharedRender`): however many clients
scrape, rendering takes a bounded share of the process's time.
"""

from __future__ import annotations

import errno as _errno
import http.server
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from aiod import __version__
from aiod.accounting import LATENCY_BUCKETS
from aiod.pool import PoolSnapshot

# The states aiod_job_state shows (jobs.JobState's values; listed here so the
# collector does not depend on the jobs module).
JOB_STATES = ("starting", "preparing", "running", "reopening", "error", "stopping",
              "stopped")


@dataclass
class JobView:
    """What the collector needs of a job, copied by the I/O loop's owner."""

    name: str
    pool: str
    state: str
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    skipped: int = 0
    type: str = ""          # probe or load
    op: str = ""            # the configured op (randread, write, ...)
    timeout: float = 0.0    # seconds an op may be in flight before it counts as hung


class Source(Protocol):
    """What the daemon exposes to the collector (all thread-safe)."""

    def pool_snapshots(self) -> list[PoolSnapshot]: ...
    def job_views(self) -> list[JobView]: ...
    def aio_usage(self) -> tuple[int, int]: ...
    def reload_status(self) -> tuple[bool, float]: ...


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


class AiodCollector:
    """Reads the daemon's state at scrape time (prometheus_client Collector protocol)."""

    def __init__(self, source: Source) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        src = self._source
        # Both read before anything is yielded: one moment's view of pools and jobs.
        pools = src.pool_snapshots()
        jobs = src.job_views()
        info = GaugeMetricFamily("aiod_build_info", "aiod build information; always 1.",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from _context_families(pools)
        families, last_completion = _op_families(pools)
        yield from families
        yield from _job_families(jobs, last_completion)
        yield from _kernel_and_reload_families(src)


def _context_families(pools: list[PoolSnapshot]) -> list[Metric]:
    """Each pool's contexts: their states, setups and destroys, its ops in flight."""
    contexts = GaugeMetricFamily("aiod_contexts", "Kernel AIO contexts by lifecycle state.",
                                 labels=["pool", "state"])
    in_flight = GaugeMetricFamily("aiod_ops_in_flight",
                                  "Operations submitted to the kernel and not yet finished.",
                                  labels=["pool"])
    oldest = GaugeMetricFamily("aiod_ops_oldest_in_flight_seconds",
                               "Age of the oldest operation still in flight (0 when none): "
                               "hung I/O shows here.", labels=["pool"])
    setups = CounterMetricFamily("aiod_context_setups", "Successful io_setup calls.",
                                 labels=["pool"])
    destroys = CounterMetricFamily("aiod_context_destroys", "Successful io_destroy calls.",
                                   labels=["pool"])
    destroy_fail = CounterMetricFamily("aiod_context_destroy_failures",
                                       "Contexts whose io_destroy failed or did not return "
                                       "in time.", labels=["pool"])
    setup_fail = CounterMetricFamily("aiod_context_setup_failures",
                                     "io_setup calls that failed, by errno.",
                                     labels=["pool", "errno"])
    setup_fail_any = CounterMetricFamily("aiod_context_setup_failures_any",
                                         "io_setup calls that failed, any errno (exported "
                                         "at zero).", labels=["pool"])
    for p in pools:
        for ctx_state, n in p.contexts_by_state().items():
            contexts.add_metric([p.name, ctx_state], n)
        in_flight.add_metric([p.name], p.in_flight)
        oldest.add_metric([p.name], p.oldest_in_flight_seconds)
        setups.add_metric([p.name], p.setups)
        destroys.add_metric([p.name], p.destroys)
        destroy_fail.add_metric([p.name], p.destroy_failures)
        for err, n in sorted(p.setup_failures.items()):
            setup_fail.add_metric([p.name, errno_name(err)], n)
        setup_fail_any.add_metric([p.name], sum(p.setup_failures.values()))
    return [contexts, in_flight, oldest, setups, destroys, destroy_fail, setup_fail,
            setup_fail_any]


def _op_families(pools: list[PoolSnapshot]) -> tuple[list[Metric], dict[str, float]]:
    """Every (pool, job, op) series: outcomes and latency; and each job's last completion."""
    submitted = CounterMetricFamily("aiod_ops_submitted", "Operations submitted.",
                                    labels=["pool", "job", "op"])
    completed = CounterMetricFamily("aiod_ops_completed",
                                    "Operations that completed successfully.",
                                    labels=["pool", "job", "op"])
    cancelled = CounterMetricFamily("aiod_ops_cancelled",
                                    "Operations cancelled (including those in flight when "
                                    "their context was destroyed).",
                                    labels=["pool", "job", "op"])
    failed = CounterMetricFamily("aiod_ops_failed", "Operations that failed, by errno.",
                                 labels=["pool", "job", "op", "errno"])
    # The errno-labelled series above appear only with their first failure,
    # and increase() cannot see that first step. These have no label known
    # only at failure time, so they exist at zero from the start.
    failed_any = CounterMetricFamily("aiod_ops_failed_any",
                                     "Operations that failed, any errno (aiod_ops_failed_total "
                                     "summed over errno, exported at zero).",
                                     labels=["pool", "job", "op"])
    latency = HistogramMetricFamily("aiod_op_latency_seconds",
                                    "Operation latency from submit to completion.",
                                    labels=["pool", "job", "op"], unit="")
    last_completion: dict[str, float] = {}
    for p in pools:
        for st in p.stats:
            labels = [p.name, st.job, st.op]
            submitted.add_metric(labels, st.submitted)
            completed.add_metric(labels, st.completed)
            cancelled.add_metric(labels, st.cancelled)
            for err, n in sorted(st.failed.items()):
                failed.add_metric(labels + [errno_name(err)], n)
            failed_any.add_metric(labels, sum(st.failed.values()))
            latency.add_metric(labels, _latency_buckets(st.buckets), st.latency_sum_ns / 1e9)
            if st.last_completion is not None:
                last_completion[st.job] = max(last_completion.get(st.job, 0.0),
                                              st.last_completion)
    return [submitted, completed, cancelled, failed, failed_any, latency], last_completion


def _latency_buckets(counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one past every bound) as cumulative Prometheus buckets."""
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, n in zip(LATENCY_BUCKETS, counts):
        cumulative += n
        buckets.append((_fmt(bound), cumulative))
    buckets.append(("+Inf", cumulative + counts[-1]))
    return buckets


def _job_families(jobs: list[JobView], last_completion: dict[str, float]) -> list[Metric]:
    """Each job's state, configuration and the errors that are not an op's outcome."""
    last = GaugeMetricFamily("aiod_job_last_completion_timestamp_seconds",
                             "Unix time of the job's last completed operation "
                             "(0 before the first).", labels=["job"])
    up = GaugeMetricFamily("aiod_job_running", "1 when the job is doing I/O, 0 when its "
                           "target is unusable, being prepared, or it is stopping.",
                           labels=["job", "pool"])
    state = GaugeMetricFamily("aiod_job_state", "1 for the state the job is in: preparing "
                              "(its target is being created and filled), running, reopening (its target "
                              "changed under it), error "
                              "(target unusable, retried), stopping.",
                              labels=["job", "state"])
    errors = CounterMetricFamily("aiod_job_errors", "Job errors that are not an operation's "
                                 "own outcome (target missing, permission, full disk, "
                                 "refused write), by reason.", labels=["job", "reason"])
    errors_any = CounterMetricFamily("aiod_job_errors_any", "Job errors, any reason "
                                     "(exported at zero).", labels=["job"])
    job_info = GaugeMetricFamily("aiod_job_info", "The job's configuration; always 1.",
                             labels=["job", "pool", "type", "op"])
    timeout = GaugeMetricFamily("aiod_job_timeout_seconds", "How long an operation of the "
                                "job may be in flight before it counts as hung.",
                                labels=["job", "pool"])
    timeouts = CounterMetricFamily("aiod_job_op_timeouts", "Operations still in flight past "
                                   "the job's timeout (hung I/O).", labels=["job"])
    skipped = CounterMetricFamily("aiod_job_skipped_ops", "Operations not issued because "
                                  "the job's iodepth or the pool was full.", labels=["job"])
    for j in jobs:
        last.add_metric([j.name], last_completion.get(j.name, 0.0))
        up.add_metric([j.name, j.pool], 1 if j.state == "running" else 0)
        for st_name in JOB_STATES:
            state.add_metric([j.name, st_name], 1 if j.state == st_name else 0)
        for reason, n in sorted(j.errors.items()):
            errors.add_metric([j.name, reason], n)
        errors_any.add_metric([j.name], sum(j.errors.values()))
        job_info.add_metric([j.name, j.pool, j.type, j.op], 1)
        timeout.add_metric([j.name, j.pool], j.timeout)
        timeouts.add_metric([j.name], j.timeouts)
        skipped.add_metric([j.name], j.skipped)
    return [last, up, state, errors, errors_any, job_info, timeout, timeouts, skipped]


def _kernel_and_reload_families(src: Source) -> Iterator[Metric]:
    """The host's AIO usage and whether the last configuration load succeeded."""
    nr, max_nr = src.aio_usage()
    g = GaugeMetricFamily("aiod_kernel_aio_nr", "fs.aio-nr: AIO events allocated system-wide.")
    g.add_metric([], nr)
    yield g
    g = GaugeMetricFamily("aiod_kernel_aio_max_nr", "fs.aio-max-nr: the system-wide limit.")
    g.add_metric([], max_nr)
    yield g
    ok, ts = src.reload_status()
    g = GaugeMetricFamily("aiod_config_last_reload_successful",
                          "1 when the last configuration load succeeded.")
    g.add_metric([], 1 if ok else 0)
    yield g
    g = GaugeMetricFamily("aiod_config_last_reload_success_timestamp_seconds",
                          "Unix time of the last successful configuration load.")
    g.add_metric([], ts)
    yield g


def _fmt(bound: float) -> str:
    return repr(float(bound))


def make_registry(source: Source) -> CollectorRegistry:
    """Our own registry: never the global one (tests would collide)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AiodCollector(source))
    return registry


# ------------------------------------------------------------ shared render
class SharedRender:
    """One rendering of /metrics shared by every scrape within its window.

    A rendering is reused for ``cost_factor`` times what it took to make,
    never longer than ``max_window`` seconds: rendering then takes at most
    about 1/(cost_factor + 1) of one thread's time, whether one client
    scrapes back to back or twenty do. A scrape that arrives while a
    rendering is under way waits for that one instead of starting another.
    When ``key()`` changes (the daemon passes its reload status) the next
    scrape renders anew, so a reload shows in the very next scrape.
    """

    def __init__(self, render: Callable[[], bytes], *,
                 key: Callable[[], Hashable] = lambda: None,
                 max_window: float = 1.0, cost_factor: float = 20.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._render = render
        self._key = key
        self.max_window = max_window
        self.cost_factor = cost_factor
        self._clock = clock
        self._cond = threading.Condition()
        self._body: bytes | None = None
        self._body_key: Hashable = None
        self._expires = 0.0
        self._rendering = False
        self._generation = 0    # renderings finished so far
        self.renders = 0        # how many renderings were made (tests, benchmarks)
        self.shared = 0         # how many scrapes were answered with another's rendering

    def get(self) -> bytes:
        with self._cond:
            arrived = self._generation
            while True:
                body = self._body
                if body is not None and self._body_key == self._key() and (
                        self._clock() < self._expires or self._generation != arrived):
                    # Fresh, or finished while this scrape waited for it.
                    self.shared += 1
                    return body
                if not self._rendering:
                    break
                self._cond.wait()
            self._rendering = True
            key = self._key()
        t0 = self._clock()
        try:
            body = self._render()
        except BaseException:
            with self._cond:
                self._rendering = False
                self._cond.notify_all()
            raise
        with self._cond:
            now = self._clock()
            self._body, self._body_key = body, key
            self._expires = now + min(self.max_window, (now - t0) * self.cost_factor)
            self._rendering = False
            self._generation += 1
            self.renders += 1
            self._cond.notify_all()
        return body


# ------------------------------------------------------------------- pacing
class RequestPacer:
    """At most ``rate`` requests a second (bursts of ``burst``); the others wait their turn.

    Every request costs the process some Python (parsing, the reply) under
    the GIL the I/O loop needs, however cheap its answer: a client scraping
    back to back, without pacing, took a third of the loop's throughput.
    Waiting requests sleep (no GIL), in the order they came (a virtual
    schedule, as in GCRA), so each is served, only later.
    """

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tat = 0.0  # when the schedule is next free
        self.delayed = 0  # requests that had to wait (tests, benchmarks)

    def wait(self) -> float:
        """Block until this request's turn; returns how long it waited."""
        with self._lock:
            now = self._clock()
            tat = max(self._tat, now)
            self._tat = tat + self._interval
            delay = tat - self._tolerance - now
            if delay > 0:
                self.delayed += 1
        if delay > 0:
            self._sleep(delay)
            return delay
        return 0.0


# ---------------------------------------------------------------- HTTP server
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
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.render = SharedRender(lambda: generate_latest(registry), key=render_key,
                                   max_window=max_render_window)
        self.routes: dict[str, Route] = {}
        self.pacer = RequestPacer(request_rate, request_burst)
        pacer = self.pacer

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
        routes = self.routes

        class Server(_Server):
            address_family = family

        Server.max_connections = max_connections

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

        self._httpd = Server((host, port), Handler)
        self.host = host
        self.port = self._httpd.server_address[1]
        # serve_forever checks for shutdown every poll_interval: the default
        # 0.5 s would be most of a fast SIGTERM-to-exit.
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="metrics-http", daemon=True)

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
