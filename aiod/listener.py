"""The metrics HTTP listener across aiod's life: bound at startup, moved by a
reload, closed at shutdown.

A reload that moves it binds the new address while the old one still
listens, so a failure changes nothing; only when the two overlap on one port
(127.0.0.1:P then 0.0.0.0:P) is the running one closed first, and reopened
if the move fails. The server in service is held here and nowhere else.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from aiod.config import Config
from aiod.metrics_server import MetricsServer
from aiod.reload import ReloadError

log = logging.getLogger("aiod.listener")


class Listener:
    """See the module docstring. ``make(host, port)`` binds one server (not started)."""

    def __init__(self, make: Callable[[str, int], MetricsServer]) -> None:
        self._make = make
        self.server: MetricsServer | None = None

    def bind(self, cfg: Config) -> MetricsServer:
        """A server bound to cfg's address, not yet started; raises OSError."""
        return self._make(cfg.metrics.host, cfg.metrics.port)

    def serve(self, server: MetricsServer) -> None:
        """Start server and put it in service, closing the one it replaces."""
        if self.server is not None and self.server is not server:
            self.server.close()
        server.start()
        self.server = server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def rebind(self, old: Config, new: Config) -> tuple[MetricsServer, bool]:
        """A server bound to new's address, and whether the running one was closed for it.

        Raises ReloadError, after reopening the running one (see restore) if
        it had to be closed.
        """
        where = f"{new.metrics.host}:{new.metrics.port}"
        try:
            return self.bind(new), False
        except OSError as e:
            if e.errno != errno.EADDRINUSE or new.metrics.port != old.metrics.port:
                raise ReloadError(f"cannot listen for metrics on {where}: {e.strerror}") from e
        self.close()
        try:
            return self.bind(new), True
        except OSError as e:
            self.restore(old)
            raise ReloadError(f"cannot listen for metrics on {where}: {e.strerror} (also "
                              f"after closing {old.metrics.host}:{old.metrics.port}, which "
                              f"overlaps it)") from e

    def restore(self, old: Config) -> None:
        """Reopen the running address after rebind closed it for a move that failed."""
        try:
            server = self.bind(old)
        except OSError as e:
            log.error("cannot listen for metrics on %s:%d again: %s; /metrics is down until "
                      "a reload or restart", old.metrics.host, old.metrics.port, e.strerror)
            return
        server.start()
        self.server = server
