"""The metrics HTTP server: shared renderings, many scrapers, idle connections."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from aiod.metrics import MetricsServer, RequestPacer, SharedRender


class CountingCollector:
    """Counts collect() calls; each one takes `cost` seconds (a big exposition)."""

    def __init__(self, cost: float = 0.0) -> None:
        self.cost = cost
        self.calls = 0
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.cost)
        g = GaugeMetricFamily("test_render_number", "Which rendering this is.")
        g.add_metric([], n)
        yield g


def serve(collector: CountingCollector, **kw: object) -> MetricsServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server = MetricsServer("127.0.0.1", 0, registry, healthy=lambda: True,
                           ready=lambda: True, **kw)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[MetricsServer]]:
    made: list[MetricsServer] = []
    yield made
    for s in made:
        s.close()


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_concurrent_scrapes_share_one_rendering(servers: list[MetricsServer]) -> None:
    coll = CountingCollector(cost=0.3)
    srv = serve(coll)
    servers.append(srv)
    bodies: list[bytes] = []
    start = threading.Barrier(20)

    def scrape() -> None:
        start.wait()
        code, body = get(srv.port, "/metrics")
        assert code == 200
        bodies.append(body)

    threads = [threading.Thread(target=scrape) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(bodies) == 20
    # Twenty scrapes while one rendering was under way: one rendering, all the same.
    assert coll.calls == 1, coll.calls
    assert len(set(bodies)) == 1 and b"test_render_number 1.0" in bodies[0]
    assert srv.render.shared == 19


def test_back_to_back_scrapes_render_at_most_once_per_window(
        servers: list[MetricsServer]) -> None:
    coll = CountingCollector(cost=0.05)  # 20 x 50 ms: reused for the whole 1 s cap
    srv = serve(coll)
    servers.append(srv)
    t0 = time.monotonic()
    n = 0
    while coll.calls < 3:
        assert get(srv.port, "/metrics")[0] == 200
        n += 1
    took = time.monotonic() - t0
    # Three renderings means two windows went by in between (a loaded machine
    # only stretches this); and the scrapes in between were answered from them.
    assert took >= 2 * 1.0
    assert n > 3 and srv.render.shared == n - 3


def test_a_new_key_makes_the_next_scrape_render(servers: list[MetricsServer]) -> None:
    coll = CountingCollector(cost=0.05)
    key = [1]
    srv = serve(coll, render_key=lambda: key[0])
    servers.append(srv)
    assert b"test_render_number 1.0" in get(srv.port, "/metrics")[1]
    assert b"test_render_number 1.0" in get(srv.port, "/metrics")[1]
    key[0] = 2  # a reload happened: its effect must show at once
    assert b"test_render_number 2.0" in get(srv.port, "/metrics")[1]


def test_shared_render_window_follows_its_cost_up_to_the_cap() -> None:
    now = [100.0]
    costs = [0.01, 0.2]

    def render() -> bytes:
        now[0] += costs.pop(0) if costs else 0.0
        return b"x"

    r = SharedRender(render, clock=lambda: now[0], cost_factor=20.0, max_window=1.0)
    r.get()                      # took 10 ms: shared for 200 ms
    now[0] += 0.19
    r.get()
    assert r.renders == 1
    now[0] += 0.02
    r.get()                      # took 200 ms: 4 s by cost, capped at 1 s
    assert r.renders == 2
    now[0] += 0.99
    r.get()
    assert r.renders == 2
    now[0] += 0.02
    r.get()
    assert r.renders == 3


def test_a_failed_rendering_does_not_wedge_the_next_scrapes() -> None:
    calls = [0]

    def render() -> bytes:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("collector broke")
        return b"ok"

    r = SharedRender(render)
    with pytest.raises(RuntimeError):
        r.get()
    assert r.get() == b"ok"


def test_the_server_survives_many_idle_connections(servers: list[MetricsServer]) -> None:
    srv = serve(CountingCollector(), idle_timeout=1.0)
    servers.append(srv)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(300)]
    try:
        # A scraper still gets through while 300 connections sit idle.
        assert get(srv.port, "/healthz") == (200, b"ok\n")
        assert get(srv.port, "/metrics")[0] == 200
        # The server closes the idle ones itself (recv sees EOF), freeing their threads.
        for s in idle:
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    assert get(srv.port, "/healthz") == (200, b"ok\n")


def test_connections_beyond_the_limit_get_503_not_a_hang(servers: list[MetricsServer]) -> None:
    srv = serve(CountingCollector(), idle_timeout=30.0, max_connections=8)
    servers.append(srv)
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(8)]
    try:
        # Each idle connection holds a slot once the server has accepted it.
        deadline = time.monotonic() + 10
        while True:
            code, body = get(srv.port, "/healthz")
            if code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert code == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while get(srv.port, "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "slots were not given back"
        time.sleep(0.05)


def test_a_burst_of_connections_is_queued_not_dropped(servers: list[MetricsServer]) -> None:
    srv = serve(CountingCollector())
    servers.append(srv)
    results: list[int] = []
    start = threading.Barrier(200)

    def one() -> None:
        start.wait()
        results.append(get(srv.port, "/healthz", timeout=30)[0])

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(200) == 200


def test_keep_alive_serves_several_requests_on_one_connection(
        servers: list[MetricsServer]) -> None:
    srv = serve(CountingCollector())
    servers.append(srv)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        for path in ("/metrics", "/healthz", "/readyz", "/nope"):
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            assert r.status == (404 if path == "/nope" else 200)
    finally:
        conn.close()


def test_added_routes_are_served(servers: list[MetricsServer]) -> None:
    srv = serve(CountingCollector())
    servers.append(srv)
    srv.add_route("/extra", lambda: (200, b"{}", "application/json"))
    assert get(srv.port, "/extra") == (200, b"{}")
    assert b"/extra" in get(srv.port, "/")[1]


def test_requests_beyond_the_rate_wait_their_turn_and_are_all_answered(
        servers: list[MetricsServer]) -> None:
    srv = serve(CountingCollector(), request_rate=20.0, request_burst=5)
    servers.append(srv)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    t0 = time.monotonic()
    try:
        for _ in range(30):
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b"ok\n")
    finally:
        conn.close()
    # 5 at once, then one every 50 ms: a client scraping back to back is paced.
    assert time.monotonic() - t0 >= 25 / 20.0
    assert srv.pacer.delayed >= 25


def test_the_pacer_keeps_a_schedule_in_arrival_order() -> None:
    now = [0.0]
    slept: list[float] = []
    p = RequestPacer(10.0, 3, clock=lambda: now[0], sleep=slept.append)
    assert [p.wait() for _ in range(3)] == [0.0, 0.0, 0.0]   # the burst
    assert round(p.wait(), 6) == 0.1                         # then 10 a second
    assert round(p.wait(), 6) == 0.2
    now[0] = 10.0                                            # a quiet spell refills it
    assert [p.wait() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert slept == [p for p in slept if p > 0] and len(slept) == 2
