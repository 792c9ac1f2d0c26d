"""The yield policy (aiod.headroom) on readings of fs.aio-nr: a unit test of our
own logic; the daemon test in test_budget_daemon.py drives the real thing."""

from __future__ import annotations

import subprocess

import pytest

from aiod import config
from aiod.headroom import GROW_SETTLE, HeadroomPolicy, room_problem
from tests.daemon_harness import AIOD, ROOT

ENV = {"STATE_DIRECTORY": "/var/lib/aiod"}
MAX = 65536


def cfg(reserve: str, *pools: str) -> config.Config:
    return config.parse(f"headroom_reserve: {reserve}\npools:\n" +
                        "".join(f"  - {p}\n" for p in pools), "t.yaml", env=ENV)


def test_shrinks_just_enough_to_restore_the_reserve_then_regrows_with_hysteresis() -> None:
    p = HeadroomPolicy(cfg("1000", "{name: a, contexts: 8, min_contexts: 2, nr_events: 100}"))
    assert p.active and p.targets == {"a": 8}
    # 8 x 100 held by aiod; 63000 by others: free 1736 -> fine
    assert p.decide(63800, MAX, now=0).targets == {"a": 8}
    # others take 1000 more: free 736, 264 short -> give back 3 contexts (300)
    d = p.decide(64800, MAX, now=1)
    assert d.targets == {"a": 5} and d.shrunk == {"a": 3} and d.reserve == 1000
    # the three are still retiring (charged): not answered twice
    assert p.decide(64800, MAX, now=2, releasing=300).targets == {"a": 5}
    # destroyed: free 1036, fine; nothing grows (would leave less than a context spare)
    assert p.decide(64500, MAX, now=3).targets == {"a": 5}
    # the others free 300 of theirs: free 1336; grow only after GROW_SETTLE seconds
    assert p.decide(64200, MAX, now=4).targets == {"a": 5}
    d = p.decide(64200, MAX, now=4 + GROW_SETTLE)
    # each added context must leave the reserve plus one context free: 1336 -> 1136
    assert d.targets == {"a": 7} and d.grown == {"a": 2}
    # aio-nr now counts aiod's 700 and the others' 63700: free 1136.
    # A few events of noise either way do not flap.
    assert p.decide(64450, MAX, now=10).targets == {"a": 7}
    assert p.decide(64350, MAX, now=11).targets == {"a": 7}
    # the rest freed (others back to 63000): back to full size
    assert p.decide(63700, MAX, now=20).targets == {"a": 8}
    assert p.yielded() == 0


def test_never_below_min_contexts_and_fixed_pools_never_move() -> None:
    p = HeadroomPolicy(cfg("10%", "{name: a, contexts: 4, min_contexts: 3, nr_events: 64}",
                           "{name: b, contexts: 4, nr_events: 64}"))
    d = p.decide(MAX - 10, MAX, now=0)
    assert d.targets == {"a": 3, "b": 4} and d.shrunk == {"a": 1}
    assert p.yielded() == 1


def test_the_pool_with_most_to_give_gives_first() -> None:
    p = HeadroomPolicy(cfg("500", "{name: a, contexts: 4, min_contexts: 3, nr_events: 64}",
                           "{name: b, contexts: 10, min_contexts: 1, nr_events: 64}"))
    d = p.decide(MAX - 400, MAX, now=0)
    assert d.targets == {"a": 4, "b": 8}


def test_off_without_a_reserve_or_without_elastic_pools() -> None:
    for c in (cfg("0", "{name: a, contexts: 4, min_contexts: 1, nr_events: 64}"),
              cfg("50%", "{name: a, contexts: 4, nr_events: 64}")):
        p = HeadroomPolicy(c)
        assert not p.active
        assert p.decide(MAX, MAX, now=0).targets == {"a": 4}


def test_initial_targets_start_small_when_the_host_is_short() -> None:
    p = HeadroomPolicy(cfg("1000", "{name: a, contexts: 8, min_contexts: 2, nr_events: 100}"))
    assert p.initial_targets(MAX - 1500, MAX) == {"a": 5}
    p = HeadroomPolicy(cfg("1000", "{name: a, contexts: 8, min_contexts: 2, nr_events: 100}"))
    assert p.initial_targets(0, MAX) == {"a": 8}


def test_reload_keeps_yields_within_the_new_bounds() -> None:
    p = HeadroomPolicy(cfg("1000", "{name: a, contexts: 8, min_contexts: 2, nr_events: 100}"))
    p.decide(MAX - 500, MAX, now=0)
    assert p.targets == {"a": 3}
    p.configure(cfg("1000", "{name: a, contexts: 6, min_contexts: 4, nr_events: 100}"))
    assert p.targets == {"a": 4}


def test_room_problem() -> None:
    c = cfg("65000", "{name: a, contexts: 8, min_contexts: 2, nr_events: 512}")
    line = room_problem(c, MAX)
    assert line is not None and "\n" not in line
    assert line.startswith("t.yaml: headroom_reserve: 65000 (65000 events) plus the pools' "
                           "minimum of 1024 events")
    assert room_problem(cfg("64000", "{name: a, contexts: 8, min_contexts: 2, "
                                     "nr_events: 512}"), MAX) is None


@pytest.mark.parametrize("reserve, ok", [("99%", False), ("1000", True)])
def test_check_config_rejects_a_reserve_that_leaves_no_room(tmp_path: object, reserve: str,
                                                            ok: bool) -> None:
    import pathlib
    path = pathlib.Path(str(tmp_path)) / "aiod.yaml"
    path.write_text(f"headroom_reserve: {reserve}\nstate_directory: /var/lib/aiod\npools:\n"
                    "  - {name: a, contexts: 8, min_contexts: 2, nr_events: 512}\n")
    r = subprocess.run(AIOD + ["check-config", str(path)], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    if ok:
        assert (r.returncode, r.stderr) == (0, "")
    else:
        assert r.returncode == 78 and r.stdout == ""
        (line,) = r.stderr.splitlines()
        assert "no room at all" in line and "fs.aio-max-nr" in line
