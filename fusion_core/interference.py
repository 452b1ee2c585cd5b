"""Knowledge interference: how much a fused model loses, task by task, against the best
single-source model (METHOD.md, "Knowledge interference").

For evaluation task j and model M with score s_j(M):

    best_j     = the best s_j(S) over the reference models S (each single-source model and the
                 CLM baseline)
    drop_j(M)  = max(0, best_j - s_j(M))       for a score where higher is better
               = max(0, s_j(M) - best_j)       for one where lower is better (bits per byte)
    interference(M) = mean_j drop_j(M) / mean_j |best_j|
    tasks_hurt(M)   = the count of tasks with drop_j(M) > 0
    reduction(A vs B) = 1 - interference(A) / interference(B)

`mean_relative_drop` (mean_j drop_j / |best_j|) is reported beside it: it weighs every task
alike whatever the scale of its score. Pure functions over plain tables; no MLflow, no Prefect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

# Metric names whose score is better when lower; everything else is better when higher.
LOWER_IS_BETTER = ("bits_per_byte", "perplexity", "nll_per_token", "nll", "loss")


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of `metric` is better, judged by its last name part
    (ppl.code.bits_per_byte, eval.task.perplexity): bits per byte, perplexity, NLL, loss."""
    last = metric.rsplit(".", 1)[-1]
    return last in LOWER_IS_BETTER


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TaskDrop:
    """One task's comparison of a model against the best reference."""

    task: str
    score: float
    best: float
    best_model: str
    lower_is_better: bool

    @property
    def drop(self) -> float:
        gap = self.score - self.best if self.lower_is_better else self.best - self.score
        return max(0.0, gap)

    @property
    def relative_drop(self) -> float:
        return self.drop / abs(self.best) if self.best else (0.0 if self.drop == 0 else math.inf)


@dataclass(frozen=True)
class Interference:
    """A model's knowledge interference against its references (METHOD.md).

    value is None when no task could be compared (no reference scored any task the model has).
    """

    model: str
    tasks: tuple[TaskDrop, ...]
    references: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())  # tasks without a finite score for the model or any reference

    @property
    def value(self) -> float | None:
        if not self.tasks:
            return None
        best = sum(abs(t.best) for t in self.tasks) / len(self.tasks)
        drop = sum(t.drop for t in self.tasks) / len(self.tasks)
        if best == 0:
            return 0.0 if drop == 0 else math.inf
        return drop / best

    @property
    def tasks_hurt(self) -> int:
        return sum(t.drop > 0 for t in self.tasks)

    @property
    def mean_relative_drop(self) -> float | None:
        if not self.tasks:
            return None
        return sum(t.relative_drop for t in self.tasks) / len(self.tasks)

    def metrics(self, prefix: str = "interference") -> dict[str, float]:
        """Flat metrics: `<prefix>` (the value), `.tasks_hurt`, `.tasks`, `.references`,
        `.mean_relative_drop`, and per task `.drop.<task>` and `.relative_drop.<task>`.
        Nothing for the value when it is None."""
        out: dict[str, float] = {f"{prefix}.tasks": float(len(self.tasks)),
                                 f"{prefix}.references": float(len(self.references))}
        if self.value is None:
            return out
        out[prefix] = self.value
        out[f"{prefix}.tasks_hurt"] = float(self.tasks_hurt)
        out[f"{prefix}.mean_relative_drop"] = float(self.mean_relative_drop)
        for t in self.tasks:
            out[f"{prefix}.drop.{t.task}"] = t.drop
            if math.isfinite(t.relative_drop):
                out[f"{prefix}.relative_drop.{t.task}"] = t.relative_drop
        return out


def interference(model: str, scores: Mapping[str, Mapping[str, float]], references: list[str],
                 tasks: list[str] | None = None) -> Interference:
    """The interference of `model` against the `references`, over `tasks` (default: every task
    the model has a score for).

    `scores` is `{model name: {task: score}}`, the direction of each task's score given by
    `lower_is_better(task)`. A task is compared when the model and at least one reference have a
    finite score for it; the others are listed in `skipped`. The model itself is never its own
    reference. Raises KeyError when `model` has no scores.
    """
    own = scores[model]
    refs = [r for r in dict.fromkeys(references) if r != model and r in scores]
    wanted = list(own) if tasks is None else list(tasks)
    drops, skipped = [], []
    for task in wanted:
        s = own.get(task)
        ref_scores = [(scores[r][task], r) for r in refs if _finite(scores[r].get(task))]
        if not _finite(s) or not ref_scores:
            skipped.append(task)
            continue
        low = lower_is_better(task)
        best, best_model = (min if low else max)(ref_scores, key=lambda p: p[0])
        drops.append(TaskDrop(task, float(s), float(best), best_model, low))
    return Interference(model, tuple(drops), tuple(refs), tuple(skipped))


def reduction(a: Interference | float | None, b: Interference | float | None) -> float | None:
    """1 - interference(A) / interference(B): the share of B's interference that A avoids.

    None when either is unknown or B has none (nothing to reduce)."""
    va = a.value if isinstance(a, Interference) else a
    vb = b.value if isinstance(b, Interference) else b
    if va is None or vb is None or not math.isfinite(vb) or vb == 0:
        return None
    return 1.0 - va / vb


def primary_scores(metrics: Mapping[str, float], *, include_domains: bool = True) -> dict[str, float]:
    """The score per evaluation task that interference compares, from flat evaluation metrics.

    - an lm-eval task: `eval.<task>.acc_norm`, else `.acc`, else `.exact_match.strict-match`,
      else `.exact_match` (higher is better);
    - HumanEval: `humaneval.pass_at_1` (higher is better);
    - held-out text per domain: `ppl.<domain>.bits_per_byte` (lower is better), not the total "all".
    Keys are the metric names themselves, so `lower_is_better` reads each one's direction.
    """
    out: dict[str, float] = {}
    tasks: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        if name.startswith("eval.") and "_stderr" not in name:
            task, _, metric = name[len("eval."):].partition(".")
            tasks.setdefault(task, {})[metric] = value
    for task, row in sorted(tasks.items()):
        for metric in ("acc_norm", "acc", "exact_match.strict-match", "exact_match"):
            if _finite(row.get(metric)):
                out[f"eval.{task}.{metric}"] = float(row[metric])
                break
    if _finite(metrics.get("humaneval.pass_at_1")):
        out["humaneval.pass_at_1"] = float(metrics["humaneval.pass_at_1"])
    if include_domains:
        for name, value in sorted(metrics.items()):
            if (name.startswith("ppl.") and name.endswith(".bits_per_byte") and name != "ppl.all.bits_per_byte"
                    and _finite(value)):
                out[name] = float(value)
    return out
