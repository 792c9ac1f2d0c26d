"""aiod.health: the phase, and the heartbeat behind WATCHDOG=1, STATUS= and /healthz."""

from __future__ import annotations

from aiod.health import HEALTH_STALL, STATUS_INTERVAL, Health, Phase
from aiod.notify import Notifier


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health(clock: Clock, sent: list[str], watchdog_usec: str | None = None) -> Health:
    env = {"NOTIFY_SOCKET": "@test"}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = watchdog_usec
    notifier = Notifier(send=sent.append, env=env)
    return Health(notifier, lambda: "1 pool", clock=clock)


def test_ready_only_while_serving_and_healthy_until_stopped() -> None:
    clock, sent = Clock(), list[str]()
    h = health(clock, sent)
    assert h.healthy() and not h.ready()           # starting
    h.enter(Phase.SERVING)
    assert h.healthy() and h.ready()
    h.enter(Phase.DRAINING)
    assert h.healthy() and not h.ready()           # still turning, no longer serving
    h.enter(Phase.STOPPED)
    assert not h.healthy() and not h.ready()


def test_a_loop_that_stops_beating_is_unhealthy_and_one_beat_makes_it_healthy_again() -> None:
    clock, sent = Clock(), list[str]()
    h = health(clock, sent)
    h.enter(Phase.SERVING)
    clock.now += HEALTH_STALL + 0.1
    assert not h.healthy() and not h.ready()
    h.beat()
    assert h.healthy() and h.ready()


def test_watchdog_pings_come_from_beats_at_half_the_interval() -> None:
    clock, sent = Clock(), list[str]()
    h = health(clock, sent, watchdog_usec="2000000")   # pings every second
    h.enter(Phase.SERVING)
    h.beat()
    assert sent.count("WATCHDOG=1") == 1               # due at once
    clock.now += 0.5
    h.beat()
    assert sent.count("WATCHDOG=1") == 1
    assert h.next_due() == 101.0
    clock.now += 0.5
    h.beat()
    assert sent.count("WATCHDOG=1") == 2
    # After a stall, one beat is one ping: no burst to catch up.
    clock.now += 30
    h.beat()
    assert sent.count("WATCHDOG=1") == 3


def test_the_status_line_goes_out_every_status_interval() -> None:
    clock, sent = Clock(), list[str]()
    h = health(clock, sent)
    h.enter(Phase.SERVING)
    assert h.next_due() == clock.now + STATUS_INTERVAL  # no watchdog asked for
    h.beat()
    assert "STATUS=1 pool" not in sent
    clock.now += STATUS_INTERVAL
    h.beat()
    assert sent == ["STATUS=1 pool"]
