"""What scrapes may cost the I/O loop: shared renderings and paced requests.

Rendering /metrics and answering any request run Python code that shares the
GIL with the I/O loop. :class:`SharedRender` lets scrapes share renderings,
so however many clients scrape, rendering takes a bounded share of the
process's time; :class:`RequestPacer` bounds how many requests a second are
answered at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable


class SharedRender:
    """One rendering of /metrics shared by every scrape within its window.

    A rendering is reused for ``cost_factor`` times what it took to make,
    never longer than ``max_window`` seconds: rendering then takes at most
    about 1/(cost_factor + 1) of one thread's time, whether one client
    scrapes back to back or twenty do. A scrape that arrives while a
    rendering is under way waits for that one instead of starting another.
    When ``key()`` changes (the daemon passes its reload status) the next
    scrape renders anew, so a reload shows in the very next scrape.
    """

    def __init__(self, render: Callable[[], bytes], *,
                 key: Callable[[], Hashable] = lambda: None,
                 max_window: float = 1.0, cost_factor: float = 20.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._render = render
        self._key = key
        self.max_window = max_window
        self.cost_factor = cost_factor
        self._clock = clock
        self._cond = threading.Condition()
        self._body: bytes | None = None
        self._body_key: Hashable = None
        self._expires = 0.0
        self._rendering = False
        self._generation = 0    # renderings finished so far
        self.renders = 0        # how many renderings were made (tests, benchmarks)
        self.shared = 0         # how many scrapes were answered with another's rendering

    def get(self) -> bytes:
        with self._cond:
            arrived = self._generation
            while True:
                body = self._body
                if body is not None and self._body_key == self._key() and (
                        self._clock() < self._expires or self._generation != arrived):
                    # Fresh, or finished while this scrape waited for it.
                    self.shared += 1
                    return body
                if not self._rendering:
                    break
                self._cond.wait()
            self._rendering = True
            key = self._key()
        t0 = self._clock()
        try:
            body = self._render()
        except BaseException:
            with self._cond:
                self._rendering = False
                self._cond.notify_all()
            raise
        with self._cond:
            now = self._clock()
            self._body, self._body_key = body, key
            self._expires = now + min(self.max_window, (now - t0) * self.cost_factor)
            self._rendering = False
            self._generation += 1
            self.renders += 1
            self._cond.notify_all()
        return body



class RequestPacer:
    """At most ``rate`` requests a second (bursts of ``burst``); the others wait their turn.

    Every request costs the process some Python (parsing, the reply) under
    the GIL the I/O loop needs, however cheap its answer: a client scraping
    back to back, without pacing, took a third of the loop's throughput.
    Waiting requests sleep (no GIL), in the order they came (a virtual
    schedule, as in GCRA), so each is served, only later.
    """

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tat = 0.0  # when the schedule is next free
        self.delayed = 0  # requests that had to wait (tests, benchmarks)

    def wait(self) -> float:
        """Block until this request's turn; returns how long it waited."""
        with self._lock:
            now = self._clock()
            tat = max(self._tat, now)
            self._tat = tat + self._interval
            delay = tat - self._tolerance - now
            if delay > 0:
                self.delayed += 1
        if delay > 0:
            self._sleep(delay)
            return delay
        return 0.0
