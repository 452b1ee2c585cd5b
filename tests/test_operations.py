"""Operations: rerun a failed or interrupted pipeline run, stage retries."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_tiny_pipeline
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import run_pipeline


def _client(root):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'workspace' / 'mlflow' / 'mlflow.db'}")


def _pipeline_runs(client, status: str | None = None):
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.config_fingerprint != ''",
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if "stage" not in r.data.tags and (status is None or r.info.status == status)]


def _stage_states(client, run_id: str) -> dict[str, str]:
    exp = client.get_run(run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")
    return {r.info.run_name: r.data.tags.get("reused", r.info.status) for r in children}


def _progress_of(flow_run_id: str) -> dict[str, float]:
    """The progress artifacts of a Prefect flow run: what progressed -> percent (the UI's bars)."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
                type=ArtifactFilterType(any_=["progress"])))

    return {(a.description or "").split(":")[0]: float(a.data) for a in asyncio.run(read())}


@pytest.mark.slow
def test_rerun_finishes_a_failed_run_reusing_its_stages_and_resuming_training(tmp_path, tiny_models,
                                                                            prefect_harness, monkeypatch):
    path = write_tiny_pipeline(tmp_path, tiny_models)
    client = _client(tmp_path)
    import tasks.fusion_training as ft

    calls = {"n": 0}
    real = ft.clean_metrics

    def node_lost_at_step_3(metrics, *args, **kwargs):  # logged once per step; step 2's checkpoint exists
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("node lost")
        return real(metrics, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ft, "clean_metrics", node_lost_at_step_3)
        with pytest.raises(RuntimeError, match="node lost"):
            run_pipeline(path)
    failed = _pipeline_runs(client, "FAILED")[0]
    assert _stage_states(client, failed.info.run_id)["fusion_training"] == "FAILED"

    runner = CliRunner()
    res = runner.invoke(app, ["rerun", failed.info.run_id, str(path), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    states = _stage_states(client, summary["run_id"])
    assert states == {"prepare_data": "true", "align_vocabularies": "true", "teacher_inference": "true",
                      "fusion_training": "false", "evaluate": "false"}
    training = client.search_runs([failed.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}' "
                                                               "and tags.stage = 'fusion_training'")[0]
    assert training.data.metrics["resumed_from_step"] == 2 and training.data.metrics["steps"] == 4
    assert _progress_of(client.get_run(summary["run_id"]).data.tags["prefect_flow_run_id"]) == {
        "fusion_training (min_ce)": 100.0}
    assert client.get_run(summary["run_id"]).data.tags["rerun_of"] == failed.info.run_id
    assert client.get_run(failed.info.run_id).data.tags["rerun_by"] == summary["run_id"]

    # --from recomputes the stage it names and the ones after it, nothing upstream.
    res = runner.invoke(app, ["run", str(path), "--from", "teacher_inference", "--json"])
    assert res.exit_code == 0, res.output
    assert _stage_states(client, json.loads(res.stdout)["run_id"]) == {
        "prepare_data": "true", "align_vocabularies": "true", "teacher_inference": "false",
        "fusion_training": "false", "evaluate": "false"}

    # Bad input: a finished run, a stage run, an unknown id; each a one-line error, nothing run.
    before = len(_pipeline_runs(client))
    res = runner.invoke(app, ["rerun", summary["run_id"], str(path)])
    assert res.exit_code == 1 and "finished: nothing to rerun" in res.output
    stage_run = training.info.run_id
    res = runner.invoke(app, ["rerun", stage_run, str(path)])
    assert res.exit_code == 1 and f"is not a pipeline run; its pipeline run is {summary['run_id']}" in res.output
    res = runner.invoke(app, ["rerun", "0" * 32, str(path)])
    assert res.exit_code == 1 and "no MLflow run" in res.output
    assert len(_pipeline_runs(client)) == before

    # A run left marked RUNNING by a process that is gone (killed -9) is marked KILLED and rerun;
    # one whose process is alive is refused.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    tags = {k: v for k, v in failed.data.tags.items() if not k.startswith(("mlflow.", "rerun"))}
    config_text = open(client.download_artifacts(failed.info.run_id, "config/resolved.yaml", str(tmp_path))).read()
    orphan = client.create_run(failed.info.experiment_id, run_name="tiny-orphan",
                               tags={**tags, "host": socket.gethostname(), "pid": dead.stdout.strip()})
    client.log_text(orphan.info.run_id, config_text, "config/resolved.yaml")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = client.create_run(failed.info.experiment_id, run_name="tiny-busy",
                                 tags={**tags, "host": socket.gethostname(), "pid": str(alive.pid)})
        res = runner.invoke(app, ["rerun", busy.info.run_id, str(path)])
        assert res.exit_code == 1 and f"still running (pid {alive.pid}" in res.output
    finally:
        alive.kill()
    res = runner.invoke(app, ["rerun", orphan.info.run_id, str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(orphan.info.run_id).data.tags["interrupted"] == "true"
    assert set(_stage_states(client, json.loads(res.stdout)["run_id"]).values()) == {"true"}


def test_stage_retries_come_from_the_config(tmp_path, tiny_models):
    """orchestration.retries sets Prefect retries with exponential back-off on the stage's task, and
    an unknown stage name is a config error."""
    from fusion_core.config import ConfigError, load_config
    from tasks.prepare_data import prepare_data
    from tasks.stage import RunContext, _transient, with_retries
    from tasks.teacher_inference import teacher_inference

    path = write_tiny_pipeline(tmp_path, tiny_models, **{
        "orchestration.retries": {"teacher_inference": {"retries": 3, "delay_seconds": 5, "backoff": 2}}})
    cfg = load_config(path)
    ctx = RunContext(config=cfg, tracking=None, sources=(), target=None)
    retried = with_retries(teacher_inference, ctx, "teacher_inference")
    assert retried.retries == 3 and retried.retry_delay_seconds == [5.0, 10.0, 20.0]
    assert with_retries(prepare_data, ctx, "prepare_data") is prepare_data
    # Only unexpected errors are retried: the project's own (bad config, data, divergence) are not.
    from prefect.states import Failed

    from fusion_core.data import DataError
    from fusion_core.training import TrainingDiverged

    assert _transient(None, None, Failed(data=OSError("disk gone")))
    assert not _transient(None, None, Failed(data=DataError("corpus 'code' is empty")))
    assert not _transient(None, None, Failed(data=TrainingDiverged("loss is nan")))

    from fusion_core.config import STAGE_NAMES
    from tasks.stage import STAGES

    assert STAGES == STAGE_NAMES  # the config names the stages the pipeline has
    bad = write_tiny_pipeline(tmp_path / "bad", tiny_models, **{"orchestration.retries": {"teach": {"retries": 1}}})
    with pytest.raises(ConfigError, match=r"orchestration.retries: .*unknown stage\(s\) \['teach'\]"):
        load_config(bad)


def test_schedule_refuses_bad_input_before_creating_anything(tmp_path, tiny_models, monkeypatch):
    path = write_tiny_pipeline(tmp_path, tiny_models)
    runner = CliRunner()
    res = runner.invoke(app, ["schedule", str(path), "--cron", "61 * * * *"])
    assert res.exit_code == 1 and "--cron '61 * * * *': Invalid cron string" in res.output
    res = runner.invoke(app, ["schedule", str(path), "--cron", "0 3 * * *", "--interval", "60"])
    assert res.exit_code == 1 and "exactly one of --cron and --interval" in res.output
    res = runner.invoke(app, ["schedule", str(path), "--interval", "-5"])
    assert res.exit_code == 1 and "--interval must be a positive number" in res.output
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        res = runner.invoke(app, ["schedule", str(path), "--cron", "0 3 * * *"])
    assert res.exit_code == 1 and "scheduling needs a Prefect server" in res.output
    # A server that does not answer: named, nothing created.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        res = runner.invoke(app, ["schedule", str(path), "--cron", "0 3 * * *"])
    assert res.exit_code == 1 and "does not answer" in res.output
