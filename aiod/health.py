"""Is aiod alive and serving: its phase and the I/O loop's heartbeat.

The phase changes in one place (:meth:`Health.enter`). The heartbeat is the
loop itself: every turn calls :meth:`Health.beat`, which is also where
WATCHDOG=1 and the periodic STATUS= line are sent from, so a loop that
stalls stops the pings and systemd sees it. /healthz and /readyz (through
the metrics server) read :meth:`Health.healthy` and :meth:`Health.ready`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from aiod.notify import Notifier

STATUS_INTERVAL = 5.0
HEALTH_STALL = 10.0     # /healthz fails when the loop has not turned for this long


class Phase(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    CANCELLING = "cancelling"
    DESTROYING = "destroying"
    STOPPED = "stopped"


class Health:
    """See the module docstring. ``status_line`` makes the STATUS= text."""

    def __init__(self, notifier: Notifier, status_line: Callable[[], str], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.status_line = status_line
        self.clock = clock
        self.phase = Phase.STARTING
        self._heartbeat = clock()
        self._next_status = 0.0
        self._next_watchdog = 0.0

    def enter(self, phase: Phase) -> None:
        """The only place the phase changes."""
        self.phase = phase
        if phase is Phase.SERVING:
            now = self.clock()
            self._next_status = now + STATUS_INTERVAL
            self._next_watchdog = now

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    def beat(self) -> None:
        """Once per loop turn: the heartbeat, and the watchdog and status when due."""
        now = self.clock()
        self._heartbeat = now
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            # Sent from the loop itself: a stuck loop stops the pings.
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_interval
        if now >= self._next_status:
            self.notifier.status(self.status_line())
            self._next_status = now + STATUS_INTERVAL

    def next_due(self) -> float:
        """When beat() next has something to send."""
        if self.notifier.watchdog_interval:
            return min(self._next_status, self._next_watchdog)
        return self._next_status

    def healthy(self) -> bool:
        return self.phase is not Phase.STOPPED and self.clock() - self._heartbeat < HEALTH_STALL

    def ready(self) -> bool:
        return self.phase is Phase.SERVING and self.healthy()
