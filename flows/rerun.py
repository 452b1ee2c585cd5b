"""`fusion rerun RUN_ID`: finish a failed or interrupted pipeline run from where it stopped.

The rerun runs the exact config the original ran (its `config/resolved.yaml` artifact): completed
stages and teacher shards are reused by their fingerprints, and training resumes from its last
checkpoint. The runs are linked both ways (`rerun_of` / `rerun_by` tags).
"""
from __future__ import annotations

import os
from pathlib import Path

from flows.servers import process_alive
from fusion_core.errors import FusionError


def _alive_here(tags: dict) -> bool:
    """Whether the process that tagged the run (host, pid) is still running on this machine."""
    import socket

    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return False
    pid = int(tags["pid"])
    if pid == os.getpid() or not process_alive(pid):
        return False
    try:  # a pid reused by something else is not our pipeline
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"python" in cmdline or b"fusion" in cmdline


def _dead_here(tags: dict) -> bool:
    """Whether the run was tagged by a process of this machine (host, pid) that no longer runs;
    False for another machine's run (it cannot be checked from here) and this process's own."""
    import socket

    return (tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit()
            and int(tags["pid"]) != os.getpid() and not _alive_here(tags))


def _children(client, experiment_id: str, run_id: str) -> list:
    from mlflow.entities import ViewType

    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def mark_killed(client, run_id: str) -> list[str]:
    """Mark `run_id` and every run nested under it (recursively: stage runs, their evaluation
    runs) that is still RUNNING or SCHEDULED as KILLED, tagged interrupted. Returns their ids."""
    run = client.get_run(run_id)
    killed = []
    if run.info.status in ("RUNNING", "SCHEDULED"):
        client.set_tag(run_id, "interrupted", "true")
        client.set_terminated(run_id, "KILLED")
        killed.append(run_id)
    for child in _children(client, run.info.experiment_id, run_id):
        killed += mark_killed(client, child.info.run_id)
    return killed


def recover_dead_runs(client, experiment_id: str, config_fingerprint: str, log=None) -> list[str]:
    """Mark KILLED every pipeline run of `config_fingerprint` left RUNNING by a process of this
    machine that is gone (killed), with every run nested under it; `log(message)` names each.
    Returns the ids marked."""
    from mlflow.entities import ViewType

    runs = client.search_runs([experiment_id], f"tags.config_fingerprint = '{config_fingerprint}' and "
                                               "attributes.status = 'RUNNING'",
                              run_view_type=ViewType.ALL, max_results=1000)
    marked = []
    for run in runs:
        tags = run.data.tags
        if "stage" in tags or not _dead_here(tags):
            continue
        killed = mark_killed(client, run.info.run_id)
        marked += killed
        if log is not None and killed:
            log(f"run {run.info.run_id} ({run.info.run_name}) was left RUNNING by pid {tags['pid']} on "
                f"{tags['host']}, which is gone: marked KILLED with {len(killed) - 1} nested run(s)")
    return marked


def prepare_rerun(tracking_uri: str, run_id: str, configs_dir: Path) -> Path:
    """Check that `run_id` is a pipeline run that can be rerun and return its resolved config,
    written to `configs_dir`. A run left marked RUNNING by a process that no longer exists is
    marked KILLED first, with every run nested under it that it left RUNNING.

    Raises FusionError for a run that does not exist, is not a pipeline run, finished, or is
    still running.
    """
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fusion_core.redaction import mask_uri

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise FusionError(f"no MLflow run {run_id!r} at {mask_uri(tracking_uri)}") from None
    tags = run.data.tags
    if "stage" in tags or "config_fingerprint" not in tags:
        parent = tags.get("mlflow.parentRunId")
        raise FusionError(f"run {run_id} is not a pipeline run" + (f"; its pipeline run is {parent}" if parent else ""))
    status = run.info.status
    if status == "FINISHED":
        raise FusionError(f"run {run_id} finished: nothing to rerun (`fusion run CONFIG` reuses its stages; "
                          f"`--from STAGE` recomputes from a stage)")
    if status in ("RUNNING", "SCHEDULED") and _alive_here(tags):
        raise FusionError(f"run {run_id} is still running (pid {tags['pid']} on {tags['host']})")
    if not _alive_here(tags):  # also a FAILED or KILLED run's stage runs a kill left RUNNING
        mark_killed(client, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "config/resolved.yaml", tmp)
        except (MlflowException, OSError) as exc:
            raise FusionError(f"run {run_id} has no config/resolved.yaml artifact to rerun: {exc}") from None
        text = Path(local).read_text()
    configs_dir.mkdir(parents=True, exist_ok=True)
    path = configs_dir / f"rerun-{run_id}.yaml"
    path.write_text(text)
    return path
