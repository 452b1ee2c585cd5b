"""Stage 4, fusion_training: DeepSpeed training of the target on lambda*CLM + (1-lambda)*KD."""
from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.data import read_documents
from fusion_core.models import load_tokenizer
from fusion_core.teacher import iter_fusion_examples, read_shards
from fusion_core.training import train_target
from tasks.common import run_logger
from tasks.stage import RunContext, StageResult, run_stage, stage_key
from tasks.tracking import clean_metrics


@task(name="fusion_training", cache_policy=NO_CACHE, persist_result=False)
def fusion_training(ctx: RunContext, data: StageResult, teacher: StageResult) -> StageResult:
    cfg = ctx.config
    key = stage_key("fusion_training", cfg.fusion, teacher.key, ctx.target.key, [s.name for s in ctx.sources])
    logger = run_logger()

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        import mlflow

        docs = read_documents(data.path / "train.jsonl")
        tgt_tok = load_tokenizer(ctx.target.path)
        uses_teachers = cfg.fusion.strategy != "clm"
        teachers = [read_shards(teacher.path / s.name) for s in ctx.sources] if uses_teachers else []
        examples = list(iter_fusion_examples(docs, tgt_tok, teachers))
        # Checkpoints live outside the stage's temporary folder so a killed run can resume.
        work = cfg.workspace.root / "work" / "fusion_training" / key

        def log(metrics: dict[str, float], step: int) -> None:
            mlflow.log_metrics(clean_metrics(metrics), step=step)
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())
                                                     if k in ("loss", "clm", "kd", "lr", "tokens_per_s")))

        result = train_target(ctx.target.path, examples, fusion=cfg.fusion, out_dir=work,
                              source_names=[s.name for s in ctx.sources] if uses_teachers else [], log=log)
        shutil.copytree(result.model_dir, tmp / "model")
        meta["training"] = {"steps": result.steps, "tokens_seen": result.tokens_seen}
        return {**result.metrics, "steps": result.steps, "tokens_seen": result.tokens_seen,
                "train_seconds": result.seconds}

    return run_stage(ctx, "fusion_training", key, cfg.fusion, build, logger)
