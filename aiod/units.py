"""Quantities as people write them in a configuration: sizes, durations, rates,
listen addresses and AIO event reserves.

Each parser takes what YAML gives (int, float or str) and raises ValueError
with a sentence that can follow ``"<key.path>: "``. Numbers are exact
(Fraction) until the end, so ``1.5K`` is 1536 bytes and ``0.1K`` is refused.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from fractions import Fraction

_NUMBER = r"(\d[\d_]*(?:\.\d*)?|\.\d+)"

# What each unit looks like, for "expected ..., found ..." messages.
SIZE = "a size such as 4096, 4KiB or 64MiB"
DURATION = "a duration such as 500ms, 10s or 2m"
RATE = "a rate such as 10/s, 5/m or 0.5 (per second)"
RESERVE = "a number of AIO events such as 4096, or a share of fs.aio-max-nr such as 10%"

# Binary multiples only: K, KB and KiB all mean 1024. Storage people argue
# about KB; for block sizes and file sizes 1000 is never what anyone means
# here, and one meaning per letter is easier to read in a config review.
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(_NUMBER + r"\s*(?:([kmgt])(?:i?b)?|(b))?", re.IGNORECASE)

_DURATION_UNITS = {"us": Fraction(1, 10**6), "µs": Fraction(1, 10**6),
                   "ms": Fraction(1, 1000), "s": Fraction(1), "": Fraction(1),
                   "m": Fraction(60), "h": Fraction(3600)}
_DURATION_RE = re.compile(_NUMBER + r"\s*(us|µs|ms|s|m|h)?")

_RATE_UNITS = {"s": 1, "m": 60, "h": 3600}
_RATE_RE = re.compile(_NUMBER + r"\s*(?:/\s*(s|m|h))?")


@dataclass(frozen=True)
class HeadroomReserve:
    """AIO events to keep free for other processes: a count, or a share of fs.aio-max-nr."""

    events: int = 0
    percent: float | None = None

    def resolve(self, aio_max_nr: int) -> int:
        if self.percent is not None:
            return int(aio_max_nr * self.percent / 100)
        return self.events

    @property
    def enabled(self) -> bool:
        return bool(self.events or self.percent)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.events)


def show(value: object) -> str:
    """A value as the user wrote it, shortened to fit a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, expected: str) -> Fraction | None:
    """A YAML int/float as an exact, finite, non-negative Fraction; None for text."""
    if isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # bool is an int subclass, but "size: true" is never a quantity.
        raise ValueError(f"expected {expected}, found {show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"expected {expected}, found {value}")
    if value < 0:
        raise ValueError(f"must not be negative, found {value}")
    return Fraction(value)


def _match(pattern: re.Pattern[str], text: str, expected: str) -> re.Match[str]:
    m = pattern.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected {expected}, found {show(text)}")
    return m


def _digits(m: re.Match[str]) -> Fraction:
    return Fraction(m.group(1).replace("_", ""))


def parse_size(s: object) -> int:
    """Bytes from ``4096``, ``"512"``, ``"4KiB"``, ``"64M"``, ``"1g"``; K/KB/KiB are all 1024."""
    n = _number(s, SIZE)
    if n is None:
        m = _match(_SIZE_RE, str(s), SIZE)
        n = _digits(m) * _SIZE_UNITS[(m.group(2) or m.group(3) or "").lower()]
    if n.denominator != 1:
        raise ValueError(f"expected a whole number of bytes, found {show(s)}")
    return int(n)


def parse_duration(s: object) -> float:
    """Seconds from ``"500ms"``, ``"10s"``, ``"2m"``, ``"100us"``, or a bare number of seconds."""
    n = _number(s, DURATION)
    if n is None:
        m = _match(_DURATION_RE, str(s), DURATION)
        n = _digits(m) * _DURATION_UNITS[m.group(2) or ""]
    return float(n)


def parse_rate(s: object) -> float:
    """Operations per second from ``"100/s"``, ``"5/m"``, ``"0.5/s"``, or a bare number per second."""
    n = _number(s, RATE)
    if n is None:
        m = _match(_RATE_RE, str(s), RATE)
        n = _digits(m) / _RATE_UNITS[m.group(2) or "s"]
    return float(n)


def parse_reserve(s: object) -> HeadroomReserve:
    """``4096`` (events) or ``"10%"`` (of fs.aio-max-nr) into a HeadroomReserve."""
    if isinstance(s, str) and s.strip().endswith("%"):
        text = s.strip()[:-1].strip()
        m = re.fullmatch(_NUMBER, text)
        if not m:
            raise ValueError(f"expected {RESERVE}, found {show(s)}")
        pct = float(_digits(m))
        if pct >= 100:
            raise ValueError(f"a reserve of {pct:g}% of fs.aio-max-nr leaves the pools no "
                             f"room at all; expected less than 100%")
        return HeadroomReserve(percent=pct)
    n = _number(s, RESERVE)
    if n is None:
        text = str(s).strip().replace("_", "")
        if not text.isdigit():
            raise ValueError(f"expected {RESERVE}, found {show(s)}")
        n = Fraction(int(text))
    if n.denominator != 1:
        raise ValueError(f"expected a whole number of events, found {show(s)}")
    return HeadroomReserve(events=int(n))


def parse_listen(s: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into (host, port); port 0 means ephemeral."""
    example = "127.0.0.1:9740 or [::1]:9740"
    s = s.strip()
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected host:port such as {example}, found {s!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} inside [] is not an IPv6 address") from None
    else:
        host, sep, port = s.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port such as {example}, found {s!r} (no port)")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, as [::1]:9740, found {s!r}")
        if not host:
            raise ValueError(f"expected host:port with a host (0.0.0.0 for every "
                             f"interface), found {s!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, found {port!r} in {s!r}")
    return host, int(port)
