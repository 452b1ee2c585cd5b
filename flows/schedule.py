"""Scheduled pipelines: Prefect deployments of the fusion pipeline, run by `fusion serve` or by a
Prefect worker of a work pool.

`fusion schedule CONFIG --cron "0 3 * * *"` (or `--interval SECONDS`) registers a deployment of
`fusion_pipeline` with the Prefect server, its parameter the resolved config kept in the
workspace, and the tag `llm-fusion`. Without `--work-pool` the deployment is served: a running
`fusion serve` executes its scheduled runs. With `--work-pool` a worker of that pool does
(`prefect worker start --pool POOL`). A scheduled run whose inputs did not change reuses every
stage and finishes in seconds.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from fusion_core.errors import FusionError

TAG = "llm-fusion"
FLOW_NAME = "fusion_pipeline"


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str | None = None
    interval_seconds: float | None = None
    timezone: str | None = None

    def prefect_schedule(self):
        """The Prefect schedule object; FusionError naming the option when it does not parse."""
        from pydantic import ValidationError
        from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

        if (self.cron is None) == (self.interval_seconds is None):
            raise FusionError("give exactly one of --cron and --interval")
        try:
            if self.cron is not None:
                return CronSchedule(cron=self.cron, timezone=self.timezone)
            if not self.interval_seconds or self.interval_seconds <= 0:
                raise FusionError(f"--interval must be a positive number of seconds, got {self.interval_seconds}")
            return IntervalSchedule(interval=dt.timedelta(seconds=self.interval_seconds), timezone=self.timezone)
        except ValidationError as exc:
            msg = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            option = "--cron" if self.cron is not None else "--interval"
            raise FusionError(f"{option} {self.cron or self.interval_seconds!r}: {msg}") from None


def require_server() -> str:
    """The Prefect API URL; FusionError when none is configured (a schedule needs a server that
    outlives this command)."""
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise FusionError("scheduling needs a Prefect server: start one with `fusion server start` "
                          "(or set PREFECT_API_URL)")
    return url


def _check_reachable(url: str) -> None:
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise FusionError(f"the Prefect server at {url} does not answer ({type(exc).__name__}); "
                          f"`fusion server status` says whether it runs") from None


def create_schedule(config_path: Path, name: str, spec: ScheduleSpec, *, work_pool: str | None = None) -> dict:
    """Register (or update) deployment `fusion_pipeline/<name>` running the resolved config at
    `config_path` on `spec`. Everything is checked before the one API call that creates it.
    Returns {id, name, schedule, work_pool}."""
    from flows.pipeline import fusion_pipeline

    schedule = spec.prefect_schedule()
    url = require_server()
    _check_reachable(url)
    if work_pool is not None:
        _check_work_pool(work_pool)
    deployment = fusion_pipeline.to_deployment(
        name=name, schedules=[schedule], parameters={"config_path": str(Path(config_path).resolve())},
        tags=[TAG], description=f"fusion pipeline {config_path}", work_pool_name=work_pool)
    if work_pool is not None:
        deployment_id = deployment.apply(work_pool_name=work_pool)
    else:
        deployment_id = deployment.apply()
    return {"id": str(deployment_id), "name": f"{FLOW_NAME}/{name}", "schedule": describe(schedule),
            "work_pool": work_pool}


def _check_work_pool(name: str) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async def read():
        async with get_client() as client:
            await client.read_work_pool(name)

    try:
        asyncio.run(read())
    except ObjectNotFound:
        raise FusionError(f"no work pool {name!r}: create it with `prefect work-pool create {name} --type process`, "
                          f"then start a worker: `prefect worker start --pool {name}`") from None


def describe(schedule) -> str:
    if getattr(schedule, "cron", None):
        return f"cron {schedule.cron}" + (f" ({schedule.timezone})" if schedule.timezone else "")
    seconds = schedule.interval.total_seconds()
    return f"every {seconds:g} s"


async def _deployments(client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    return await client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])))


def list_schedules() -> list[dict]:
    """Every fusion deployment on the server: name, schedules, config, who runs it, next run."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    require_server()

    async def read():
        rows = []
        async with get_client() as client:
            for d in await _deployments(client):
                upcoming = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
                rows.append({"name": f"{FLOW_NAME}/{d.name}", "id": str(d.id),
                             "schedules": [describe(s.schedule) for s in d.schedules],
                             "active": bool(d.schedules) and not d.paused,
                             "config": (d.parameters or {}).get("config_path"),
                             "runs_on": f"work pool {d.work_pool_name}" if d.work_pool_name else "fusion serve",
                             "next_run": upcoming[0].expected_start_time.isoformat() if upcoming else None})
        return rows

    return asyncio.run(read())


def serve_schedules(limit: int | None = None) -> None:
    """Serve every fusion deployment that has no work pool: execute its scheduled runs until
    interrupted. Raises FusionError when there is none."""
    import asyncio

    from prefect import serve
    from prefect.client.orchestration import get_client

    from flows.pipeline import fusion_pipeline

    require_server()

    async def read():
        async with get_client() as client:
            return [d for d in await _deployments(client) if not d.work_pool_name]

    found = asyncio.run(read())
    if not found:
        raise FusionError("no schedule to serve: create one with `fusion schedule CONFIG --cron ...`")
    deployments = [fusion_pipeline.to_deployment(name=d.name, schedules=[s.schedule for s in d.schedules],
                                                 parameters=d.parameters, tags=d.tags, description=d.description)
                   for d in found]
    serve(*deployments, limit=limit, pause_on_shutdown=False)
