"""`cache gc`'s plan, a pure function of a scan: what goes, in which order, and why."""

from __future__ import annotations

from pathlib import Path

from juicecache.removal import plan_gc
from juicecache.scan import Entry, Scan

NOW = 1_000_000.0


def entry(key: str, created_ago: float, size: int, expires_in: float | None = None, problem: str | None = None) -> Entry:
    expires = NOW + expires_in if expires_in is not None else None
    return Entry(key, 1, "t", "h", NOW - created_ago, expires, size, 0, problem)


def plan(*entries: Entry, **rules) -> list[tuple[str, str]]:
    return [(removal.entry.key, removal.reason) for removal in plan_gc(Scan(Path("/x"), list(entries), [], NOW), **rules)]


def test_unusable_entries_always_go_and_nothing_else_without_rules() -> None:
    assert plan(entry("a", 10, 1), entry("b", 10, 1, problem="payload missing")) == [("b", "payload missing")]


def test_expired_and_old_entries() -> None:
    found = (entry("fresh", 10, 1), entry("expired", 10, 1, expires_in=-1), entry("old", 7200, 1, expires_in=60))
    assert plan(*found, expired=True) == [("expired", "expired")]
    assert plan(*found, older_than=3600) == [("old", "old")]
    # An entry that expires exactly now is expired (Prefect would no longer serve it).
    assert plan(entry("now", 10, 1, expires_in=0), expired=True) == [("now", "expired")]


def test_max_size_removes_the_oldest_first_until_under() -> None:
    found = (entry("b-newest", 1, 100), entry("a-oldest", 40, 300), entry("c-middle", 20, 200), entry("d-old", 30, 50))
    assert plan(*found, max_size=300) == [("a-oldest", "over size"), ("d-old", "over size")]
    assert plan(*found, max_size=1000) == []
