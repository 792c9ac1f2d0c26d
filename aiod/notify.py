"""sd_notify(3) for systemd's Type=notify / notify-reload services.

Every call is best-effort: a notify that raises (no socket, a full socket
buffer, an old library) is logged once and never takes the daemon down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("aiod.notify")

Sender = Callable[[str], object]


def _systemd_sender() -> Sender | None:
    try:
        from systemd import daemon  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - systemd-python is a dependency
        return None
    send: Sender = daemon.notify  # systemd-python has no type hints
    return send


class Notifier:
    """What aiod tells systemd. ``send`` is injectable so tests see the datagrams."""

    def __init__(self, send: Sender | None = None,
                 env: Mapping[str, str] | None = None,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._send = send if send is not None else _systemd_sender()
        self._monotonic_ns = monotonic_ns
        self._warned = False
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # sd_watchdog_enabled(3): ping at half the interval.
            self.watchdog_interval = int(usec) / 2e6

    def notify(self, *lines: str) -> bool:
        if not self.enabled or self._send is None:
            return False
        try:
            self._send("\n".join(lines))
            return True
        except Exception as e:  # noqa: BLE001 - never let systemd glue kill the daemon
            if not self._warned:
                log.warning("could not notify systemd: %s", e)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_ns() // 1000}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
