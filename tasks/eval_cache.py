"""Evaluate one model inside the evaluate stage's MLflow run, reusing results MLflow already holds.

Each evaluated model gets a nested run `eval <label>` tagged with its content fingerprint
(`model_fingerprint`). A unit that completes is recorded on that run as the tag
`evalcache.<unit key>` holding its metrics as JSON and the path of its per-item results (the
artifact `evaluation/<unit>.items.jsonl`, fusion_core.eval_items), written in one call after
the unit has finished and its items are logged: a unit whose tag exists is complete, whatever
became of the run later. Before running a unit, the experiment's runs with the same model
fingerprint are searched for its key; a hit whose items can be read is reused (and named in the
new run's `evalreused.<unit>` tag), a miss is computed.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fusion_core.eval_items import items_text, read_items
from fusion_core.evaluation_suite import EvalSettings, UnitOutcome, evaluate_units, model_fingerprint
from tasks.tracking import clean_metrics

CACHE_TAG = "evalcache."
REUSED_TAG = "evalreused."
FAILED_TAG = "evalfailed."
_MAX_TAG_VALUE = 8000  # MLflow's limit on a tag value


@dataclass(frozen=True)
class EvalSubject:
    """A model to evaluate: its label in reports (candidate, target, clm, single:<source>,
    source:<name>), its folder, and its role (candidate, baseline or reference)."""

    label: str
    model_dir: Path
    role: str


@dataclass
class SubjectEvaluation:
    label: str
    role: str
    fingerprint: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    reused: dict[str, str] = field(default_factory=dict)  # unit -> run id it came from
    failures: dict[str, str] = field(default_factory=dict)  # unit -> error
    details: dict[str, dict] = field(default_factory=dict)  # unit -> raw results of computed units
    items: dict[str, list[dict]] = field(default_factory=dict)  # unit -> per-item records (computed or reused)

    def all_items(self) -> list[dict]:
        """Every unit's per-item records, in unit order."""
        return [rec for unit in sorted(self.items) for rec in self.items[unit]]

    def to_dict(self) -> dict:
        return {"label": self.label, "role": self.role, "fingerprint": self.fingerprint, "run_id": self.run_id,
                "metrics": self.metrics, "computed": self.computed, "reused": self.reused,
                "failures": self.failures}


@dataclass(frozen=True)
class CachedUnit:
    metrics: dict[str, float]
    run_id: str
    items: str | None  # the artifact path of its per-item records on that run


def cached_units(client, experiment_id: str, model_fp: str) -> dict[str, CachedUnit]:
    """`{unit key: CachedUnit}` recorded for the model with fingerprint `model_fp` in the
    experiment, newest first wins."""
    found: dict[str, CachedUnit] = {}
    runs = client.search_runs([experiment_id], filter_string=f"tags.model_fingerprint = '{model_fp}'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    for run in runs:
        for tag, value in run.data.tags.items():
            if not tag.startswith(CACHE_TAG):
                continue
            key = tag[len(CACHE_TAG):]
            if key in found:
                continue
            try:
                record = json.loads(value)
                metrics = {str(k): float(v) for k, v in record["metrics"].items()}
                items = record.get("items")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # not a record this code wrote: never taken for a result
            found[key] = CachedUnit(metrics, run.info.run_id, items if isinstance(items, str) else None)
    return found


def _cached_items(client, hit: CachedUnit) -> list[dict] | None:
    """The per-item records of a cached unit, None when they cannot be read."""
    if hit.items is None:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return read_items(Path(client.download_artifacts(hit.run_id, hit.items, tmp)))
    except Exception:  # noqa: BLE001 - an unreadable artifact makes the hit a miss
        return None


def evaluate_subject(subject: EvalSubject, settings: EvalSettings, keys: dict[str, str], *, experiment_id: str,
                     tracking_uri: str, documents=(), include_dir: Path | None = None, logger=None,
                     use_cache: bool = True) -> SubjectEvaluation:
    """Evaluate `subject` on the units in `keys` ({unit: key}) in a nested run of the active
    MLflow run, reusing cached units of the same model fingerprint.

    A failed unit is logged (tag `evalfailed.<unit>`, its message) and left out of the metrics;
    it is not cached, so a later run tries it again. The result holds every completed unit's
    per-item records (`items`), reused ones read back from the run that computed them.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fp = model_fingerprint(subject.model_dir)
    hits = cached_units(client, experiment_id, fp) if use_cache else {}
    reused: dict[str, CachedUnit] = {}
    reused_items: dict[str, list[dict]] = {}
    for unit, key in keys.items():
        if key in hits and (records := _cached_items(client, hits[key])) is not None:
            reused[unit], reused_items[unit] = hits[key], records
    todo = [unit for unit in keys if unit not in reused]
    with mlflow.start_run(run_name=f"eval {subject.label}", nested=True, experiment_id=experiment_id,
                          tags={"model_label": subject.label, "model_fingerprint": fp, "eval_role": subject.role,
                                "model_path": str(subject.model_dir)}) as run:
        result = SubjectEvaluation(subject.label, subject.role, fp, run.info.run_id)
        for unit, hit in reused.items():
            result.metrics.update(hit.metrics)
            result.reused[unit] = hit.run_id
            result.items[unit] = reused_items[unit]
        if reused:
            mlflow.set_tags({f"{REUSED_TAG}{_tag_safe(u)}": hit.run_id for u, hit in reused.items()})
        if logger is not None:
            logger.info(f"evaluate {subject.label}: {len(reused)} unit(s) reused from MLflow, computing "
                        f"{', '.join(todo) or 'nothing'}")
        outcomes: dict[str, UnitOutcome] = (
            evaluate_units(subject.model_dir, todo, settings, documents=documents, include_dir=include_dir)
            if todo else {})
        for unit, outcome in outcomes.items():
            if not outcome.ok:
                result.failures[unit] = outcome.error
                mlflow.set_tag(f"{FAILED_TAG}{_tag_safe(unit)}", outcome.error[:_MAX_TAG_VALUE])
                if logger is not None:
                    logger.warning(f"evaluate {subject.label}: {unit} failed: {outcome.error}")
                continue
            metrics = clean_metrics(outcome.metrics)
            result.metrics.update(metrics)
            result.computed.append(unit)
            result.details[unit] = outcome.details
            result.items[unit] = outcome.items
            mlflow.log_metrics(metrics)
            items_path = f"evaluation/{_tag_safe(unit)}.items.jsonl"
            mlflow.log_text(items_text(outcome.items), items_path)  # before the record that points to it
            record = json.dumps({"unit": unit, "metrics": metrics, "items": items_path}, sort_keys=True)
            if len(record) <= _MAX_TAG_VALUE:  # the record is what makes the unit reusable: written last
                mlflow.set_tag(CACHE_TAG + keys[unit], record)
            elif logger is not None:
                logger.warning(f"evaluate {subject.label}: {unit}'s metrics are too many to cache in a tag")
            if outcome.details:
                mlflow.log_dict(outcome.details, f"evaluation/{_tag_safe(unit)}.json")
        if reused:
            mlflow.log_metrics(clean_metrics({k: v for hit in reused.values() for k, v in hit.metrics.items()}))
        mlflow.log_metric("eval.failed_units", float(len(result.failures)))
    return result


def _tag_safe(unit: str) -> str:
    return unit.replace(":", "_")
