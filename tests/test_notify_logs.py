"""Our own logic around systemd: the notifier and the log format (unit tests).

The real thing (a real NOTIFY_SOCKET, a real journal) is exercised by
tests/test_daemon.py and tests/system/.
"""

from __future__ import annotations

import io
import logging
import os

from aiod import logs
from aiod.notify import Notifier


def test_notifier_sends_the_documented_lines() -> None:
    sent: list[str] = []
    n = Notifier(send=sent.append, env={"NOTIFY_SOCKET": "/x"}, monotonic_ns=lambda: 5_000_000)
    n.ready("serving")
    n.reloading()
    n.stopping("bye")
    n.extend_timeout(2.5)
    assert sent == ["READY=1\nSTATUS=serving", "RELOADING=1\nMONOTONIC_USEC=5000",
                    "STOPPING=1\nSTATUS=bye", "EXTEND_TIMEOUT_USEC=2500000"]


def test_notify_that_raises_never_kills_the_daemon() -> None:
    def boom(msg: str) -> None:
        raise OSError(111, "Connection refused")
    n = Notifier(send=boom, env={"NOTIFY_SOCKET": "/x"})
    assert n.ready("x") is False
    assert n.watchdog() is False


def test_no_notify_socket_means_no_sends() -> None:
    sent: list[str] = []
    n = Notifier(send=sent.append, env={})
    assert n.ready("x") is False and sent == []


def test_watchdog_interval_is_half_of_watchdog_usec_and_honours_watchdog_pid() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000"}
    assert Notifier(send=print, env=env).watchdog_interval == 5.0
    other = dict(env, WATCHDOG_PID=str(os.getpid() + 1))
    assert Notifier(send=print, env=other).watchdog_interval is None
    mine = dict(env, WATCHDOG_PID=str(os.getpid()))
    assert Notifier(send=print, env=mine).watchdog_interval == 5.0


def test_stderr_lines_carry_the_structured_fields() -> None:
    logger = logging.getLogger("aiod")
    saved = list(logger.handlers)
    logger.handlers.clear()  # setup() installs its handler again when it is not there
    try:
        buf = io.StringIO()
        logs.setup("info", env={}, stream=buf)
        logging.getLogger("aiod.test").error("read failed", extra={
            "AIOD_POOL": "default", "AIOD_JOB": "probe", "ERRNO": 5})
        line = buf.getvalue().strip()
        assert line.endswith("error read failed [pool=default job=probe errno=5]")
        logging.getLogger("aiod.test").debug("hidden")
        assert "hidden" not in buf.getvalue()
    finally:
        logger.handlers[:] = saved
