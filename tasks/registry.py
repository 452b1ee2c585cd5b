"""The MLflow Model Registry: register the trained target once per training output, alias `candidate`."""
from __future__ import annotations

from dataclasses import dataclass

from tasks.stage import RunContext, StageResult

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.20,<6", "safetensors", "tokenizers"]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    reused: bool


def register_target(ctx: RunContext, training: StageResult, evaluation: StageResult, logger, *,
                    data_key: str = "") -> RegisteredVersion:
    """Register the trained target (inside the active evaluate run) unless this training output already is.

    A version is identified by the training stage key (tag `training_key`): a rerun that reuses
    the training output finds its version instead of registering a duplicate.
    """
    import mlflow
    from mlflow import MlflowClient

    cfg = ctx.config
    name = cfg.tracking.registered_model
    client = MlflowClient(tracking_uri=ctx.tracking.uri)
    try:
        existing = client.search_model_versions(f"name='{name}' and tag.training_key='{training.key}'")
    except Exception:  # registered model not created yet
        existing = []
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
        client.set_registered_model_alias(name, "candidate", mv.version)
        logger.info(f"registry: {name} version {mv.version} already holds this model (alias candidate)")
        return RegisteredVersion(name, str(mv.version), True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = training.path / "model"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="model",
                                         task="text-generation", pip_requirements=PIP_REQUIREMENTS)
    selector = model_dir / "fusion_strategy.safetensors"
    if selector.is_file():  # the trained selection network travels with the registered model
        client.log_model_artifact(info.model_id, str(selector), artifact_path="fusion")
    tags = {
        "strategy": cfg.fusion.strategy,
        **({"single_source": cfg.fusion.single_source} if cfg.fusion.strategy == "single" else {}),
        **({f"adaptive.{k}": str(v) for k, v in cfg.fusion.adaptive.model_dump(mode="json").items()}
           if cfg.fusion.strategy in ("adaptive", "reference") else {}),
        "seed": str(cfg.fusion.training.seed),
        "sources": ",".join(s.name for s in cfg.sources),
        "config_fingerprint": ctx.config_fingerprint,
        "data_fingerprint": data_key,
        "target_fingerprint": ctx.target.key,
        "training_key": training.key,
        "evaluation_key": evaluation.key,
        "pipeline": cfg.name,
    }
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, "candidate", mv.version)
    logger.info(f"registry: registered {name} version {mv.version} (alias candidate)")
    return RegisteredVersion(name, str(mv.version), False)
