"""The record of files aiod created, and so may write: ``owned-targets.json``.

Users' data is never touched by default: aiod writes only to files it created
itself, and it remembers which those are in ``owned-targets.json`` in its
state directory: path, device, inode and a random token that is also stored
in the file's ``user.aiod.token`` extended attribute. Inode numbers are reused
at once on ext4, so a file deleted and replaced behind aiod's back would match
on inode alone; it does not carry the token.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from aiod.durable import write_atomic

log = logging.getLogger("aiod.targets")

OWNED_FILE = "owned-targets.json"
TOKEN_XATTR = "user.aiod.token"

_TOKEN_RE = re.compile(r"[0-9a-f]{32}")

Entry = tuple[int, int, str | None]   # dev, ino, token (None: no xattrs there)


class OwnedFiles:
    """The set of files aiod created, persisted atomically in the state directory.

    Fills record their files from worker threads: ``add`` is serialised.

    A record that cannot be read (truncated, not JSON, the wrong shape, a
    directory) is renamed ``owned-targets.json.corrupt-<time>`` and logged;
    until a new record is complete, a file that carries an aiod token in its
    ``user.aiod.token`` attribute is taken back as aiod's (only aiod writes
    that attribute, and only on files it created), and any other file is
    refused for writing as usual.
    """

    def __init__(self, state_directory: Path) -> None:
        self.path = state_directory / OWNED_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._reclaim = False
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self._set_aside(e.strerror or str(e))
            return
        try:
            self._entries = _parse_owned(json.loads(text))
        except RecursionError:
            self._set_aside("nested too deeply")
        except (ValueError, TypeError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
            self._set_aside(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def _set_aside(self, why: str) -> None:
        self._reclaim = True
        aside = self.path.with_name(
            f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.rename(self.path, aside)
            kept = f"kept aside as {aside}"
        except OSError as e:
            kept = f"not kept aside ({e.strerror}; it is left as it is)"
        log.error("%s cannot be read (%s); %s. Files that carry aiod's token are taken back "
                  "as aiod's; writes to any other file are refused", self.path, why, kept)

    def owns(self, path: Path, st: os.stat_result) -> bool:
        entry = self._entries.get(str(path))
        if entry is None or entry[:2] != (st.st_dev, st.st_ino):
            return self._reclaim and self._take_back(path, st)
        token = entry[2]
        if token is None:  # the filesystem could not store the token
            return True
        try:
            return os.getxattr(path, TOKEN_XATTR) == token.encode()
        except OSError:
            return False

    def _take_back(self, path: Path, st: os.stat_result) -> bool:
        """After a lost record: a file carrying an aiod token is aiod's; record it again."""
        try:
            token = os.getxattr(path, TOKEN_XATTR).decode("ascii")
        except (OSError, UnicodeDecodeError):
            return False
        if not _TOKEN_RE.fullmatch(token):
            return False
        try:
            self._record(path, st, token)
        except OSError as e:
            log.warning("cannot record %s as aiod's own again in %s: %s", path, self.path,
                        e.strerror)
        log.info("%s carries aiod's token: taken back as aiod's own", path)
        return True

    def add(self, path: Path, st: os.stat_result, fd: int | None = None) -> None:
        """Record path (dev/ino of st) as aiod's; the token goes on fd when given."""
        token: str | None = secrets.token_hex(16)
        try:
            if fd is not None:
                os.setxattr(fd, TOKEN_XATTR, token.encode())  # type: ignore[union-attr]
            else:
                os.setxattr(path, TOKEN_XATTR, token.encode())  # type: ignore[union-attr]
        except OSError:
            token = None
        self._record(path, st, token)

    def _record(self, path: Path, st: os.stat_result, token: str | None) -> None:
        with self._lock:
            entries = dict(self._entries)
            entries[str(path)] = (st.st_dev, st.st_ino, token)
            doc = {"files": {p: {"dev": d, "ino": i, "token": t}
                             for p, (d, i, t) in entries.items()}}
            write_atomic(self.path, json.dumps(doc, indent=2) + "\n")
            self._entries = entries  # only once it is on disk


def _parse_owned(data: object) -> dict[str, Entry]:
    """The entries of a decoded record; ValueError when it has the wrong shape."""
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError('expected {"files": {...}}')
    out: dict[str, Entry] = {}
    for p, v in data["files"].items():
        if not isinstance(v, dict):
            raise ValueError(f"the entry for {p} is not a mapping")
        dev, ino, token = v.get("dev"), v.get("ino"), v.get("token")
        for name, n in (("dev", dev), ("ino", ino)):
            if type(n) is not int or not 0 <= n < 1 << 64:
                raise ValueError(f"the entry for {p} has a bad {name}")
        if token is not None and not (isinstance(token, str) and _TOKEN_RE.fullmatch(token)):
            raise ValueError(f"the entry for {p} has a bad token")
        out[p] = (dev, ino, token)  # type: ignore[assignment]
    return out
