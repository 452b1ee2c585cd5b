"""`fusion promote`: move the registry alias `champion` to a version only when it earns it."""
from __future__ import annotations

import time
from dataclasses import dataclass

from fusion_core.errors import FusionError
from fusion_core.promotion import PromotionDecision, decide_promotion
from flows.compare import version_metrics

CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass(frozen=True)
class PromotionOutcome:
    name: str
    version: str
    champion_before: str | None
    decision: PromotionDecision
    applied: bool  # the alias moved (False on a dry run or a refusal)


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(tracking_uri: str, name: str, evaluation, *, version: str | None = None,
            dry_run: bool = False) -> PromotionOutcome:
    """Decide whether `version` (default: the one with alias `candidate`) of registered model
    `name` becomes the champion, by `evaluation`'s primary metric, goal, interference budget and
    margin (an EvaluationConfig); apply it unless `dry_run`.

    The decision is recorded on the version (tags `promotion.decision`, `promotion.reason`,
    `promotion.at`). Raises FusionError when the model, the version or the candidate alias is missing.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise FusionError(f"no registered model {name!r} at {tracking_uri}") from None
    if version is None:
        version = _alias_version(client, name, CANDIDATE)
        if version is None:
            raise FusionError(f"{name} has no version with alias {CANDIDATE!r}; name one with --version")
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise FusionError(f"{name} has no version {version}") from None
    champion = _alias_version(client, name, CHAMPION)
    if champion == str(mv.version):
        decision = PromotionDecision(False, f"version {mv.version} is already the champion")
        return PromotionOutcome(name, str(mv.version), champion, decision, False)
    metrics, _ = version_metrics(client, name, mv)
    champion_metrics = version_metrics(client, name, client.get_model_version(name, champion))[0] if champion else None
    decision = decide_promotion(metrics, champion_metrics, primary_metric=evaluation.primary_metric,
                                goal=evaluation.primary_goal, interference_budget=evaluation.interference_budget,
                                min_delta=evaluation.promotion_min_delta, candidate_name=f"version {mv.version}",
                                champion_name=f"champion version {champion}")
    if dry_run:
        return PromotionOutcome(name, str(mv.version), champion, decision, False)
    tags = {"promotion.decision": "promoted" if decision.promote else "refused",
            "promotion.reason": decision.reason[:5000], "promotion.at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for k, v in tags.items():
        client.set_model_version_tag(name, str(mv.version), k, v)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, str(mv.version))
    return PromotionOutcome(name, str(mv.version), champion, decision, decision.promote)
