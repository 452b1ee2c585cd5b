"""`fusion server`: a Prefect server and an MLflow tracking server per workspace (flows/servers.py).

Fast tests: bad input is refused before anything starts. Slow tests: real servers, the tiny
pipeline run against them by `fusion run` in a fresh process, on SQLite and on PostgreSQL.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import free_port
from servers_fixtures import (STAGES, create_role_and_databases, flow_run_and_task_runs, postgres_cluster,
                              served_pipeline, stage_of, start_and_run, stop_and_check)

from flows import servers
from flows.servers import (ServerProcess, ServerState, read_state, server_environment, server_status, start_servers,
                           state_path, stop_servers)
from fusion_core.errors import FusionError

assert served_pipeline  # a fixture, imported for the tests below


@pytest.fixture
def no_new_processes():
    """Fails the test if start_servers left a process of its own behind."""
    before = set(servers._started)
    yield
    assert set(servers._started) == before, "a server process was started"


def _listening_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("taken", ["prefect", "mlflow"])
def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, taken, no_new_processes):
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        ports = {"prefect_port": free_port(), "mlflow_port": free_port(), f"{taken}_port": port}
        with pytest.raises(FusionError, match=rf"port {port} .*wanted by the {taken} server.* in use"):
            start_servers(tmp_path / "ws", **ports)
    assert not (tmp_path / "ws").exists(), "nothing is written before the checks pass"


def test_an_unreachable_database_is_named_with_its_password_masked(tmp_path, no_new_processes):
    port = free_port()  # nothing listens there
    with pytest.raises(FusionError) as err:
        start_servers(tmp_path / "ws", prefect_port=free_port(), mlflow_port=free_port(),
                      database_url=f"postgresql://fusion:s3cr3t-pw@127.0.0.1:{port}/fusion")
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "fusion_prefect" in message
    assert "s3cr3t-pw" not in message and "fusion:***@" in message
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("url", ["sqlite:///x.db", "mysql://u:pw@localhost/db", "not a url"])
def test_a_database_url_that_is_not_postgresql_is_refused(tmp_path, url, no_new_processes):
    with pytest.raises(FusionError, match="PostgreSQL|does not parse") as err:
        start_servers(tmp_path / "ws", prefect_port=free_port(), mlflow_port=free_port(), database_url=url)
    assert "pw@" not in str(err.value)


def test_database_names_derive_from_the_url_path():
    assert servers.database_names("") == {"prefect": "prefect", "mlflow": "mlflow"}
    assert servers.database_names("ws1") == {"prefect": "ws1_prefect", "mlflow": "ws1_mlflow"}
    target, prefix = servers.DatabaseTarget.parse("postgresql://u:p%40ss@db.local/ws1")
    assert prefix == "ws1" and target.address == "db.local:5432"
    assert target.for_prefect("ws1_prefect") == "postgresql+asyncpg://u:p%40ss@db.local:5432/ws1_prefect"
    assert target.for_mlflow("ws1_mlflow") == "postgresql://u:p%40ss@db.local:5432/ws1_mlflow"
    assert target.masked("ws1") == "postgresql://u:***@db.local:5432/ws1"


def _fake_state(workspace: Path, pid: int, start_ticks: int | None) -> ServerState:
    """servers.json as start_servers writes it, both entries naming process `pid`."""
    def entry(name: str, port: int) -> ServerProcess:
        return ServerProcess(name=name, pid=pid, port=port, url=f"http://127.0.0.1:{port}",
                             log=str(workspace / "servers" / f"{name}.log"), start_ticks=start_ticks)

    state = ServerState(workspace=str(workspace), prefect=entry("prefect", free_port()),
                        mlflow=entry("mlflow", free_port()))
    state_path(workspace).parent.mkdir(parents=True)
    servers._write_state(state)
    return state


def test_a_second_start_is_refused_while_the_recorded_servers_run(tmp_path, no_new_processes):
    workspace = (tmp_path / "ws").resolve()
    # A stand-in for running servers: a live process group that answers no health check.
    stand_in = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        _fake_state(workspace, stand_in.pid, servers._start_ticks(stand_in.pid))
        recorded = state_path(workspace).read_text()
        with pytest.raises(FusionError, match=r"servers already run for workspace .*`fusion server stop`"):
            start_servers(workspace, prefect_port=free_port(), mlflow_port=free_port())
        assert state_path(workspace).read_text() == recorded
        status = server_status(workspace)
        assert status["prefect"]["state"] == status["mlflow"]["state"] == "unhealthy"
        assert server_environment(workspace) == {}, "servers that do not answer are not used"
        assert stop_servers(workspace, grace_s=5) == ["prefect"]  # one group, named by both entries
        assert stand_in.wait(timeout=10) == -signal.SIGTERM
        assert not state_path(workspace).exists()
    finally:
        stand_in.kill()
        stand_in.wait()


def test_stale_state_is_stopped_and_a_reused_pid_is_left_alone(tmp_path):
    workspace = (tmp_path / "ws").resolve()
    # A live process with another start time than recorded: a pid the system gave to another
    # process since the servers went away (a reboot, a crash).
    other = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        _fake_state(workspace, other.pid, (servers._start_ticks(other.pid) or 0) + 1)
        status = server_status(workspace)
        assert status["prefect"]["state"] == status["mlflow"]["state"] == "stopped"
        assert server_environment(workspace) == {}
        assert stop_servers(workspace, grace_s=1) == []
        assert other.poll() is None, "a process that is not the server was signalled"
        assert not state_path(workspace).exists()
        assert stop_servers(workspace) == [], "stopping nothing is no error"
    finally:
        other.kill()
        other.wait()


def test_a_server_that_exits_while_starting_stops_the_other(tmp_path, monkeypatch):
    workspace = (tmp_path / "ws").resolve()
    survivor = {}

    def prefect_command(ws, port, url):
        return [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ)

    def mlflow_command(ws, port, url):
        return [sys.executable, "-c", "import sys; print('backend store broken'); sys.exit(3)"], dict(os.environ)

    spawn = servers._spawn

    def recording_spawn(name, *args):
        server = spawn(name, *args)
        survivor.setdefault(name, server)
        return server

    monkeypatch.setattr(servers, "_prefect_command", prefect_command)
    monkeypatch.setattr(servers, "_mlflow_command", mlflow_command)
    monkeypatch.setattr(servers, "_spawn", recording_spawn)
    with pytest.raises(FusionError, match=r"(?s)mlflow server exited \(code 3\).*backend store broken"):
        start_servers(workspace, prefect_port=free_port(), mlflow_port=free_port(), timeout_s=60)
    assert not servers._group_members(survivor["prefect"].pid), "the prefect server was stopped"
    assert not state_path(workspace).exists()


@pytest.mark.slow
def test_start_status_stop(tmp_path, monkeypatch):
    workspace = (tmp_path / "ws").resolve()
    try:
        started = time.monotonic()
        state = start_servers(workspace, prefect_port=free_port(), mlflow_port=free_port())
        print(f"both servers answered after {time.monotonic() - started:.1f} s")
        recorded = json.loads(state_path(workspace).read_text())
        assert recorded["prefect"]["api_url"] == state.prefect_api_url == f"{state.prefect.url}/api"
        assert recorded["mlflow"]["url"] == state.mlflow.url and recorded["database_url"] is None
        status = server_status(workspace)
        assert status["prefect"]["state"] == status["mlflow"]["state"] == "running"
        assert (status["prefect"]["pid"], status["mlflow"]["pid"]) == (state.prefect.pid, state.mlflow.pid)
        assert server_environment(workspace) == {"PREFECT_API_URL": state.prefect_api_url,
                                                 "FUSION_TRACKING_URI": state.mlflow.url}
        # Every `fusion` command applies the defaults of its workspace: the servers' URLs among them.
        from flows.env import apply_defaults

        monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                            if k not in ("PREFECT_API_URL", "FUSION_TRACKING_URI")})
        apply_defaults(workspace)
        assert (os.environ.get("PREFECT_API_URL"), os.environ.get("FUSION_TRACKING_URI")) == (
            state.prefect_api_url, state.mlflow.url), "flows.env.apply_defaults does not call server_environment"
        monkeypatch.undo()
        # The workspace's own files: the databases the embedded mode uses too.
        assert (workspace / "prefect" / "prefect.db").is_file() and (workspace / "mlflow" / "mlflow.db").is_file()
        with pytest.raises(FusionError, match="already run"):
            start_servers(workspace, prefect_port=free_port(), mlflow_port=free_port())
        groups = {s.name: servers._group_members(s.pid) for s in (state.prefect, state.mlflow)}
        assert all(groups.values())
        assert sorted(stop_servers(workspace)) == ["mlflow", "prefect"]
        left = {name: servers._group_members(pgid) for name, pgid in
                (("prefect", state.prefect.pid), ("mlflow", state.mlflow.pid))}
        assert not any(left.values()), f"left after stop: {left}"
        assert not state_path(workspace).exists()
        assert server_status(workspace)["prefect"]["state"] == "stopped"
        assert read_state(workspace) is None
    finally:
        stop_servers(workspace)


def _check_stage_task_runs(api_url: str, flow_run_id: str) -> None:
    flow_run, task_runs = flow_run_and_task_runs(api_url, flow_run_id)
    assert flow_run.name and flow_run.state is not None and flow_run.state.is_completed()
    stage_runs = sorted(stage_of(t.name) for t in task_runs if stage_of(t.name) in STAGES)
    assert stage_runs == sorted(STAGES), f"task runs: {sorted(t.name for t in task_runs)}"
    assert all(t.state is not None and t.state.is_completed() for t in task_runs if stage_of(t.name) in STAGES)


@pytest.mark.slow
def test_the_pipeline_tracks_to_the_servers(served_pipeline):
    from mlflow import MlflowClient

    p = served_pipeline
    print(f"pipeline through the servers: {p.seconds:.0f} s")
    assert p.summary["tracking_uri"] == p.state.mlflow.url
    client = MlflowClient(tracking_uri=p.state.mlflow.url)
    parent = client.get_run(p.summary["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STAGES)
    # The experiment made by the embedded mode keeps its file:// location in the workspace; the
    # server lists what the pipeline wrote there.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location == (p.workspace / "mlflow" / "artifacts").as_uri()
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "config")] == ["config/resolved.yaml"]
    assert list((p.workspace / "mlflow" / "artifacts").rglob("config/resolved.yaml"))
    version = client.get_model_version(p.summary["registered_model"], p.summary["version"])
    assert version.run_id and version.aliases == ["candidate"]
    # The runs went through the server (the embedded mode writes the same SQLite file directly).
    assert "/api/2.0/mlflow/runs/create" in Path(p.state.mlflow.log).read_text()
    _check_stage_task_runs(p.state.prefect_api_url, p.flow_run_id)


@pytest.mark.slow
def test_the_servers_keep_their_state_in_postgresql(tmp_path, tiny_models):
    role, password = "fusion", "pg-s3cret"
    with postgres_cluster() as cluster:
        create_role_and_databases(cluster, role, password, ["prefect", "mlflow"])
        url = f"postgresql://{role}:{password}@{cluster.host}:{cluster.port}"
        workspace = tmp_path / "workspace"
        try:
            p = start_and_run(tmp_path, tiny_models, database_url=url)
            print(f"pipeline through the servers on PostgreSQL: {p.seconds:.0f} s")
            recorded = state_path(workspace).read_text()
            assert password not in recorded
            assert json.loads(recorded)["database_url"] == f"postgresql://{role}:***@127.0.0.1:{cluster.port}"
            assert server_status(workspace)["database_url"] == json.loads(recorded)["database_url"]
            assert password not in Path(p.state.prefect.log).read_text() + Path(p.state.mlflow.log).read_text()
            for server in (p.state.prefect, p.state.mlflow):  # `ps` shows command lines to every user
                for pid in servers._group_members(server.pid):
                    assert password not in Path(f"/proc/{pid}/cmdline").read_text(), f"{server.name}: {pid}"
            _check_stage_task_runs(p.state.prefect_api_url, p.flow_run_id)

            run_id = p.summary["run_id"]
            assert cluster.query("mlflow", "select status from runs where run_uuid = %s", (run_id,)) == [("FINISHED",)]
            stage_runs = cluster.query("mlflow", "select t.value from tags t join tags parent on "
                                       "t.run_uuid = parent.run_uuid where t.key = 'stage' and "
                                       "parent.key = 'mlflow.parentRunId' and parent.value = %s", (run_id,))
            assert sorted(r[0] for r in stage_runs) == sorted(STAGES)
            assert cluster.query("prefect", "select count(*) from flow_run where id = %s", (p.flow_run_id,)) == [(1,)]
            task_names = [r[0] for r in cluster.query("prefect", "select name from task_run where flow_run_id = %s",
                                                      (p.flow_run_id,))]
            assert sorted(stage_of(n) for n in task_names if stage_of(n) in STAGES) == sorted(STAGES)
            # Nothing went to the workspace's SQLite files.
            assert not (workspace / "prefect" / "prefect.db").exists()
            assert not (workspace / "mlflow" / "mlflow.db").exists()
            # A new experiment made through the server: artifacts proxied into the workspace.
            assert list((workspace / "mlflow" / "artifacts").rglob("config/resolved.yaml"))
        finally:
            stop_and_check(workspace)
