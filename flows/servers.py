"""A Prefect server and an MLflow tracking server for one workspace, started in the background.

`fusion server start [CONFIG]` runs both on 127.0.0.1, each in its own process group, with
their logs in `<workspace>/servers/<name>.log` and their state in the workspace: by default the
same SQLite files that the embedded mode uses (`<workspace>/prefect/prefect.db`,
`<workspace>/mlflow/mlflow.db`), so runs tracked with and without the servers end up in one
place. `<workspace>/servers/servers.json`, written once both answer, says where they are;
`server_environment` turns it into PREFECT_API_URL and FUSION_TRACKING_URI for the pipeline.

With a PostgreSQL `database_url` both servers keep their state there instead, each in its own
database on that server: `postgresql://USER:PASSWORD@HOST:PORT` uses the databases `prefect`
and `mlflow`; `postgresql://USER:PASSWORD@HOST:PORT/NAME` uses `NAME_prefect` and `NAME_mlflow`
(several workspaces can then share one PostgreSQL server). Both databases must exist and be
owned by USER (Prefect's migrations create the `pg_trgm` extension in its database).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from fusion_core.errors import FusionError

PREFECT, MLFLOW = "prefect", "mlflow"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
DB_CONNECT_TIMEOUT_S = 5
STATE_FILE = "servers.json"
_HEALTH_PATH = {PREFECT: "/api/health", MLFLOW: "/health"}
# Processes started by this interpreter, so that stopping them also reaps them (a zombie child
# of ours would otherwise look alive).
_started: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServerProcess:
    name: str
    pid: int
    port: int
    url: str
    log: str
    # The process's start time in clock ticks since boot (Linux): a pid reused by another
    # process after a reboot or crash is not taken for the server.
    start_ticks: int | None = None

    @property
    def health_url(self) -> str:
        return self.url + _HEALTH_PATH[self.name]


@dataclass(frozen=True)
class ServerState:
    """What servers.json holds: both servers and the database they keep their state in."""
    workspace: str
    prefect: ServerProcess
    mlflow: ServerProcess
    database_url: str | None = None  # the password masked

    @property
    def prefect_api_url(self) -> str:
        return self.prefect.url + "/api"

    def to_json(self) -> dict:
        prefect = {**asdict(self.prefect), "api_url": self.prefect_api_url}
        return {"workspace": self.workspace, PREFECT: prefect, MLFLOW: asdict(self.mlflow),
                "database_url": self.database_url}

    @classmethod
    def from_json(cls, data: dict) -> "ServerState":
        def server(d: dict) -> ServerProcess:
            return ServerProcess(**{k: d[k] for k in ("name", "pid", "port", "url", "log")},
                                 start_ticks=d.get("start_ticks"))

        return cls(workspace=data["workspace"], prefect=server(data[PREFECT]), mlflow=server(data[MLFLOW]),
                   database_url=data.get("database_url"))


# ---------------------------------------------------------------------------------------------
# The database


@dataclass(frozen=True)
class DatabaseTarget:
    """The PostgreSQL server of a `database_url` and the database each server gets on it."""
    url: object  # sqlalchemy.engine.URL, without a database

    @classmethod
    def parse(cls, database_url: str) -> tuple["DatabaseTarget", str]:
        """(target, prefix of the database names); FusionError when it is no PostgreSQL URL."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(database_url)
        except ArgumentError:
            raise FusionError(f"database URL {mask_password(database_url)!r} does not parse: "
                              "give postgresql://USER:PASSWORD@HOST:PORT[/NAME]") from None
        if url.get_backend_name() not in ("postgresql", "postgres"):
            raise FusionError(f"database URL {mask_password(database_url)!r}: only PostgreSQL is supported "
                              "(postgresql://USER:PASSWORD@HOST:PORT[/NAME]); without one the servers use "
                              "the workspace's SQLite files")
        if not url.host:
            raise FusionError(f"database URL {mask_password(database_url)!r} names no host")
        return cls(url.set(drivername="postgresql", database=None, port=url.port or 5432)), url.database or ""

    @property
    def address(self) -> str:
        return f"{self.url.host}:{self.url.port}"

    def masked(self, database: str | None = None) -> str:
        return self.url.set(database=database).render_as_string(hide_password=True)

    def for_prefect(self, database: str) -> str:
        return self.url.set(drivername="postgresql+asyncpg", database=database).render_as_string(hide_password=False)

    def for_mlflow(self, database: str) -> str:
        # MLflow's SQLAlchemy store with psycopg2, the PostgreSQL driver it documents.
        return self.url.set(drivername="postgresql", database=database).render_as_string(hide_password=False)

    def check(self, database: str) -> None:
        """Connects to `database` with a short timeout; FusionError naming host:port (password
        masked) and the driver's reason when that fails."""
        try:
            import psycopg2
        except ImportError:
            raise FusionError("a PostgreSQL database URL needs psycopg2: pip install psycopg2-binary") from None
        try:
            psycopg2.connect(host=self.url.host, port=self.url.port, user=self.url.username,
                             password=self.url.password, dbname=database,
                             connect_timeout=DB_CONNECT_TIMEOUT_S).close()
        except psycopg2.Error as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if self.url.password:
                reason = reason.replace(str(self.url.password), "***")
            raise FusionError(f"cannot use database {database!r} on the PostgreSQL server at {self.address} "
                              f"({self.masked(database)}): {reason}") from None


