"""Stage 5, evaluate: lm-eval tasks and held-out perplexity per domain; the model is registered."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.data import read_documents
from fusion_core.evaluation import evaluate_model, materialize_tasks
from fusion_core.models import resolve_device
from tasks.common import run_logger
from tasks.registry import RegisteredVersion, register_target
from tasks.stage import RunContext, StageResult, run_stage, stage_key


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate(ctx: RunContext, data: StageResult, training: StageResult) -> tuple[StageResult, RegisteredVersion]:
    cfg = ctx.config
    ecfg = cfg.evaluation
    key = stage_key("evaluate", ecfg, training.key, data.key)
    logger = run_logger()
    registered: list[RegisteredVersion] = []

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        docs = read_documents(data.path / "validation.jsonl") if ecfg.perplexity else []
        include = materialize_tasks(tmp / "lm_eval_tasks")
        result = evaluate_model(training.path / "model", tasks=list(ecfg.lm_eval_tasks), documents=docs,
                                include_dir=include, limit=ecfg.limit, batch_size=ecfg.batch_size,
                                device=resolve_device(ecfg.device), seed=cfg.seed,
                                num_fewshot=ecfg.num_fewshot, max_length=cfg.data.max_length)
        (tmp / "lm_eval_results.json").write_text(json.dumps(result.lm_eval, indent=2, default=str))
        (tmp / "perplexity.json").write_text(json.dumps(result.perplexity, indent=2))
        return result.metrics

    def after(result: StageResult) -> None:
        import mlflow

        mlflow.log_artifact(str(result.path / "lm_eval_results.json"))
        mlflow.log_artifact(str(result.path / "perplexity.json"))
        registered.append(register_target(ctx, training, result, logger))
        mlflow.set_tags({"registered_model": registered[0].name, "registered_version": registered[0].version})

    stage = run_stage(ctx, "evaluate", key, ecfg, build, logger, after=after)
    return stage, registered[0]
