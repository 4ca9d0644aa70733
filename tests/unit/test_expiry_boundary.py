"""`cache gc` never removes an entry that Prefect would still serve: at every moment around
an entry's expiry, gc's verdict (taken first) and Prefect's own check (taken after) agree."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from juicecache.entryfile import DATA, RECORDS, Signer
from juicecache.removal import plan_gc
from juicecache.scan import scan


def test_gc_and_prefect_agree_across_the_expiry(tmp_path: Path) -> None:
    from prefect.results import ResultStore

    from juicecache.serializer import RawPickleSerializer
    from juicecache.storage import EntryStorage, StoreConfig

    config = StoreConfig(tmp_path, Signer())
    records, data = (EntryStorage.create(kind, lambda: config) for kind in (RECORDS, DATA))
    store = ResultStore(result_storage=data, metadata_storage=records, serializer=RawPickleSerializer())
    key = "boundary-" + "0" * 40
    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    store.write(key=key, obj={"value": 1}, expiration=expires)

    verdicts = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        removed_by_gc = [removal.entry.key for removal in plan_gc(scan(tmp_path, full=True), expired=True)] == [key]
        served_by_prefect = store.exists(key)  # taken after gc's verdict: a later moment
        verdicts.append((removed_by_gc, served_by_prefect))
        assert not (removed_by_gc and served_by_prefect), verdicts
        if removed_by_gc:
            break
    # Both sides of the boundary were seen: served and kept, then expired for both.
    assert verdicts[0] == (False, True) and verdicts[-1] == (True, False), verdicts
