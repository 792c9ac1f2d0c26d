"""Logging to journald (under systemd) or to stderr.

Structured fields travel as ``extra={"AIOD_POOL": ..., "AIOD_JOB": ...,
"AIOD_CONTEXT": ..., "ERRNO": ...}``; the journal stores them as fields
(``journalctl AIOD_POOL=default``), stderr shows them as key=value.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import TextIO

FIELDS = ("AIOD_POOL", "AIOD_JOB", "AIOD_CONTEXT", "AIOD_TARGET", "ERRNO")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


class StderrFormatter(logging.Formatter):
    """`<time> <level> <message> [pool=.. job=..]`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        fields = [f"{k.removeprefix('AIOD_').lower()}={getattr(record, k)}"
                  for k in FIELDS if getattr(record, k, None) is not None]
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        line = f"{ts} {record.levelname.lower()} {msg}"
        if fields:
            line += " [" + " ".join(fields) + "]"
        return line


# The handler setup() installed; a second setup() only changes the level.
_handler: logging.Handler | None = None


def setup(level: str = "info", env: Mapping[str, str] | None = None,
          stream: TextIO | None = None) -> logging.Logger:
    """Configure the `aiod` logger once; call again to change the level."""
    env = os.environ if env is None else env
    logger = logging.getLogger("aiod")
    logger.setLevel(LEVELS.get(level, logging.INFO))
    logger.propagate = False
    global _handler
    if _handler is not None and _handler in logger.handlers:
        return logger
    handler: logging.Handler | None = None
    if env.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="aiod")
        except Exception:  # noqa: BLE001 - fall back to stderr, which systemd also captures
            handler = None
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(StderrFormatter())
    logger.addHandler(handler)
    _handler = handler
    return logger


class _Window:
    __slots__ = ("count", "extra", "level", "start", "suppressed", "what")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0
        self.level = logging.INFO
        self.what = ""
        self.extra: Mapping[str, object] | None = None


class LogLimiter:
    """Repeated messages of one kind: at most ``burst`` lines per ``interval``.

    The rest are counted, and a line says how many were suppressed once the
    interval is over (at the next message of that kind or at the next
    ``flush``, whichever comes first): a flood of hung-I/O warnings becomes a
    few lines and a count, and nothing is hidden without saying so.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 3,
                 clock: Callable[[], float] | None = None) -> None:
        import time
        self._log = logger
        self.interval = interval
        self.burst = burst
        self._clock = clock or time.monotonic
        self._windows: dict[Hashable, _Window] = {}

    def log(self, key: Hashable, level: int, what: str, msg: str, *args: object,
            extra: Mapping[str, object] | None = None) -> bool:
        """Log msg unless key is over its burst. ``what`` names the kind in the
        suppression line ("'hung I/O' warnings for job x"). True when logged."""
        now = self._clock()
        w = self._windows.get(key)
        if w is not None and now - w.start >= self.interval:
            self._summarise(w, now)
            w = None
        if w is None:
            w = self._windows[key] = _Window(now)
        w.level, w.what, w.extra = level, what, extra
        if w.count < self.burst:
            w.count += 1
            self._log.log(level, msg, *args, extra=extra)
            return True
        w.suppressed += 1
        return False

    def flush(self, everything: bool = False) -> None:
        """Report the suppressed counts of every interval that is over (of all
        of them with ``everything``: the job is stopping)."""
        now = self._clock()
        for key, w in list(self._windows.items()):
            if everything or now - w.start >= self.interval:
                self._summarise(w, now)
                del self._windows[key]

    def _summarise(self, w: _Window, now: float) -> None:
        if w.suppressed:
            self._log.log(w.level, "%d more %s suppressed in the last %.0fs", w.suppressed,
                          w.what, now - w.start, extra=w.extra)
