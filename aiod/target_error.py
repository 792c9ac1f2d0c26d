"""Why a job's target cannot be used: :class:`TargetError` and its reason labels.

The reason is a short label (``missing``, ``permission``, ``no_space``, ...)
that the ``aiod_job_errors_total`` metric counts by; the message is the one
line an operator reads.
"""

from __future__ import annotations

import errno as _errno


class TargetError(Exception):
    """A target cannot be used. ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = err


_REASONS = {_errno.ENOENT: "missing", _errno.EACCES: "permission", _errno.EPERM: "permission",
            _errno.ENOSPC: "no_space", _errno.EDQUOT: "no_space", _errno.EROFS: "read_only",
            _errno.EIO: "io_error"}


def errno_reason(err: int) -> str:
    """The reason label for an OSError's errno (``os_error`` for the rest)."""
    return _REASONS.get(err, "os_error")


def from_os_error(e: OSError, message: str) -> TargetError:
    """A TargetError for e, labelled by its errno: ``message: <strerror>``."""
    return TargetError(errno_reason(e.errno or 0), f"{message}: {e.strerror}", e.errno)
