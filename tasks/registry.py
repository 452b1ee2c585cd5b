"""The MLflow Model Registry: register the trained target once per training output, alias `candidate`."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fusion_core.export import CARD_FILE, SELECTOR_FILE, start_token, write_model_folder
from fusion_core.model_card import CardFacts, card_description, headline_scores, model_card
from tasks.stage import RunContext, StageResult

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.20,<6", "safetensors", "tokenizers"]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    reused: bool


def register_target(ctx: RunContext, training: StageResult, evaluation: StageResult, logger, *,
                    data_key: str = "", data: StageResult | None = None, metrics: Mapping[str, float] | None = None,
                    report_json: Path | str | None = None) -> RegisteredVersion:
    """Register the trained target (inside the active evaluate run) unless this training output already is.

    A version is identified by the training stage key (tag `training_key`): a rerun that reuses
    the training output finds its version instead of registering a duplicate.

    The logged model's artifact root is a Hugging Face folder (fusion_core.export: weights, the
    tokenizer set to add the start token, the selector, the model card as README.md) beside
    MLflow's transformers flavor (MLmodel, model/, components/). The version's description is
    the card (`data`, `metrics` and the report at `report_json` fill it), its tags the headline
    scores (`score.<metric>`); a version found again gets this run's card and scores, and the
    card is logged to the active run as model_card/README.md.
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
    model_dir = training.path / "model"
    facts = card_facts(ctx, training, model_dir, data=data, metrics=metrics, report_json=report_json)
    scores = {f"score.{k}": f"{v:.6g}" for k, v in headline_scores(facts.metrics).items()}
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
        client.set_registered_model_alias(name, "candidate", mv.version)
        publish_card(client, name, str(mv.version), mv.source, facts, model_dir)
        for k, v in scores.items():
            client.set_model_version_tag(name, str(mv.version), k, v)
        logger.info(f"registry: {name} version {mv.version} already holds this model (alias candidate)")
        return RegisteredVersion(name, str(mv.version), True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = cfg.workspace.root / "work" / "registry"  # a copy of the weights: beside the workspace's, not in /tmp
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="register-", dir=work) as tmp:
        hf = write_model_folder(model_dir, Path(tmp) / "hf", card="")
        model = AutoModelForCausalLM.from_pretrained(str(hf))
        tok = AutoTokenizer.from_pretrained(str(hf))  # adds the start token, in MLflow's flavor too
        info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="model",
                                             task="text-generation", pip_requirements=PIP_REQUIREMENTS)
        selector = model_dir / SELECTOR_FILE
        if selector.is_file():  # the trained selection network travels with the registered model
            client.log_model_artifact(info.model_id, str(selector), artifact_path="fusion")
        mv = mlflow.register_model(info.model_uri, name, tags={**_tags(ctx, training, evaluation, data_key), **scores})
        client.set_registered_model_alias(name, "candidate", mv.version)
        publish_card(client, name, str(mv.version), info.model_uri, facts, model_dir, hf_folder=hf)
    logger.info(f"registry: registered {name} version {mv.version} (alias candidate)")
    return RegisteredVersion(name, str(mv.version), False)


def _tags(ctx: RunContext, training: StageResult, evaluation: StageResult, data_key: str) -> dict[str, str]:
    cfg = ctx.config
    return {
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


def card_facts(ctx: RunContext, training: StageResult, model_dir: Path, *, data: StageResult | None = None,
               metrics: Mapping[str, float] | None = None, report_json: Path | str | None = None) -> CardFacts:
    """What the model card says, from this run (the version is filled in once known)."""
    from transformers import AutoTokenizer

    report = None
    if report_json and Path(report_json).is_file():
        report = json.loads(Path(report_json).read_text())
    return CardFacts(
        config=ctx.config, registered_model=ctx.config.tracking.registered_model, run_id=ctx.tracking.parent_run_id,
        training_key=training.key, source_keys={s.name: s.key for s in ctx.sources}, target_key=ctx.target.key,
        data_metrics=dict(data.metrics) if data is not None else {}, training_metrics=dict(training.metrics),
        metrics=dict(metrics if metrics is not None else {}), report=report,
        start_token=start_token(AutoTokenizer.from_pretrained(str(model_dir))),
        has_selector=(model_dir / SELECTOR_FILE).is_file())


def publish_card(client, name: str, version: str, model_uri: str, facts: CardFacts, model_dir: Path, *,
                 hf_folder: Path | None = None) -> str:
    """Give version `version` this run's card: as its description, as README.md at the logged
    model's root (with the whole Hugging Face folder when the root lacks it: `hf_folder`, else
    written from `model_dir`), and in the active run as model_card/README.md. Returns the card."""
    import mlflow

    facts.version = version
    card = model_card(facts)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    work = facts.config.workspace.root / "work" / "registry"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="card-", dir=work) as tmp:
        if model_id is not None:
            root = {Path(a.path).name for a in client.list_logged_model_artifacts(model_id)}
            if hf_folder is None and "config.json" not in root:  # registered before the root was a HF folder
                hf_folder = write_model_folder(model_dir, Path(tmp) / "hf", card=card)
            if hf_folder is not None:
                (Path(hf_folder) / CARD_FILE).write_text(card, encoding="utf-8")
                client.log_model_artifacts(model_id, str(hf_folder))
            else:
                (Path(tmp) / CARD_FILE).write_text(card, encoding="utf-8")
                client.log_model_artifact(model_id, str(Path(tmp) / CARD_FILE))
    client.update_model_version(name, version, description=card_description(card))
    mlflow.log_text(card, f"model_card/{CARD_FILE}")
    return card
