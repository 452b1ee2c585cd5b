"""A scheduled pipeline: `fusion schedule` creates the deployment on the workspace's Prefect server,
`fusion schedules` lists it, `fusion serve` executes its scheduled run, which reuses every stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import REPO_ROOT
from servers_fixtures import served_pipeline  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow
FUSION = Path(sys.executable).parent / "fusion"
RUN_TIMEOUT_S = 300


def _fusion(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(FUSION), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _completed_runs(api_url: str, deployment_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))))


def test_a_scheduled_run_executes_and_reuses_every_stage(served_pipeline, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    from flows.servers import server_environment

    p = served_pipeline
    config = p.workspace.parent / "pipeline.yaml"
    server_env = server_environment(p.workspace)
    env = {**os.environ, **server_env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}

    bad = _fusion("schedule", str(config), "--cron", "every day", env=env)
    assert bad.returncode == 1 and "Invalid cron string" in bad.stderr

    made = _fusion("schedule", str(config), "--interval", "10", "--name", "tiny-every-10s", env=env)
    assert made.returncode == 0, made.stderr
    assert "scheduled fusion_pipeline/tiny-every-10s (every 10 s), run by `fusion serve`" in made.stdout
    deployment_id = made.stdout.strip().rsplit(" ", 1)[-1]

    listed = _fusion("schedules", str(config), "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    row = rows["fusion_pipeline/tiny-every-10s"]
    assert row["schedules"] == ["every 10 s"] and row["active"] and row["runs_on"] == "fusion serve"
    assert Path(row["config"]).is_file()  # the resolved config, kept in the workspace

    # On a work pool: refused while the pool does not exist, listed as the pool's once it does.
    missing = _fusion("schedule", str(config), "--cron", "0 3 * * *", "--work-pool", "tiny-pool", env=env)
    assert missing.returncode == 1 and "no work pool 'tiny-pool'" in missing.stderr
    pool = subprocess.run([str(FUSION.parent / "prefect"), "work-pool", "create", "tiny-pool", "--type", "process"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stderr
    pooled = _fusion("schedule", str(config), "--cron", "0 3 * * *", "--name", "tiny-nightly", "--work-pool",
                     "tiny-pool", env=env)
    assert pooled.returncode == 0 and "run by workers of work pool 'tiny-pool'" in pooled.stdout, pooled.stderr
    rows = {r["name"]: r for r in json.loads(_fusion("schedules", str(config), "--json", env=env).stdout)}
    assert rows["fusion_pipeline/tiny-nightly"]["runs_on"] == "work pool tiny-pool"
    assert rows["fusion_pipeline/tiny-nightly"]["schedules"] == ["cron 0 3 * * *"]

    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(FUSION), "serve", str(config), "--limit", "1"], env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        done = []
        while not done and time.monotonic() < deadline and serve.poll() is None:
            time.sleep(3)
            done = _completed_runs(server_env["PREFECT_API_URL"], deployment_id)
        assert done, (f"no scheduled run completed within {RUN_TIMEOUT_S} s (serve "
                      f"{'exited ' + str(serve.returncode) if serve.poll() is not None else 'running'}):\n"
                      + (tmp_path / "serve.log").read_text()[-4000:])
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()

    # The scheduled run is a pipeline run in MLflow whose every stage was reused: nothing changed.
    client = MlflowClient(tracking_uri=server_env["FUSION_TRACKING_URI"])
    exp = client.get_experiment_by_name("tiny")
    flow_run_id = str(done[0].id)
    parents = client.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stages = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {r.data.tags["stage"]: r.data.tags["reused"] for r in stages} == {
        s: "true" for s in ("prepare_data", "align_vocabularies", "teacher_inference", "fusion_training", "evaluate")}
    seconds = parents[0].data.metrics["pipeline_seconds"]
    print(f"scheduled run from cache: {seconds:.1f} s (first run: {p.seconds:.1f} s)")
