"""Logging to journald (under systemd) or to stderr.

Structured fields travel as ``extra={"AIOD_POOL": ..., "AIOD_JOB": ...,
"AIOD_CONTEXT": ..., "ERRNO": ...}``; the journal stores them as fields
(``journalctl AIOD_POOL=default``), stderr shows them as key=value.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, TextIO

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


def setup(level: str = "info", env: Mapping[str, str] | None = None,
          stream: TextIO | None = None) -> logging.Logger:
    """Configure the `aiod` logger once; call again to change the level."""
    env = os.environ if env is None else env
    logger = logging.getLogger("aiod")
    logger.setLevel(LEVELS.get(level, logging.INFO))
    logger.propagate = False
    if getattr(logger, "_aiod_configured", False):
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
    logger._aiod_configured = True  # type: ignore[attr-defined]
    return logger
