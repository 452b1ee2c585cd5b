"""What every stage task shares: its context, the reuse-or-build rule, and its MLflow run."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fusion_core.config import PipelineConfig
from fusion_core.workspace import StageOutput, fingerprint
from tasks.tracking import TrackingContext, clean_metrics, log_dict_artifact, safe_params, stage_run

# Bump a stage's version when its output format or meaning changes: old outputs are then
# not reused (the version is part of the stage fingerprint).
STAGE_VERSIONS = {
    "prepare_data": 3,  # 2: a test split (test.jsonl), held-out corpora; 3: corpus contents in the key
    "align_vocabularies": 2,  # 2: labelled positions, marginalisation, report; the map rules have their own version
    "teacher_inference": 4,  # 2: marginal positions, label column; 3: shards with sidecars, token_ce; 4: nll_per_byte
    "fusion_training": 2,  # 2: per-byte scores, temperature once, feedback on the gate, exact-position objective
    "evaluate": 3,  # 2: evaluation.json per model (cached units), report, references; 3: items.jsonl, split
}
STAGES = tuple(STAGE_VERSIONS)


@dataclass(frozen=True)
class ResolvedModel:
    """A source or the target, resolved to a local HF folder and a content key."""

    name: str
    role: str  # "source" | "target"
    path: Path
    key: str


@dataclass(frozen=True)
class RunContext:
    config: PipelineConfig
    tracking: TrackingContext
    sources: tuple[ResolvedModel, ...]
    target: ResolvedModel
    force_stages: frozenset[str] = frozenset()
    config_fingerprint: str = ""


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    path: Path
    reused: bool
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def stage_key(stage: str, section: Any, *inputs: Any) -> str:
    return fingerprint(stage, STAGE_VERSIONS[stage], section, *inputs)


def run_stage(ctx: RunContext, stage: str, key: str, section: Any, build: Callable[[Path, dict], dict[str, float]],
              logger, after: Callable[[StageResult], None] | None = None, tags: dict[str, str] | None = None,
              run_name: str | None = None, cleanup: Callable[[], None] | None = None,
              lock_name: str = "") -> StageResult:
    """Reuse the stage's complete output for `key`, or build it; log either way in a nested run.

    build(tmp_dir, meta) writes the outputs into tmp_dir and returns metrics; it may add to
    meta (kept in the manifest). A build holds the key's lock (StageOutput.claim): another run
    building the same key waits for it, then reuses its output. `cleanup()` runs after a
    successful build, still holding the lock (it may remove the build's work folders).
    `lock_name` (default: the key) lets builds that must run at once share a key (the nodes of
    one multi-node training). `after(result)` runs inside the stage's MLflow run.
    """
    out = StageOutput(ctx.config.workspace.root, stage, key, lock_name)
    forced = stage in ctx.force_stages
    with stage_run(ctx.tracking, stage, tags={"stage_key": key, **(tags or {})}, run_name=run_name) as run:
        import mlflow

        mlflow.log_params(safe_params({stage: section}) if section is not None else {})
        start = time.perf_counter()

        def reuse(note: str = "") -> StageResult:
            meta = out.meta
            logger.info(f"{stage}: reusing completed output {key} ({out.path}){note}")
            mlflow.set_tags({"reused": "true", "reused_from_run": meta.get("mlflow_run_id", "")})
            return StageResult(stage, key, out.path, True, meta.get("metrics", {}), time.perf_counter() - start)

        if out.complete() and not forced:
            result = reuse()
        else:
            asked = time.time()
            wait_note = (lambda owner: logger.info(f"waiting for {stage} {key}: another run ({owner}) is building it"))
            with out.claim(on_wait=wait_note) as waited:
                # Another run may have completed it meanwhile: reuse that, even when forced (it
                # was computed after this run asked for it).
                if out.complete() and (not forced or out.manifest().get("completed_at", 0) >= asked):
                    result = reuse(", completed by another run" + (" while this one waited" if waited else ""))
                else:
                    if forced and out.path.exists():
                        logger.info(f"{stage}: recomputing {key} (forced)")
                    else:
                        logger.info(f"{stage}: computing {key}")
                    meta: dict[str, Any] = {"mlflow_run_id": run.info.run_id}
                    with out.building(meta) as tmp:
                        metrics = build(tmp, meta)
                        meta["metrics"] = clean_metrics(metrics)
                    if cleanup is not None:
                        cleanup()
                    mlflow.set_tag("reused", "false")
                    result = StageResult(stage, key, out.path, False, meta["metrics"], time.perf_counter() - start)
                    logger.info(f"{stage}: done in {result.seconds:.1f} s")
        # at the stage's last step when it has steps (training): a summary logged at step 0 would
        # put a false first point at the start of every training chart
        mlflow.log_metrics(clean_metrics(result.metrics), step=int(result.metrics.get("steps", 0) or 0))
        mlflow.log_metric("stage_seconds", result.seconds)
        log_dict_artifact({"stage": stage, "key": key, "path": str(out.path), "reused": result.reused,
                           "metrics": result.metrics}, f"{stage}.json")
        if after is not None:
            after(result)
        return result


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry unexpected errors, never the project's own (a bad config,
    bad data, a diverged training), which would fail the same way again."""
    from fusion_core.errors import FusionError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result: treat as transient
        return True
    return not isinstance(exc, FusionError)


def with_retries(stage_task, ctx: RunContext, stage: str):
    """`stage_task` with the config's retries for `stage` (orchestration.retries), exponential
    back-off between them; unchanged when none are configured."""
    r = ctx.config.orchestration.retries.get(stage)
    if r is None or r.retries == 0:
        return stage_task
    return stage_task.with_options(retries=r.retries, retry_delay_seconds=r.delays(), retry_condition_fn=_transient)
