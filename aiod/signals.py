"""SIGTERM, SIGINT and SIGHUP from the first moment of `aiod run` to its exit.

The handlers only record the signal and wake the I/O loop (through the
wakeup fd); the loop decides what each one means. They are installed before
anything slow happens (imports, reading the configuration), so a SIGTERM that
arrives while aiod starts is acted on once it can be, never taken by the
default action.

They are never put back to the defaults. When aiod is done, :meth:`finish`
logs each signal that came too late to matter and sets the three to SIG_IGN,
which Python leaves alone while it exits (it puts back SIG_DFL only where it
installed a handler of its own): a last SIGTERM can no longer kill a process
that has already written its report and is about to exit 0.

Only this module touches the process's signal dispositions.
"""

from __future__ import annotations

import signal
import socket
from collections import deque
from collections.abc import Iterable

# No logging import here: this module is loaded before anything else in
# `aiod run`, and the sooner its handlers are in, the smaller the window.

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalInbox:
    """The signals received and not yet acted on, oldest first."""

    def __init__(self, signals: Iterable[int] = HANDLED) -> None:
        self._which = tuple(signals)
        self._received: deque[int] = deque()
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self.installed = False
        self.finished = False
        self._previous: dict[int, object] = {}

    def install(self) -> SignalInbox:
        """Catch the signals from now on (main thread only). Idempotent."""
        if self.installed:
            return self
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in self._which:
            self._previous[sig] = signal.signal(sig, self._record)
        self.installed = True
        return self

    def _record(self, signum: int, frame: object) -> None:
        """NO work here, no logging: just record it; the loop acts."""
        self._received.append(signum)

    def fileno(self) -> int | None:
        """Readable when a signal arrived: for the loop's select()."""
        return self._wakeup_r.fileno() if self._wakeup_r is not None else None

    def clear_wakeup(self) -> None:
        if self._wakeup_r is None:
            return
        try:
            while self._wakeup_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def __bool__(self) -> bool:
        return bool(self._received)

    def pop(self) -> int | None:
        """The oldest signal not yet acted on, or None."""
        return self._received.popleft() if self._received else None

    def take(self) -> list[int]:
        """The signals received since the last take, oldest first."""
        out: list[int] = []
        while self._received:
            out.append(self._received.popleft())
        return out

    def restore(self) -> None:
        """Put back the handlers found at install and close the wakeup fd.

        For code that runs a Daemon inside a longer-lived process (the
        tests); `aiod run` never calls it, since its handlers must outlive
        the shutdown (see finish)."""
        if self.installed:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            signal.set_wakeup_fd(-1)
            self._close_wakeup()
            self.installed = False

    def _close_wakeup(self) -> None:
        for s in (self._wakeup_r, self._wakeup_w):
            if s is not None:
                s.close()
        self._wakeup_r = self._wakeup_w = None

    def finish(self, when: str = "as aiod was exiting") -> None:
        """From here to the process's exit, the signals are ignored. Those that
        arrived and were not acted on are logged, one line each."""
        if self.finished:
            return
        self.finished = True
        if self.installed:
            for sig in self._which:
                signal.signal(sig, signal.SIG_IGN)
            signal.set_wakeup_fd(-1)
            self._close_wakeup()
        import logging
        log = logging.getLogger("aiod.signals")
        for sig in self.take():
            log.info("received %s %s; ignoring it", signal.Signals(sig).name, when)
