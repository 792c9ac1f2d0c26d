"""A reload inside a real Daemon, driven turn by turn in this process.

The config is read and parsed on a worker: while that takes its time (a
1 MiB YAML takes seconds), the loop keeps turning, pinging the watchdog and
completing probes, and the parsed config is applied on a later turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from aiod import config as config_mod
from aiod import logs
from aiod.config import Config
from aiod.daemon import Daemon
from aiod.notify import Notifier
from tests.test_daemon_jobs import completed, probe_job, turn, write_config


class SlowLoader:
    """config.load that holds each read until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, path: str | None, env: Mapping[str, str]) -> Config:
        self.calls += 1
        self.started.set()
        assert self.release.wait(60), "the test never released the parse"
        return config_mod.load(path, env=env)


@pytest.fixture
def slow_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[tuple[Daemon, SlowLoader, list[tuple[float, str]]]]:
    # A reload sets up aiod's own log handler (and stops propagation); here the
    # records must keep reaching pytest's capture.
    monkeypatch.setattr(logs, "setup", lambda *a, **kw: logging.getLogger("aiod"))
    target = tmp_path / "probe.dat"
    target.write_bytes(b"\0" * (1 << 20))
    path = write_config(tmp_path, [probe_job(target, "200/s")])
    sent: list[tuple[float, str]] = []
    loader = SlowLoader()
    d = Daemon(config_mod.load(path, env={}), config_path=str(path),
               notifier=Notifier(send=lambda s: sent.append((time.monotonic(), s)),
                                 env={"NOTIFY_SOCKET": "@test", "WATCHDOG_USEC": "200000"}),
               env={}, load_config=loader)
    d.startup()
    yield d, loader, sent
    loader.release.set()
    if d.phase.value != "stopped":
        d.shutdown("test")
    d.signals.restore()  # in-process: give pytest its handlers back


def pings_after(sent: list[tuple[float, str]], t: float) -> int:
    return sum(1 for when, s in sent if when >= t and "WATCHDOG=1" in s)


def test_the_loop_keeps_turning_while_a_reload_parses_the_config(
        slow_daemon: tuple[Daemon, SlowLoader, list[tuple[float, str]]]) -> None:
    d, loader, sent = slow_daemon
    path = Path(d.config_path or "")
    new_text = path.read_text().replace("contexts: 1", "contexts: 2")
    assert new_text != path.read_text()
    path.write_text(new_text)

    d.request_reload()  # what SIGHUP does
    assert loader.started.wait(10)
    t0 = time.monotonic()
    before = completed(d, "probe")
    # The parse is held: the loop still turns, pings the watchdog and completes probes.
    while time.monotonic() - t0 < 1.0:
        turn(d)
    assert any("RELOADING=1" in s for _, s in sent)
    assert pings_after(sent, t0) >= 3, sent
    assert completed(d, "probe") > before
    assert d.pools["p"].size == 1 and d.poll_reload() is None  # not applied yet

    loader.release.set()
    deadline = time.monotonic() + 10
    while d.pools["p"].size != 2:
        assert time.monotonic() < deadline, "the parsed config was never applied"
        turn(d)
    assert d.reload_status()[0] is True
    assert any("READY=1" in s for w, s in sent if w >= t0)


def test_a_sighup_during_the_parse_reads_the_file_again_after_it(
        slow_daemon: tuple[Daemon, SlowLoader, list[tuple[float, str]]],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiod")
    d, loader, _ = slow_daemon
    d.request_reload()
    assert loader.started.wait(10)
    d.request_reload()  # a second SIGHUP while the first parse runs
    assert loader.calls == 1
    loader.release.set()
    deadline = time.monotonic() + 10
    while caplog.text.count("configuration reloaded") < 2:
        assert time.monotonic() < deadline, "the second SIGHUP was lost"
        turn(d)
    assert loader.calls == 2 and d.reload_status()[0] is True


def test_a_config_that_fails_to_parse_on_the_worker_keeps_the_running_one(
        slow_daemon: tuple[Daemon, SlowLoader, list[tuple[float, str]]]) -> None:
    d, loader, _ = slow_daemon
    path = Path(d.config_path or "")
    path.write_text(path.read_text() + "bogus_key: 1\n")
    loader.release.set()
    assert d.reload() is False
    assert d.reload_status()[0] is False
    assert d.pools["p"].size == 1 and d.jobs["probe"].state.value in ("running", "preparing")
