"""reload.plan: what a reload changes, from two configs alone (no daemon, no kernel)."""

from __future__ import annotations

from typing import Any

import yaml

from aiod.config import Config, parse
from aiod.reload import plan


def cfg(pools: list[dict[str, Any]], jobs: list[dict[str, Any]] | None = None,
        listen: str = "127.0.0.1:9740") -> Config:
    doc = {"state_directory": "/var/lib/aiod-test", "metrics": {"listen": listen},
           "pools": pools, "jobs": jobs or []}
    return parse(yaml.safe_dump(doc), "t.yaml", env={})


def pool(name: str, contexts: int = 2, nr_events: int = 64) -> dict[str, Any]:
    return {"name": name, "contexts": contexts, "nr_events": nr_events}


def job(name: str, pool: str = "a", rate: str = "10/s") -> dict[str, Any]:
    return {"name": name, "pool": pool, "type": "probe", "target": f"/tmp/{name}.dat",
            "rate": rate}


def test_the_same_config_plans_nothing() -> None:
    c = cfg([pool("a")], [job("j")])
    p = plan(c, c)
    assert p.empty
    assert p.keep_pools == ("a",)


def test_a_new_pool_is_created_and_a_removed_one_retired() -> None:
    p = plan(cfg([pool("a"), pool("b")]), cfg([pool("a"), pool("c")]))
    assert p.create_pools == ("c",)
    assert p.retire_pools == ("b",)
    assert p.keep_pools == ("a",)
    assert not p.replaced_pools


def test_a_resize_keeps_the_pool_and_its_jobs() -> None:
    p = plan(cfg([pool("a", contexts=2)], [job("j")]),
             cfg([pool("a", contexts=5)], [job("j")]))
    assert p.keep_pools == ("a",) and not p.create_pools and not p.retire_pools
    assert not p.start_jobs and not p.stop_jobs


def test_new_nr_events_replace_the_pool_and_restart_its_jobs_only() -> None:
    old = cfg([pool("a", nr_events=64), pool("b")], [job("on-a", "a"), job("on-b", "b")])
    new = cfg([pool("a", nr_events=128), pool("b")], [job("on-a", "a"), job("on-b", "b")])
    p = plan(old, new)
    assert p.replaced_pools == {"a"}
    assert p.create_pools == ("a",) and p.retire_pools == ("a",)
    assert p.stop_jobs == ("on-a",)
    assert [j.name for j in p.start_jobs] == ["on-a"]


def test_a_changed_job_restarts_an_added_one_starts_a_removed_one_stops() -> None:
    old = cfg([pool("a")], [job("same"), job("changed"), job("gone")])
    new = cfg([pool("a")], [job("same"), job("changed", rate="20/s"), job("added")])
    p = plan(old, new)
    assert sorted(p.stop_jobs) == ["changed", "gone"]
    assert sorted(j.name for j in p.start_jobs) == ["added", "changed"]


def test_a_job_moved_to_another_pool_restarts() -> None:
    old = cfg([pool("a"), pool("b")], [job("j", "a")])
    new = cfg([pool("a"), pool("b")], [job("j", "b")])
    p = plan(old, new)
    assert p.stop_jobs == ("j",) and [j.pool for j in p.start_jobs] == ["b"]


def test_a_new_listen_address_moves_the_metrics() -> None:
    assert plan(cfg([pool("a")]), cfg([pool("a")], listen="127.0.0.1:9741")).metrics_moved
    assert not plan(cfg([pool("a")]), cfg([pool("a")])).metrics_moved
