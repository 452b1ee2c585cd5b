"""The MLflow UI over a real pipeline's tracking store, in headless chromium: the runs, the stage
runs, the evaluation's artifacts and the registered model's alias are there for a user to see.
Screenshots go to test-artifacts/mlflow-ui/, with the server's log."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import pytest
from browser import (ARTIFACTS_DIR, browser_page, chromium_executable, free_port, open_page, screenshot_after,
                     served, wait_visible)
from conftest import write_tiny_pipeline

pytestmark = pytest.mark.slow

SHOTS = "mlflow-ui"
STAGE_RUNS = ("prepare_data", "align_vocabularies", "teacher_inference", "fusion_training", "evaluate")
# Paths inside a run's artifacts; "folder/file" opens the folder in the browser. The first one is
# previewed, and the preview must show the text paired with it.
EXPECTED_EVALUATE_ARTIFACTS = (
    "report/evaluation.md",
    "report/evaluation.json",
    "report/evaluation.png",
    "evaluate.json",
)
EVALUATE_PREVIEW = re.compile(r"^Evaluation of tiny")  # the report's title, a heading
# The candidate's evaluation: a run nested in the evaluate run, one file per evaluated unit.
EXPECTED_CANDIDATE_ARTIFACTS = (
    "evaluation/lm_eval_fusion_arith_mc.json",
    "evaluation/perplexity.json",
)
CANDIDATE_PREVIEW = '"results"'  # lm-eval's results key, in the JSON preview
# MLflow 3.17 opens an experiment on its GenAI overview (traces) unless the UI is switched to
# "Model training"; the runs table is that workflow's.
RUNS_TABLE = "runs?workflowType=machine_learning"
# MLflow 3.17 opens its assistant side panel on a first visit, over a third of every screenshot.
# These are its UI's localStorage keys; should they change, the panel is only in the way.
CLOSED_ASSISTANT = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")


@dataclass(frozen=True)
class TrackedPipeline:
    tracking_uri: str
    experiment_id: str
    run_id: str
    run_name: str
    stage_run_ids: dict[str, str]
    candidate_evaluation_run_id: str
    registered_model: str
    version: str


@pytest.fixture(scope="module")
def tracked_pipeline(tmp_path_factory, tiny_models, prefect_harness) -> TrackedPipeline:
    """One run of the tiny pipeline, read back from its SQLite tracking store."""
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline

    chromium_executable()  # no browser: fail now, not after the pipeline's minutes
    summary = run_pipeline(write_tiny_pipeline(tmp_path_factory.mktemp("mlflow-ui"), tiny_models))
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    experiments = [parent.info.experiment_id]
    children = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    stage_run_ids = {r.data.tags["stage"]: r.info.run_id for r in children}
    candidate = client.search_runs(experiments, filter_string=(
        f"tags.mlflow.parentRunId = '{stage_run_ids['evaluate']}' and tags.eval_role = 'candidate'"))
    assert len(candidate) == 1, "the evaluate run has one nested run evaluating the candidate"
    return TrackedPipeline(
        tracking_uri=summary["tracking_uri"], experiment_id=parent.info.experiment_id,
        run_id=summary["run_id"], run_name=parent.info.run_name, stage_run_ids=stage_run_ids,
        candidate_evaluation_run_id=candidate[0].info.run_id,
        registered_model=summary["registered_model"], version=summary["version"])


@pytest.fixture(scope="module")
def mlflow_ui(tracked_pipeline, tmp_path_factory) -> str:
    """The base URL of `mlflow server` over the pipeline's store, stopped after the module."""
    port = free_port()
    # The experiment's artifact location is a file:// URI: the server lists and serves those
    # files itself, no artifact proxy needed.
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracked_pipeline.tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No background job runner (GenAI judges, trace rollups): the UI does not need its seven
    # huey workers, which double the start-up time.
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with served(command, ready_url=f"http://127.0.0.1:{port}/health", log_path=ARTIFACTS_DIR / SHOTS / "server.log",
                cwd=tmp_path_factory.mktemp("mlflow-server"), env=env):
        yield f"http://127.0.0.1:{port}/"


