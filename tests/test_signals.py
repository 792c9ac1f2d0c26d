"""The signal inbox: handlers that only record, and never the default action again."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from aiod.signals import HANDLED, SignalInbox
from tests.daemon_harness import ROOT


@pytest.fixture
def inbox() -> Iterator[SignalInbox]:
    """An inbox installed in the test process; pytest's own handlers come back after."""
    saved = {sig: signal.getsignal(sig) for sig in HANDLED}
    box = SignalInbox()
    try:
        yield box.install()
    finally:
        box.finish()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_is_only_recorded_and_wakes_the_loop(inbox: SignalInbox) -> None:
    os.kill(os.getpid(), signal.SIGHUP)
    fd = inbox.fileno()
    assert fd is not None and select.select([fd], [], [], 1.0)[0] == [fd]
    assert bool(inbox) and inbox.take() == [signal.SIGHUP] and not inbox
    inbox.clear_wakeup()
    assert select.select([fd], [], [], 0)[0] == []


def test_signals_come_out_oldest_first(inbox: SignalInbox) -> None:
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        os.kill(os.getpid(), sig)
    assert inbox.pop() == signal.SIGHUP
    assert inbox.take() == [signal.SIGTERM, signal.SIGINT]
    assert inbox.pop() is None


def test_finish_logs_the_late_signals_and_ignores_any_more(
        inbox: SignalInbox, caplog: pytest.LogCaptureFixture) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="aiod.signals"):
        inbox.finish("after the shutdown had finished")
    assert "received SIGTERM after the shutdown had finished; ignoring it" in caplog.text
    for sig in HANDLED:
        assert signal.getsignal(sig) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGTERM)  # ignored by the kernel: this test goes on
    assert inbox.fileno() is None and not inbox


LATE = """
import os, signal, sys
from aiod.signals import SignalInbox
inbox = SignalInbox().install()
inbox.finish()
# Python puts back SIG_DFL while it exits where it had a handler of its own;
# a TERM then (here: from an atexit hook) must still not kill the process.
import atexit
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), print("survived")))
sys.exit(0)
"""


def test_a_signal_while_python_exits_after_finish_cannot_kill_the_process() -> None:
    r = subprocess.run([sys.executable, "-c", LATE], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=30)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "survived" in r.stdout
