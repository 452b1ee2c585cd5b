"""Runs a kill left RUNNING: `fusion rerun` and a new `fusion run` mark every one of a dead pipeline
process KILLED, its nested stage and evaluation runs included; a live process's runs are left alone."""
import socket
import subprocess
import sys

import pytest

from flows.rerun import mark_killed, prepare_rerun, recover_dead_runs
from fusion_core.errors import FusionError


def _dead_pid() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, experiment


def _killed_pipeline(client, experiment, pid: str, fingerprint: str = "fp1", host: str | None = None) -> dict:
    """A pipeline run as a SIGKILL leaves it: the parent, two stage runs (one finished, one
    running) and an evaluation run nested in the running one, all RUNNING but the finished stage."""
    tags = {"pipeline": "tiny", "config_fingerprint": fingerprint, "host": host or socket.gethostname(), "pid": pid}
    parent = client.create_run(experiment, run_name="tiny-killed", tags=tags).info.run_id
    child = {"mlflow.parentRunId": parent}
    done = client.create_run(experiment, run_name="prepare_data", tags={**child, "stage": "prepare_data"}).info.run_id
    client.set_terminated(done, "FINISHED")
    stage = client.create_run(experiment, run_name="evaluate", tags={**child, "stage": "evaluate"}).info.run_id
    evaluation = client.create_run(experiment, run_name="eval target",
                                   tags={"mlflow.parentRunId": stage, "model_label": "target"}).info.run_id
    return {"parent": parent, "done": done, "stage": stage, "eval": evaluation}


def _status(client, runs: dict) -> dict:
    return {name: client.get_run(run_id).info.status for name, run_id in runs.items()}


def test_a_new_run_of_the_config_marks_a_dead_processes_runs_killed_nested_included(store):
    uri, client, experiment = store
    dead = _killed_pipeline(client, experiment, _dead_pid())
    other_config = _killed_pipeline(client, experiment, _dead_pid(), fingerprint="fp2")
    other_host = _killed_pipeline(client, experiment, _dead_pid(), host="another-host.example")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = _killed_pipeline(client, experiment, str(alive.pid))
        lines = []
        marked = recover_dead_runs(client, experiment, "fp1", lines.append)
        assert sorted(marked) == sorted([dead["parent"], dead["stage"], dead["eval"]])
        assert _status(client, dead) == {"parent": "KILLED", "done": "FINISHED", "stage": "KILLED", "eval": "KILLED"}
        assert client.get_run(dead["eval"]).data.tags["interrupted"] == "true"
        assert lines == [f"run {dead['parent']} (tiny-killed) was left RUNNING by pid "
                         f"{client.get_run(dead['parent']).data.tags['pid']} on {socket.gethostname()}, which is "
                         f"gone: marked KILLED with 2 nested run(s)"]
        # Another config's runs, another machine's (not checkable here), a live process's: untouched.
        for runs in (other_config, other_host, running):
            assert _status(client, runs) == {"parent": "RUNNING", "done": "FINISHED", "stage": "RUNNING",
                                             "eval": "RUNNING"}
        assert recover_dead_runs(client, experiment, "fp1") == []  # nothing left to mark
    finally:
        alive.kill()
        alive.wait()


def test_rerun_marks_the_killed_run_and_all_its_nested_runs(store, tmp_path):
    uri, client, experiment = store
    dead = _killed_pipeline(client, experiment, _dead_pid())
    client.log_text(dead["parent"], "name: tiny\n", "config/resolved.yaml")
    path = prepare_rerun(uri, dead["parent"], tmp_path / "configs")
    assert path.read_text() == "name: tiny\n"
    assert _status(client, dead) == {"parent": "KILLED", "done": "FINISHED", "stage": "KILLED", "eval": "KILLED"}
    assert client.get_run(dead["parent"]).data.tags["interrupted"] == "true"

    # A run that already FAILED but whose stage runs a kill left RUNNING (the process died while
    # marking): its nested runs are marked as well.
    failed = _killed_pipeline(client, experiment, _dead_pid())
    client.log_text(failed["parent"], "name: tiny\n", "config/resolved.yaml")
    client.set_terminated(failed["parent"], "FAILED")
    prepare_rerun(uri, failed["parent"], tmp_path / "configs")
    assert _status(client, failed) == {"parent": "FAILED", "done": "FINISHED", "stage": "KILLED", "eval": "KILLED"}


def test_rerun_of_a_live_run_changes_nothing(store, tmp_path):
    uri, client, experiment = store
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = _killed_pipeline(client, experiment, str(alive.pid))
        with pytest.raises(FusionError, match=f"still running \\(pid {alive.pid}"):
            prepare_rerun(uri, running["parent"], tmp_path / "configs")
        assert set(_status(client, running).values()) == {"RUNNING", "FINISHED"}
    finally:
        alive.kill()
        alive.wait()
    assert mark_killed(client, running["stage"]) == [running["stage"], running["eval"]]
