"""The Prefect UI of `fusion server`, in headless chromium: the pipeline's flow run is listed, and
its page lists the five stage task runs. Screenshots go to test-artifacts/prefect-ui/.

Prefect 3.8 serves two UIs: V2 under /v2 (where the dashboard's address leads unless the browser
chose V1) and V1 at the root paths ("Switch to V1 UI"). Both are checked.
"""
from __future__ import annotations

import re

import pytest
from browser import ARTIFACTS_DIR, browser_page, chromium_executable, open_page, screenshot_after, wait_visible
from servers_fixtures import STAGES, flow_run_and_task_runs, served_pipeline, stage_of

pytestmark = pytest.mark.slow
assert served_pipeline  # a fixture, imported for the tests below

SHOTS = "prefect-ui"
UI_BASE = {"v2": "/v2", "v1": ""}  # path prefix of each UI's routes
# The page is tall enough for the run graph and the 14 task runs of the tiny pipeline below it.
PAGE_HEIGHT = 2000


@pytest.fixture(scope="session")
def browser_ready() -> None:
    chromium_executable()  # no browser: fail now, not after the servers and the pipeline


@pytest.fixture(scope="module")
def flow_run(browser_ready, served_pipeline):
    """(flow run, its stage task runs by stage) as Prefect's client reads them from the server."""
    flow_run, task_runs = flow_run_and_task_runs(served_pipeline.state.prefect_api_url, served_pipeline.flow_run_id)
    stage_runs = {stage_of(t.name): t for t in task_runs if stage_of(t.name) in STAGES}
    assert sorted(stage_runs) == sorted(STAGES)
    # The servers' logs next to the screenshots, for a failure's post-mortem.
    for server in (served_pipeline.state.prefect, served_pipeline.state.mlflow):
        (ARTIFACTS_DIR / SHOTS).mkdir(parents=True, exist_ok=True)
        (ARTIFACTS_DIR / SHOTS / f"{server.name}-server.log").write_bytes(open(server.log, "rb").read())
    return flow_run, stage_runs


@pytest.mark.parametrize("ui", ["v2", "v1"])
def test_flow_run_page_lists_the_stage_task_runs(served_pipeline, flow_run, ui):
    run, stage_runs = flow_run
    base = served_pipeline.state.prefect.url + UI_BASE[ui]
    with browser_page(height=PAGE_HEIGHT) as page:
        name = "flow-run" if ui == "v2" else "flow-run-v1"
        with screenshot_after(page, SHOTS, name):
            open_page(page, f"{base}/runs/flow-run/{run.id}", run.name, "Completed", "fusion_pipeline")
            page.get_by_text("Task Runs", exact=True).first.click()
            for stage in STAGES:
                task_run = stage_runs[stage]
                # The row's link opens that very task run.
                link = page.locator(f'a[href$="/runs/task-run/{task_run.id}"]')
                wait_visible(link)
                assert link.first.inner_text().strip() == task_run.name
                assert re.fullmatch(rf"{stage}-\w+", task_run.name)


def test_runs_list_shows_the_pipeline_run(served_pipeline, flow_run):
    run, _ = flow_run
    with browser_page() as page:
        with screenshot_after(page, SHOTS, "flow-runs"):
            open_page(page, f"{served_pipeline.state.prefect.url}/v2/runs", "1 Flow run")
            link = page.locator(f'a[href$="/runs/flow-run/{run.id}"]')
            wait_visible(link)
            assert link.first.inner_text().strip() == run.name
            wait_visible(page.get_by_text("Completed", exact=True))  # its state: the only run there