def test_experiment_lists_the_pipeline_run_and_its_stage_runs(mlflow_ui, tracked_pipeline):
    p = tracked_pipeline
    assert p.run_name.startswith("tiny-") and sorted(p.stage_run_ids) == sorted(STAGE_RUNS)
    with browser_page(init_script=CLOSED_ASSISTANT) as page:
        with screenshot_after(page, SHOTS, "experiment-runs"):
            page.goto(f"{mlflow_ui}#/experiments/{p.experiment_id}/{RUNS_TABLE}")
            parent = page.get_by_role("link", name=p.run_name, exact=True)
            wait_visible(parent)
        with screenshot_after(page, SHOTS, "experiment-runs-expanded"):
            # The parent's name cell holds one button: the unlabelled expander of its child runs.
            name_cell = page.get_by_role("row").filter(has=parent).get_by_role("gridcell").filter(has=parent)
            name_cell.get_by_role("button").click()
            for stage in STAGE_RUNS:
                wait_visible(page.get_by_role("link", name=stage, exact=True))
        with screenshot_after(page, SHOTS, "parent-run"):
            open_page(page, f"{mlflow_ui}#/experiments/{p.experiment_id}/runs/{p.run_id}", p.run_name, "Child runs")
            for stage in STAGE_RUNS:
                wait_visible(page.get_by_role("link", name=stage, exact=True))


def _show_artifact(page, path: str) -> None:
    """Opens the folders of `path` in the run's artifact tree, then waits for its file name."""
    parts = path.split("/")
    for folder, inside in zip(parts, parts[1:]):
        wait_visible(page.get_by_text(folder, exact=True))
        if not page.get_by_text(inside, exact=True).first.is_visible():
            page.get_by_text(folder, exact=True).first.click()
    wait_visible(page.get_by_text(parts[-1], exact=True))


def _check_artifacts(page, url: str, run_name: str, paths: tuple[str, ...], preview) -> None:
    """The run's artifact tree at `url` lists every path; the first one's preview shows `preview`
    (a regex for a heading, or a text): the server reads the file itself from the file:// store."""
    open_page(page, url, run_name)
    for path in paths:
        _show_artifact(page, path)
    page.get_by_text(paths[0].split("/")[-1], exact=True).first.click()
    if isinstance(preview, re.Pattern):
        wait_visible(page.get_by_role("heading", name=preview))
    else:
        wait_visible(page.get_by_text(preview))


def test_evaluate_run_lists_its_artifacts(mlflow_ui, tracked_pipeline):
    p = tracked_pipeline
    runs = f"{mlflow_ui}#/experiments/{p.experiment_id}/runs"
    with browser_page(init_script=CLOSED_ASSISTANT) as page:
        with screenshot_after(page, SHOTS, "evaluate-artifacts"):
            _check_artifacts(page, f"{runs}/{p.stage_run_ids['evaluate']}/artifacts", "evaluate",
                             EXPECTED_EVALUATE_ARTIFACTS, EVALUATE_PREVIEW)
        with screenshot_after(page, SHOTS, "candidate-evaluation-artifacts"):
            _check_artifacts(page, f"{runs}/{p.candidate_evaluation_run_id}/artifacts", "eval candidate",
                             EXPECTED_CANDIDATE_ARTIFACTS, CANDIDATE_PREVIEW)


def test_registered_model_shows_the_candidate_alias(mlflow_ui, tracked_pipeline):
    p = tracked_pipeline
    with browser_page(init_script=CLOSED_ASSISTANT) as page:
        with screenshot_after(page, SHOTS, "registered-model"):
            open_page(page, f"{mlflow_ui}#/models/{p.registered_model}", p.registered_model)
            version_link = page.get_by_role("link", name=f"Version {p.version}", exact=True)
            # MLflow renders an alias as "@ candidate" (a no-break space, normalised by the match).
            wait_visible(page.get_by_role("row").filter(has=version_link).get_by_text("@ candidate", exact=True))
        with screenshot_after(page, SHOTS, "model-version"):
            open_page(page, f"{mlflow_ui}#/models/{p.registered_model}/versions/{p.version}",
                      f"Version {p.version}", "@ candidate")