def database_names(prefix: str) -> dict[str, str]:
    """The database of each server for a database URL whose path is `prefix` (may be empty)."""
    return {name: f"{prefix}_{name}" if prefix else name for name in (PREFECT, MLFLOW)}


def mask_password(url: str) -> str:
    """`url` with its password replaced by ***; unparsable text is returned cut at the '@'."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else url


# ---------------------------------------------------------------------------------------------
# Processes


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # the name may hold spaces and parentheses


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` runs (a zombie does not), and is the one started at `start_ticks`."""
    proc = _started.get(pid)
    if proc is not None and proc.poll() is not None:
        return False
    if not Path("/proc").is_dir():  # not Linux: no start time to compare
        from fusion_core.workspace import pid_alive

        return pid_alive(pid)
    fields = _proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _owns_group(server: ServerProcess) -> bool:
    """Whether the process group led by the server's pid is still the server's: its leader runs
    with the recorded start time, or the leader is gone and only its workers are left (a pid is
    not handed out again while it names a live process group)."""
    if process_alive(server.pid, server.start_ticks):
        return True
    return _proc_stat(server.pid) is None or server.pid in _started


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stop_process(server: ServerProcess, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM to the server's process group, SIGKILL to what is left after `grace_s`. Returns
    whether anything of it was running."""
    if not _owns_group(server) or not _group_members(server.pid):
        _reap(server.pid)
        return False
    _signal_group(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(server.pid)
        if not _group_members(server.pid):
            break
        time.sleep(0.2)
    else:
        _signal_group(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _group_members(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    proc = _started.pop(server.pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return True


def _reap(pid: int) -> None:
    proc = _started.get(pid)
    if proc is not None and proc.poll() is not None:
        _started.pop(pid, None)


def _answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    # SO_REUSEADDR, as the servers bind: a port held only by TIME_WAIT connections is free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# The servers' commands and environments

# Settings of the caller's environment that would point a server at another database or API.
_INHERITED_PREFIXES = ("PREFECT_API_DATABASE_", "PREFECT_SERVER_DATABASE_")
_INHERITED = ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL", "MLFLOW_TRACKING_URI",
              "FUSION_TRACKING_URI",
              "MLFLOW_BACKEND_STORE_URI", "MLFLOW_REGISTRY_STORE_URI", "MLFLOW_READ_REPLICA_BACKEND_STORE_URI",
              "MLFLOW_DEFAULT_ARTIFACT_ROOT", "MLFLOW_ARTIFACTS_ONLY", "MLFLOW_WORKSPACE_STORE_URI")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED and not k.startswith(_INHERITED_PREFIXES)}
    env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return env


def _prefect_command(workspace: Path, port: int, database_url: str | None) -> tuple[list[str], dict[str, str]]:
    home = workspace / "prefect"
    env = {**_base_env(),
           "PREFECT_HOME": str(home),  # its SQLite database is the one the embedded mode uses
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "true",
           "PREFECT_SERVER_UI_API_URL": f"http://{HOST}:{port}/api",
           # The UI's files are copied at start-up: into the workspace, not the installed package.
           "PREFECT_SERVER_UI_STATIC_DIRECTORY": str(home / "ui"),
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           # A fresh database is migrated before the server answers (slow on a busy machine).
           "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
           "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30"}
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)], env


def _mlflow_command(workspace: Path, port: int, database_url: str | None) -> tuple[list[str], dict[str, str]]:
    root = workspace / "mlflow"
    store = database_url or f"sqlite:///{root / 'mlflow.db'}"
    # Experiments made by the embedded mode keep their file:// location (<workspace>/mlflow/
    # artifacts: the client writes there itself, the server reads it for the UI); experiments
    # created through the server get mlflow-artifacts:/<id>, proxied into <that folder>/<id>.
    command = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", (root / "artifacts").as_uri(),
               "--host", HOST, "--port", str(port), "--workers", "1"]
    # The store (maybe holding a password) goes in the environment, not in the command line
    # that `ps` shows everyone. No background job runner: seven more workers the pipeline does
    # not use.
    return command, {**_base_env(), "MLFLOW_BACKEND_STORE_URI": store, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _spawn(name: str, command: list[str], env: dict[str, str], port: int, workspace: Path) -> ServerProcess:
    log = workspace / "servers" / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workspace, env=env, start_new_session=True)
    _started[proc.pid] = proc
    return ServerProcess(name=name, pid=proc.pid, port=port, url=f"http://{HOST}:{port}", log=str(log),
                         start_ticks=_start_ticks(proc.pid))


# ---------------------------------------------------------------------------------------------
# The state file


def state_path(workspace: Path) -> Path:
    return Path(workspace) / "servers" / STATE_FILE


def read_state(workspace: Path) -> ServerState | None:
    """The servers recorded for `workspace`, or None when there is no (readable) servers.json."""
    path = state_path(workspace)
    try:
        return ServerState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a foreign or damaged file: treated as no servers, replaced by the next start


def _write_state(state: ServerState) -> None:
    path = state_path(Path(state.workspace))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The API


def start_servers(workspace: Path, *, prefect_port: int = 4200, mlflow_port: int = 5000,
                  database_url: str | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> ServerState:
    """Starts the Prefect server and the MLflow tracking server of `workspace` on 127.0.0.1 and
    waits until both answer their health endpoints; then writes servers.json. Returns their state.

    Raises FusionError before anything starts when a port is taken, servers already run for this
    workspace, or `database_url` (see the module docstring) cannot be reached; and, with the
    tail of its log, when a server exits or does not answer within `timeout_s` (the other one is
    stopped then, and no servers.json is written)."""
    workspace = Path(workspace).resolve()
    running = read_state(workspace)
    if running is not None and any(process_alive(s.pid, s.start_ticks) for s in (running.prefect, running.mlflow)):
        raise FusionError(f"servers already run for workspace {workspace} (Prefect at {running.prefect.url}, "
                          f"MLflow at {running.mlflow.url}): `fusion server stop` first")
    if prefect_port == mlflow_port:
        raise FusionError(f"the Prefect and the MLflow server cannot share port {prefect_port}")
    for name, port in ((PREFECT, prefect_port), (MLFLOW, mlflow_port)):
        if not _port_free(port):
            raise FusionError(f"port {port} on {HOST}, wanted by the {name} server, is already in use: "
                              f"stop what listens there or choose another port")
    urls: dict[str, str | None] = {PREFECT: None, MLFLOW: None}
    masked = None
    if database_url:
        target, prefix = DatabaseTarget.parse(database_url)
        names = database_names(prefix)
        for name in (PREFECT, MLFLOW):
            target.check(names[name])
        urls = {PREFECT: target.for_prefect(names[PREFECT]), MLFLOW: target.for_mlflow(names[MLFLOW])}
        masked = target.masked(prefix or None)

    for folder in ("servers", "prefect", "mlflow/artifacts"):
        (workspace / folder).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        state_path(workspace).unlink()  # a stale file of servers that are gone
    started: list[ServerProcess] = []
    try:
        started.append(_spawn(PREFECT, *_prefect_command(workspace, prefect_port, urls[PREFECT]),
                              prefect_port, workspace))
        started.append(_spawn(MLFLOW, *_mlflow_command(workspace, mlflow_port, urls[MLFLOW]),
                              mlflow_port, workspace))
        _wait_healthy(started, timeout_s)
        state = ServerState(workspace=str(workspace), prefect=started[0], mlflow=started[1], database_url=masked)
        _write_state(state)
        return state
    except BaseException:
        for server in started:
            _stop_process(server)
        raise


def _wait_healthy(servers: list[ServerProcess], timeout_s: float) -> None:
    waiting = list(servers)
    deadline = time.monotonic() + timeout_s
    while waiting:
        for server in list(waiting):
            if _answers(server.health_url):
                waiting.remove(server)
            elif not process_alive(server.pid):
                code = _started[server.pid].returncode if server.pid in _started else "?"
                raise FusionError(f"the {server.name} server exited (code {code}) while starting (its log: "
                                  f"{server.log})\n{_log_tail(Path(server.log))}")
        if waiting and time.monotonic() > deadline:
            server = waiting[0]
            raise FusionError(f"the {server.name} server did not answer {server.health_url} within "
                              f"{timeout_s:.0f} s (its log: {server.log})\n{_log_tail(Path(server.log))}")
        if waiting:
            time.sleep(0.5)


def _describe(server: ServerProcess | None) -> dict:
    if server is None:
        return {"state": "stopped", "url": None, "pid": None, "port": None}
    if not process_alive(server.pid, server.start_ticks):
        state = "stopped"
    else:
        state = "running" if _answers(server.health_url) else "unhealthy"
    return {"state": state, "url": server.url, "pid": server.pid, "port": server.port, "log": server.log}


def server_status(workspace: Path) -> dict:
    """{"prefect": {state, url, pid, port, log, api_url}, "mlflow": {...}, "database_url": masked
    or None, "state_file": path or None}; state is running (answers its health endpoint),
    unhealthy (its process runs but does not answer) or stopped."""
    state = read_state(Path(workspace).resolve())
    prefect = _describe(state.prefect if state else None)
    prefect["api_url"] = state.prefect_api_url if state else None
    return {PREFECT: prefect, MLFLOW: _describe(state.mlflow if state else None),
            "database_url": state.database_url if state else None,
            "state_file": str(state_path(Path(workspace).resolve())) if state else None}


def stop_servers(workspace: Path, grace_s: float = STOP_GRACE_S) -> list[str]:
    """Stops the workspace's servers (SIGTERM to each process group, SIGKILL after `grace_s`) and
    removes servers.json. Returns the names of the servers that were running (none: [])."""
    workspace = Path(workspace).resolve()
    state = read_state(workspace)
    stopped = []
    if state is not None:
        for server in (state.prefect, state.mlflow):
            if _stop_process(server, grace_s):
                stopped.append(server.name)
    with contextlib.suppress(FileNotFoundError):
        state_path(workspace).unlink()
    return stopped


def server_environment(workspace: Path) -> dict[str, str]:
    """{"PREFECT_API_URL", "FUSION_TRACKING_URI"} of the workspace's servers when both run and
    answer; {} otherwise (no servers.json, or servers that are down: the embedded mode then)."""
    state = read_state(Path(workspace).resolve())
    if state is None:
        return {}
    for server in (state.prefect, state.mlflow):
        if not (process_alive(server.pid, server.start_ticks) and _answers(server.health_url)):
            return {}
    return {"PREFECT_API_URL": state.prefect_api_url, "FUSION_TRACKING_URI": state.mlflow.url}
