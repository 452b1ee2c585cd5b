"""The fusion pipeline: five stages as Prefect tasks, tracked in MLflow.

    prepare_data -> align_vocabularies -> teacher_inference -> fusion_training -> evaluate

Models are resolved first (converted or built once, cached). Every stage reuses a complete
output for its fingerprint instead of recomputing it, and says so.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow

from fusion_core.config import PipelineConfig, config_to_yaml, load_config
from fusion_core.redaction import install_log_redaction, mask_uri
from fusion_core.workspace import fingerprint, workspace_umask
from tasks.align_vocabularies import align_vocabularies
from tasks.common import run_logger
from tasks.evaluate import check_evaluation, evaluate
from tasks.fusion_training import fusion_training
from tasks.prepare_data import check_corpora, prepare_data
from tasks.references import reference_models
from tasks.resolve_models import resolve_models
from tasks.stage import STAGES, RunContext, with_retries
from tasks.teacher_inference import teacher_inference
from tasks.tracking import TrackingContext, ensure_experiment, safe_params, safe_tags, tracking_uri


@dataclass
class PipelineSummary:
    pipeline: str
    tracking_uri: str
    experiment: str
    run_id: str
    registered_model: str
    version: str
    stages: dict[str, dict] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    report: dict[str, str] = field(default_factory=dict)
    model_dir: str = ""  # the trained model's folder (`fusion export` writes it out with its card)

    def to_dict(self) -> dict:
        return asdict(self)


def config_fingerprint(cfg: PipelineConfig) -> str:
    """What the pipeline computes, independent of where it writes or tracks."""
    data = cfg.model_dump(mode="json", exclude={"workspace", "tracking", "orchestration"})
    return fingerprint(data)


def process_tags() -> dict[str, str]:
    """Where this pipeline runs: `fusion rerun` tells a run still going from one left marked
    running by a killed process."""
    import os
    import socket

    from prefect.runtime import flow_run

    return {"host": socket.gethostname(), "pid": str(os.getpid()), "prefect_flow_run_id": str(flow_run.id or "")}


def stages_from(stage: str | None) -> frozenset[str]:
    if stage is None:
        return frozenset()
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return frozenset(STAGES[STAGES.index(stage):])


@flow(name="fusion_pipeline", log_prints=True)
def fusion_pipeline(config_path: str, from_stage: str | None = None, parent_run_id: str | None = None,
                    rerun_of: str | None = None) -> dict:
    """Run the whole pipeline for the YAML config at `config_path`; returns a summary dict.

    `parent_run_id`: an MLflow run (of the same experiment) to nest this pipeline's run under
    (`fusion reproduce` does). `rerun_of`: the pipeline run this one reruns (`fusion rerun`):
    the two runs are linked by tags (`rerun_of` here, `rerun_by` there).

    What it writes gets the workspace's permissions (`workspace.umask`, default 0644 files and
    0755 folders); secrets are masked in its logs, params, tags and written configs."""
    start = time.perf_counter()
    install_log_redaction()
    cfg = load_config(config_path)
    with workspace_umask(cfg.workspace.umask_bits):
        return _pipeline(cfg, start, from_stage, parent_run_id, rerun_of)


def log_run_config(client, run_id: str, cfg: PipelineConfig, uri: str, logger) -> None:
    """Name the run and where it is tracked in the log, and log the config as the run's params and
    its `config/resolved.yaml` artifact: URI credentials and the environment's secrets masked."""
    logger.info(f"MLflow run {run_id} in experiment {cfg.tracking.experiment!r} at {mask_uri(uri)}")
    for k, v in safe_params(cfg.model_dump(mode="json")).items():
        client.log_param(run_id, k, v)
    client.log_text(run_id, config_to_yaml(cfg), "config/resolved.yaml")


