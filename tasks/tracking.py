"""MLflow around the stages: embedded tracking by default, one parent run, a nested run per stage."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from fusion_core.config import PipelineConfig, flatten
from fusion_core.evaluation import sanitize_metric_name
from fusion_core.redaction import SERVER_URI_VARIABLE, mask_uri, redact, redact_mapping, resolve_uri, secret_values


def tracking_uri(cfg: PipelineConfig) -> str:
    """The config's tracking URI, else $FUSION_TRACKING_URI (the workspace's `fusion server`, set
    by flows.env.apply_defaults while it runs), else the embedded default: a SQLite file inside
    the workspace. Not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable, so
    in a process that ran one pipeline it names that pipeline's store.

    This is the real URI, to connect with: show `shown_tracking_uri(cfg)` (credentials masked).
    A config's `${VARIABLE}` references are expanded, and the masked password of a config fusion
    wrote is recovered (fusion_core.redaction.resolve_uri)."""
    if cfg.tracking.tracking_uri:
        return resolve_uri(cfg.tracking.tracking_uri)
    if os.environ.get(SERVER_URI_VARIABLE):
        return os.environ[SERVER_URI_VARIABLE]
    db = cfg.workspace.root / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def shown_tracking_uri(cfg: PipelineConfig) -> str:
    """The tracking URI as logs and summaries show it: credentials masked."""
    return mask_uri(tracking_uri(cfg))


def artifact_location(cfg: PipelineConfig) -> str | None:
    if cfg.tracking.tracking_uri or os.environ.get(SERVER_URI_VARIABLE):
        return None  # the server decides (`fusion server`: <workspace>/mlflow/artifacts/<experiment id>)
    return (cfg.workspace.root / "mlflow" / "artifacts").as_uri()


def ensure_experiment(cfg: PipelineConfig) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg))


def clean_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        out[sanitize_metric_name(prefix + k)] = float(v)
    return out


def safe_params(data: Any) -> dict[str, str]:
    """Flattened params, values cut to MLflow's 6000-character limit, with URI credentials and the
    environment's secret values masked (fusion_core.redaction)."""
    secrets = secret_values()
    return {sanitize_metric_name(k): redact(str(v), secrets)[:6000] for k, v in flatten(data).items()}


def safe_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """MLflow tags with URI credentials and the environment's secret values masked."""
    return redact_mapping({k: str(v) for k, v in tags.items()})


@dataclass(frozen=True)
class TrackingContext:
    uri: str
    experiment_id: str
    parent_run_id: str


@contextlib.contextmanager
def stage_run(ctx: TrackingContext, stage: str, tags: Mapping[str, str] | None = None,
              run_name: str | None = None) -> Iterator[Any]:
    """A nested MLflow run under the pipeline's parent run, active for the block."""
    import mlflow

    mlflow.set_tracking_uri(ctx.uri)
    with mlflow.start_run(run_name=run_name or stage, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
                          nested=True, tags=safe_tags({"stage": stage, **(tags or {})})) as run:
        yield run


def log_dict_artifact(data: Any, name: str) -> None:
    import mlflow

    mlflow.log_dict(data, name)


def log_file_artifact(path: Path, folder: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=folder)
