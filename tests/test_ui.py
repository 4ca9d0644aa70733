"""What a person sees in the Prefect UI after a miss and a hit, checked in headless Chromium.

The UI is served by `main.py ui` itself (the command the README tells people to run), on a
free port with its own Prefect home, so the runs list holds only this test's runs. The
browser is Debian's `chromium`, driven by Playwright; it may reach nothing but that server.
The screenshots the README shows come from this test: `make screenshots` runs it with
JUICECACHE_SCREENSHOTS=docs/images; otherwise they go to a temporary folder, so a test run
leaves the work tree clean.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.support.environment import MAIN, REPO, Sandbox, local_sandbox
from tests.support.prefect_server import PrefectServer
from tests.support.processes import free_port, wait_until

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser here
# On top of Playwright's own switches (which already turn off background networking and
# component updates): no GPU in a headless test, no QUIC probing, no sync service.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
INPUTS = ("1", "2.5", "ui")
NAME = "[1, 2.5, 'ui']"
PAGE_TIMEOUT_MS = 20_000


@dataclass
class Run:
    """One `main.py` run as the API knows it, with what `--json` said about it."""

    report: dict
    flow_run_id: str
    task_run_id: str
    artifact_id: str


@pytest.fixture
def ui_sandbox() -> Iterator[tuple[Sandbox, str]]:
    """`main.py ui` on a free loopback port, and a mounted volume whose runs report to it.

    The folder's name is short so the entry paths fit in the artifact's screenshot.
    """
    port = free_port()
    ui_url = f"http://127.0.0.1:{port}"
    folder = Path(tempfile.mkdtemp(prefix="jc-ui-"))
    with local_sandbox(folder, f"{ui_url}/api") as box:
        box.env.update(PREFECT_UI_HOST="127.0.0.1", PREFECT_UI_PORT=str(port))
        box.use_default_demo_seconds()  # the screenshots show the demo as a newcomer runs it
        log = folder / "ui-server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(MAIN), "ui"], env=box.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        server = PrefectServer(process, f"{ui_url}/api", log)
        try:
            server.wait_ready()
            mounted = box.run("mount", timeout=90)
            assert mounted.returncode == 0, mounted.stderr
            yield box, ui_url
        finally:
            server.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium with a fresh profile (Playwright makes and deletes one per launch)."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def demo_runs(box: Sandbox, api: str) -> list[Run]:
    """Run the demo twice with the same new inputs; return both runs once the server has
    recorded them to the end (task run states reach it as events, a moment later)."""
    reports = []
    for _ in range(2):
        done = box.run("-input", *INPUTS, "--json")
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(done.stdout))

    def recorded() -> list[Run]:
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_ASC"}).json()
        runs = []
        for report, flow_run in zip(reports, flow_runs, strict=False):
            of_run = {"flow_run_id": {"any_": [flow_run["id"]]}}
            task_runs = httpx.post(f"{api}/task_runs/filter", json={"task_runs": of_run}).json()
            artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": of_run}).json()
            if flow_run["state_type"] != "COMPLETED" or len(artifacts) != 1 or len(task_runs) != 1 or task_runs[0]["state_type"] != "COMPLETED":
                return []
            runs.append(Run(report, flow_run["id"], task_runs[0]["id"], artifacts[0]["id"]))
        return runs if len(flow_runs) == 2 else []

    assert wait_until(lambda: bool(recorded()), timeout=30), "the server did not record both runs"
    return recorded()


def show(page: Page, url: str, ready: Locator, tab: str | None = None) -> None:
    """Open `url` (and a tab of it) until `ready` is visible.

    The UI is a single-page app loading its code in chunks: a chunk lost on the way (e.g.
    Chromium cancels requests with ERR_NETWORK_CHANGED when another process adds a
    network interface) leaves a page that never completes, so the page is loaded afresh.
    """
    for attempt in range(3):
        try:
            page.goto(url)
            if tab:
                page.locator("[role=tablist] li", has_text=tab).click(timeout=PAGE_TIMEOUT_MS)
            expect(ready).to_be_visible(timeout=PAGE_TIMEOUT_MS)
            return
        except (PlaywrightTimeout, AssertionError):
            if attempt == 2:
                raise


def row(page: Page, link: str) -> Locator:
    """The list item (of flow runs or task runs) holding the link to `link`."""
    return page.locator(".state-list-item").filter(has=page.locator(f'a[href$="{link}"]'))


def test_a_miss_and_a_hit_as_seen_in_the_ui(ui_sandbox: tuple[Sandbox, str], browser: Browser, tmp_path: Path) -> None:
    box, ui = ui_sandbox
    images = REPO / os.environ["JUICECACHE_SCREENSHOTS"] if os.environ.get("JUICECACHE_SCREENSHOTS") else tmp_path
    miss, hit = demo_runs(box, f"{ui}/api")
    assert (miss.report["cache"], hit.report["cache"]) == ("miss", "hit")

    outside: list[str] = []
    context = browser.new_context(viewport=VIEWPORT)
    context.route(re.compile(rf"^(?!{re.escape(ui)}/)"), lambda route: (outside.append(route.request.url), route.abort()))
    page = context.new_page()
    images.mkdir(parents=True, exist_ok=True)

    # The runs list: both runs, named after their inputs, tagged with what the cache did.
    show(page, f"{ui}/runs", row(page, f"/runs/flow-run/{hit.flow_run_id}"))
    for run in (miss, hit):
        listed = row(page, f"/runs/flow-run/{run.flow_run_id}")
        expect(listed).to_contain_text(f"inputs {NAME}")
        for tag in (f"cache:{run.report['cache']}", "juicecache", "volume:testvol"):
            expect(listed.get_by_text(tag, exact=True)).to_be_visible()
    page.screenshot(path=images / "ui-runs.png", full_page=True)

    # Each flow run's task run: Completed when it computed, Cached when the volume answered.
    for run, state in ((miss, "Completed"), (hit, "Cached")):
        task = row(page, f"/runs/task-run/{run.task_run_id}")
        show(page, f"{ui}/runs/flow-run/{run.flow_run_id}", task, tab="Task Runs")
        expect(task).to_contain_text(f"compute {NAME}")
        expect(task.locator(".state-badge")).to_have_text(state)
    page.screenshot(path=images / "ui-flow-run.png")

    # The cache artifact: hit or miss, the key, where the entry is, the time saved.
    for run in (miss, hit):
        report = run.report
        table = page.locator("table").filter(has_text="time saved")
        show(page, f"{ui}/artifacts/artifact/{run.artifact_id}", table)
        expect(page.get_by_role("heading", name=f"juicecache: cache {report['cache']}")).to_be_visible()
        for field, value in (
            ("key", report["key"]),
            ("cache", report["cache"]),
            ("where", "JuiceFS volume testvol"),
            ("record", report["storage"]),
            ("time saved", f"{report['saved_seconds']:.3f} s"),
        ):
            expect(table.locator("tr").filter(has=page.get_by_text(field, exact=True))).to_contain_text(value)
    assert hit.report["saved_seconds"] > 0
    page.screenshot(path=images / "ui-artifact.png")

    context.close()
    assert outside == [], f"the UI tried to reach beyond its server: {outside}"