def _pipeline(cfg: PipelineConfig, start: float, from_stage: str | None, parent_run_id: str | None,
              rerun_of: str | None) -> dict:
    import mlflow
    from mlflow import MlflowClient

    logger = run_logger()
    force = stages_from(from_stage)
    cfg.workspace.root.mkdir(parents=True, exist_ok=True)
    check_corpora(cfg)  # cheap: fail on an empty corpus before any model is built
    check_evaluation(cfg)  # unknown lm-eval task names, HumanEval without its package

    uri = tracking_uri(cfg)
    experiment_id = ensure_experiment(cfg)
    client = MlflowClient(tracking_uri=uri)
    fp = config_fingerprint(cfg)
    from flows.rerun import recover_dead_runs

    recover_dead_runs(client, experiment_id, fp, logger.info)  # runs of this config a kill left RUNNING
    parent = client.create_run(experiment_id, run_name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags=safe_tags({"pipeline": cfg.name, "config_fingerprint": fp,
                                               "strategy": cfg.fusion.strategy, **process_tags(),
                                               **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
                                               **({"rerun_of": rerun_of} if rerun_of else {})}))
    run_id = parent.info.run_id
    if rerun_of:
        client.set_tag(rerun_of, "rerun_by", run_id)
    try:
        log_run_config(client, run_id, cfg, uri, logger)
        mlflow.set_tracking_uri(uri)
        tracking = TrackingContext(uri=uri, experiment_id=experiment_id, parent_run_id=run_id)

        sources, target = resolve_models(cfg)
        ctx = RunContext(config=cfg, tracking=tracking, sources=sources, target=target, force_stages=force,
                         config_fingerprint=fp)
        data = with_retries(prepare_data, ctx, "prepare_data")(ctx)
        alignment = with_retries(align_vocabularies, ctx, "align_vocabularies")(ctx, data)
        teacher = with_retries(teacher_inference, ctx, "teacher_inference")(ctx, data, alignment)
        training = with_retries(fusion_training, ctx, "fusion_training")(ctx, data, teacher)
        references = reference_models(ctx, data, teacher, training, logger)
        summary_eval = with_retries(evaluate, ctx, "evaluate")(ctx, data, training, references)
        evaluation, registered = summary_eval.stage, summary_eval.registered

        results = {"prepare_data": data, "align_vocabularies": alignment, "teacher_inference": teacher,
                   "fusion_training": training, "evaluate": evaluation}
        for name, res in results.items():
            client.log_metric(run_id, f"stage.{name}.reused", float(res.reused))
        for k, v in summary_eval.metrics.items():
            client.log_metric(run_id, k, v)
        for path in summary_eval.report.values():
            client.log_artifact(run_id, path, "report")
        reused = [n for n, r in results.items() if r.reused]
        client.set_tag(run_id, "reused_stages", ",".join(reused) or "none")
        client.set_tag(run_id, "registered_model", f"{registered.name}/{registered.version}")
        seconds = time.perf_counter() - start
        client.log_metric(run_id, "pipeline_seconds", seconds)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    summary = PipelineSummary(
        pipeline=cfg.name, tracking_uri=mask_uri(uri), experiment=cfg.tracking.experiment, run_id=run_id,
        registered_model=registered.name, version=registered.version,
        stages={n: {"reused": r.reused, "key": r.key, "seconds": round(r.seconds, 2), "path": str(r.path)}
                for n, r in results.items()},
        metrics=summary_eval.metrics, seconds=seconds, report=summary_eval.report,
        model_dir=str(training.path / "model"))
    return summary.to_dict()


def write_resolved_config(cfg: PipelineConfig) -> Path:
    """The resolved config (defaults filled, paths absolute) as a YAML file in the workspace,
    named by its fingerprint: what a run with --set overrides actually runs. URI credentials are
    masked in it (user:***@host): a run of it connects with the real URI of the config this
    process loaded, $FUSION_TRACKING_URI or `${VARIABLE}` references (redaction.resolve_uri)."""
    from fusion_core.workspace import write_text_atomic

    text = config_to_yaml(cfg)
    path = cfg.workspace.root / "configs" / f"{cfg.name}-{fingerprint(text)[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_text_atomic(path, text)
    return path


def run_pipeline(config_path: Path, from_stage: str | None = None, rerun_of: str | None = None) -> dict:
    return fusion_pipeline(str(Path(config_path).resolve()), from_stage, rerun_of=rerun_of)
