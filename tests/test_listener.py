"""aiod.listener: the metrics listener moved by a reload, or left where it was."""

from __future__ import annotations

import errno
import re
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from aiod import config
from aiod.config import Config
from aiod.listener import Listener
from aiod.metrics_server import MetricsServer
from aiod.reload import ReloadError


def cfg_on(listen: str) -> Config:
    return config.parse("pools:\n  - {name: default, contexts: 1, nr_events: 8}\n"
                        f"metrics: {{listen: '{listen}'}}\nstate_directory: /tmp\n",
                        "t.yaml", env={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return int(r.status)


def server(host: str, port: int) -> MetricsServer:
    return MetricsServer(host, port, CollectorRegistry(auto_describe=False),
                         healthy=lambda: True, ready=lambda: True)


@pytest.fixture
def listener() -> Iterator[Listener]:
    made = Listener(server)
    yield made
    made.close()


def test_a_move_to_an_overlapping_address_closes_the_old_listener_first(
        listener: Listener) -> None:
    port = free_port()
    old, new = cfg_on(f"127.0.0.1:{port}"), cfg_on(f"0.0.0.0:{port}")
    listener.serve(listener.bind(old))
    server, released = listener.rebind(old, new)
    assert released                      # 0.0.0.0:P could not be bound beside 127.0.0.1:P
    listener.serve(server)
    assert listener.server is server and server.host == "0.0.0.0"
    assert healthz(port) == 200


def test_a_port_held_by_another_process_fails_the_move_and_keeps_the_old_listener(
        listener: Listener) -> None:
    port = free_port()
    old = cfg_on(f"127.0.0.1:{port}")
    listener.serve(listener.bind(old))
    running = listener.server
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        with pytest.raises(ReloadError, match=re.escape(
                f"cannot listen for metrics on 127.0.0.1:{taken}: Address already in use")):
            listener.rebind(old, cfg_on(f"127.0.0.1:{taken}"))
    assert listener.server is running
    assert healthz(port) == 200


def test_a_move_that_fails_after_closing_the_old_listener_reopens_it() -> None:
    port = free_port()
    old, new = cfg_on(f"127.0.0.1:{port}"), cfg_on(f"0.0.0.0:{port}")
    tries: list[str] = []

    def make(host: str, port: int) -> MetricsServer:
        tries.append(host)
        if host == "0.0.0.0" and tries.count(host) > 1:
            # Someone else took 0.0.0.0:P in the moment between close and bind
            # (the first try fails for real, on the overlap).
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return server(host, port)

    listener = Listener(make)
    try:
        listener.serve(listener.bind(old))
        with pytest.raises(ReloadError, match=re.escape("(also after closing 127.0.0.1:")):
            listener.rebind(old, new)
        assert tries == ["127.0.0.1", "0.0.0.0", "0.0.0.0", "127.0.0.1"]
        assert healthz(port) == 200          # the old address serves again
    finally:
        listener.close()
