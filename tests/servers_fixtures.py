"""Shared by test_servers.py and test_prefect_ui.py: the tiny pipeline run by `fusion run` in a
fresh process against a workspace's `fusion server` (Prefect + MLflow), and a throwaway
PostgreSQL cluster.

Import the fixtures into a test module (`from servers_fixtures import served_pipeline`); the
servers and the pipeline run are made once per session however many modules use them.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from browser import REPO_ROOT, free_port
from conftest import write_tiny_pipeline

STAGES = ("prepare_data", "align_vocabularies", "teacher_inference", "fusion_training", "evaluate")
PIPELINE_TIMEOUT_S = 900
TASK_RUNS_TIMEOUT_S = 60


@dataclass(frozen=True)
class ServedPipeline:
    """One run of the tiny pipeline through the workspace's servers."""
    workspace: Path
    state: object  # flows.servers.ServerState
    summary: dict  # `fusion run --json`
    flow_run_id: str
    seconds: float


def run_pipeline_cli(config: Path, server_env: dict[str, str]) -> dict:
    """`fusion run CONFIG --json` in a new process with `server_env` (PREFECT_API_URL,
    FUSION_TRACKING_URI) set; returns the summary. The package is taken from this checkout."""
    fusion = Path(sys.executable).parent / "fusion"
    env = {**os.environ, **server_env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([str(fusion), "run", str(config), "--json"], env=env, cwd=config.parent,
                              capture_output=True, text=True, timeout=PIPELINE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`fusion run` did not finish within {PIPELINE_TIMEOUT_S} s:\n"
                             f"{(exc.stderr or '')[-4000:]}") from None
    assert done.returncode == 0, f"`fusion run` failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(done.stdout)


def flow_run_and_task_runs(api_url: str, flow_run_id: str, timeout_s: float = TASK_RUNS_TIMEOUT_S):
    """The flow run and its task runs, read through Prefect's client from the server at
    `api_url`. Task runs reach the server as events, recorded a moment after the flow ends: waits
    (bounded) until one of each stage is there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == api_url.rstrip("/")
            flow_run = client.read_flow_run(flow_run_id)
            while True:
                task_runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
                if set(STAGES) <= {stage_of(t.name) for t in task_runs} or time.monotonic() > deadline:
                    return flow_run, task_runs
                time.sleep(1)


def stage_of(task_run_name: str) -> str:
    """`prepare_data-a1b` -> `prepare_data`: Prefect suffixes task run names."""
    return task_run_name.rsplit("-", 1)[0]


def start_and_run(workspace_root: Path, tiny_models: dict[str, Path], *,
                  database_url: str | None = None) -> ServedPipeline:
    """Starts the servers of the tiny pipeline's workspace on free ports, then runs the pipeline
    against them. The caller stops the servers (also when this raises: they may be running)."""
    from flows.servers import server_environment, start_servers

    config = write_tiny_pipeline(workspace_root, tiny_models)
    workspace = workspace_root / "workspace"
    state = start_servers(workspace, prefect_port=free_port(), mlflow_port=free_port(), database_url=database_url)
    env = server_environment(workspace)
    assert env == {"PREFECT_API_URL": state.prefect_api_url, "FUSION_TRACKING_URI": state.mlflow.url}
    start = time.monotonic()
    summary = run_pipeline_cli(config, env)
    seconds = time.monotonic() - start
    assert summary["tracking_uri"] == state.mlflow.url, (
        f"the pipeline tracked to {summary['tracking_uri']}, not to the MLflow server: "
        "tasks.tracking.tracking_uri must prefer $FUSION_TRACKING_URI when the config names none")
    from mlflow import MlflowClient

    parent = MlflowClient(tracking_uri=state.mlflow.url).get_run(summary["run_id"])
    return ServedPipeline(workspace=workspace, state=state, summary=summary,
                          flow_run_id=parent.data.tags["prefect_flow_run_id"], seconds=seconds)


def stop_and_check(workspace: Path) -> None:
    """Stops the workspace's servers; fails if any of their processes is left."""
    from flows.servers import _group_members, read_state, stop_servers

    state = read_state(workspace)
    stop_servers(workspace)
    if state is not None:
        left = {s.name: _group_members(s.pid) for s in (state.prefect, state.mlflow)}
        assert not any(left.values()), f"server processes left after stop: {left}"


_shared: dict[str, ServedPipeline] = {}


@pytest.fixture(scope="session")
def served_pipeline(tmp_path_factory, tiny_models) -> Iterator[ServedPipeline]:
    """The tiny pipeline run through servers on SQLite (the workspace's files), whose "tiny"
    experiment was made before by the embedded mode (a file:// artifact location in the
    workspace). The servers run until the session ends."""
    if "sqlite" in _shared:  # the fixture imported into a second module: same servers, same run
        yield _shared["sqlite"]
        return
    root = tmp_path_factory.mktemp("served-pipeline")
    workspace = root / "workspace"
    _embedded_experiment(workspace, "tiny")
    try:
        _shared["sqlite"] = start_and_run(root, tiny_models)
        yield _shared["sqlite"]
    finally:
        _shared.pop("sqlite", None)
        stop_and_check(workspace)


def _embedded_experiment(workspace: Path, name: str) -> None:
    """What `fusion run` without servers leaves: the experiment in the workspace's SQLite store,
    its artifact location the workspace's artifact folder as a file:// URI."""
    from mlflow import MlflowClient

    db = workspace / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    MlflowClient(tracking_uri=f"sqlite:///{db}").create_experiment(
        name, artifact_location=(workspace / "mlflow" / "artifacts").as_uri())


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl; fails the test,
    naming the install step, without one. Not a skip: CI must run the PostgreSQL test."""
    found = sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")
                    if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        pytest.fail("no PostgreSQL server (initdb, pg_ctl under /usr/lib/postgresql/*/bin): run "
                    "`make system-deps` (as root: apt-get install postgresql)", pytrace=False)
    return found[-1]


@dataclass(frozen=True)
class PostgresCluster:
    host: str
    port: int
    superuser_socket: str  # connect as `postgres` over this socket (trust)

    def connect(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None):
        import psycopg2

        if password is None:
            return psycopg2.connect(host=self.superuser_socket, port=self.port, user=user, dbname=dbname,
                                    connect_timeout=5)
        return psycopg2.connect(host=self.host, port=self.port, user=user, password=password, dbname=dbname,
                                connect_timeout=5)

    def query(self, dbname: str, sql: str, args: tuple = ()) -> list[tuple]:
        with contextlib.closing(self.connect(dbname)) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()


def _as_postgres(*command: str, timeout: float = 120) -> None:
    # initdb and postgres refuse to run as root.
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    done = subprocess.run(prefix + list(command), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{Path(command[0]).name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A new PostgreSQL cluster on a free port of 127.0.0.1 (password logins over TCP, trust
    over its own unix socket), stopped and deleted when the block ends."""
    bin_dir = postgres_bin()
    # Not under pytest's tmp_path: its folders are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="fusion-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    started = False
    try:
        _as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                     "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = True
        _as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "postgres.log"),
                     "-w", "-t", "60", "start")
        yield PostgresCluster(host="127.0.0.1", port=port, superuser_socket=str(root))
    finally:
        if started:
            with contextlib.suppress(Exception):
                _as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(root, ignore_errors=True)


def create_role_and_databases(cluster: PostgresCluster, role: str, password: str, databases: list[str]) -> None:
    import psycopg2.extensions
    from psycopg2 import sql

    with contextlib.closing(cluster.connect()) as conn:
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)  # CREATE DATABASE
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), (password,))
            for db in databases:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(role)))
