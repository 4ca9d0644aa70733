"""A flow run whose cached tasks fall back to a local folder says so in the Prefect UI.

A local fallback splits the cache: what this run computes is not shared, and it shares
nothing it did not compute here. A log line is easy to miss in a worker-launched run, so
each such flow run also gets the tag `juicecache:local-fallback` and a markdown artifact
`juicecache-fallback` saying why and how to fix it. It costs two API calls, once per flow
run, and only on the fallback. `JUICECACHE_REQUIRE_VOLUME=1` makes it an error instead.
"""

from __future__ import annotations

import collections
import logging
import threading
from uuid import UUID

from juicecache.volume import CacheLocation

FALLBACK_TAG = "juicecache:local-fallback"
FALLBACK_ARTIFACT = "juicecache-fallback"
logger = logging.getLogger("juicecache")

# Flow runs already marked, the most recent ones (a long-lived worker runs many).
_shown: collections.OrderedDict[UUID, None] = collections.OrderedDict()
_REMEMBERED = 1024
_guard = threading.Lock()


def show_fallback(location: CacheLocation) -> None:
    """Tag the running flow run and leave an artifact, once per flow run, if `location` is a fallback."""
    if location.on_volume:
        return
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None:
        return
    with _guard:
        if run.id in _shown:
            return
        _shown[run.id] = None
        while len(_shown) > _REMEMBERED:
            _shown.popitem(last=False)
    try:
        _tag_and_explain(run.id, location)
    except Exception as exc:  # the UI hint must never fail the run it describes
        logger.warning("could not mark flow run %s as using the local fallback: %s", run.id, exc)


def _tag_and_explain(run_id: UUID, location: CacheLocation) -> None:
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        client.update_flow_run(run_id, tags=sorted({*run.tags, FALLBACK_TAG}))
    create_markdown_artifact(
        markdown=f"## juicecache: local fallback, not shared\n\n{location.warning}\n\nEntries: `{location.path}`",
        key=FALLBACK_ARTIFACT,
        description="cached tasks of this run used a local folder: nothing was shared with other machines",
        _sync=True,  # type: ignore[call-arg]  (Prefect's async_dispatch: a plain call, also from async tasks)
    )
