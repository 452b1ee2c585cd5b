"""Knowledge interference: how much a model loses, task by task, against the best model of one
fixed reference set, with bootstrap intervals (docs/method.md, "Knowledge interference").

For evaluation task j and model M, s_j(M) is the task's score oriented so that higher is better
(bits per byte is negated), computed from per-item results (`TaskItems`):

    best_j     = max over S in R of mean_seeds s_j(S)    one reference set R for every model
    drop_j(M)  = max(0, best_j - mean_seeds s_j(M))      a model in R meets the same best_j
    relative   = drop_j(M) / |best_j|

and interference is reported per unit, never mixing the two:

    bpb: the mean relative drop over the bits-per-byte tasks (0.05 = 5 % more bits per byte)
    acc: the mean absolute drop over the accuracy tasks, in the accuracy's own scale
         (0.05 = 5 accuracy points)

Every figure has a percentile bootstrap interval: each replicate resamples the seeds and, per
task, the items (documents, questions) with replacement, the same draw for every model, so
figures of two models are paired; the generator is seeded, so intervals are reproducible. A
task whose interval on drop_j includes 0 is not hurt. `reduction(A vs B)` = 1 - I(A) / I(B).
Pure: numpy only; no MLflow, no Prefect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fusion_core.bootstrap import (  # noqa: F401 - TaskItems, Estimate, paired_difference: used with this module
    LEVEL,
    RESAMPLES,
    Estimate,
    ItemTable,
    ModelItems,
    TaskItems,
    count_draws,
    interval,
    item_table,
    paired_difference,
)

# Metric names whose score is better when lower; everything else is better when higher.
LOWER_IS_BETTER = ("bits_per_byte", "perplexity", "nll_per_token", "nll", "loss")
# The score an lm-eval task is compared on: the first of these it has.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match.strict-match", "exact_match")
BPB = "bpb"
ACC = "acc"
UNITS = (BPB, ACC)


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of `metric` is better, judged by its last name part
    (ppl.code.bits_per_byte, eval.task.perplexity): bits per byte, perplexity, NLL, loss."""
    last = metric.rsplit(".", 1)[-1]
    return last in LOWER_IS_BETTER


def score_unit(task: str) -> str | None:
    """The interference unit of a task's score name: "bpb" for `ppl.<domain>.bits_per_byte`,
    "acc" for an lm-eval primary metric (`eval.<task>.acc_norm`, ...) and `humaneval.pass_at_1`;
    None for anything else."""
    if task.startswith("ppl.") and task.endswith(".bits_per_byte") and task != "ppl.all.bits_per_byte":
        return BPB
    if task == "humaneval.pass_at_1" or (task.startswith("eval.") and
                                         any(task.endswith("." + m) for m in PRIMARY_METRICS)):
        return ACC
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TaskDrop:
    """One task's comparison of a model with the best reference (scores on the task's own scale:
    bits per byte or accuracy, seed means)."""

    task: str
    unit: str
    score: float
    best: float
    best_model: str
    drop: Estimate  # in the task's own unit, >= 0
    relative_drop: Estimate  # drop / |best|
    items: int
    lower_is_better: bool

    @property
    def hurt(self) -> bool:
        """The drop's interval excludes 0 (a drop is never negative, so: its lower end is above 0)."""
        return self.drop.lo is not None and self.drop.lo > 0


@dataclass(frozen=True)
class Interference:
    """A model's knowledge interference against the reference set (docs/method.md).

    `units` maps "bpb" (mean relative drop over the bits-per-byte tasks) and "acc" (mean
    absolute drop over the accuracy tasks) to their estimates; a unit without a compared task
    is absent. `skipped`: the model's tasks not compared (no reference or no shared item).
    """

    model: str
    references: tuple[str, ...]
    tasks: tuple[TaskDrop, ...]
    units: Mapping[str, Estimate]
    skipped: tuple[str, ...] = ()
    seeds: int = 1

    @property
    def measured(self) -> bool:
        return bool(self.units)

    @property
    def tasks_hurt(self) -> int:
        return sum(t.hurt for t in self.tasks)

    def unit_tasks(self, unit: str) -> tuple[TaskDrop, ...]:
        return tuple(t for t in self.tasks if t.unit == unit)

    def metrics(self, prefix: str = "interference") -> dict[str, float]:
        """Flat metrics: `<prefix>.references`, `<prefix>.tasks`, `<prefix>.tasks_hurt`; per unit
        `<prefix>.bpb` / `<prefix>.acc` with `.lo`, `.hi`, `.tasks`, `.tasks_hurt`; per task
        `<prefix>.drop.<task>` and `<prefix>.relative_drop.<task>`, each with `.lo` and `.hi`."""
        out: dict[str, float] = {f"{prefix}.references": float(len(self.references)),
                                 f"{prefix}.tasks": float(len(self.tasks))}
        if not self.measured:
            return out
        out[f"{prefix}.tasks_hurt"] = float(self.tasks_hurt)
        for unit, est in self.units.items():
            out.update(est.metrics(f"{prefix}.{unit}"))
            tasks = self.unit_tasks(unit)
            out[f"{prefix}.{unit}.tasks"] = float(len(tasks))
            out[f"{prefix}.{unit}.tasks_hurt"] = float(sum(t.hurt for t in tasks))
        for t in self.tasks:
            out.update(t.drop.metrics(f"{prefix}.drop.{t.task}"))
            out.update(t.relative_drop.metrics(f"{prefix}.relative_drop.{t.task}"))
        return out


@dataclass(frozen=True, eq=False)
class InterferenceStudy:
    """The interference of several models against one reference set, from one bootstrap draw
    (so any two models' figures are paired). `study[model]` is its Interference."""

    references: tuple[str, ...]
    seeds: tuple
    resamples: int
    level: float
    rng_seed: int
    models: Mapping[str, Interference]
    replicates: Mapping[tuple[str, str], np.ndarray] = field(repr=False)  # (model, unit) -> values

    def __getitem__(self, model: str) -> Interference:
        return self.models[model]

    def reduction(self, a: str, b: str, unit: str) -> Estimate:
        """1 - I(a) / I(b) in `unit`, with its paired interval: the share of b's interference that a
        avoids. Not measured when either model has no figure in the unit or b's is 0. A replicate
        where b shows none is left out when a shows none either (0/0) and counts as -inf (a
        loses where b does not) otherwise."""
        ea, eb = self.models[a].units.get(unit), self.models[b].units.get(unit)
        point = reduction(ea.value if ea else None, eb.value if eb else None)
        if point is None:
            return Estimate(None, level=self.level)
        ra, rb = self.replicates[(a, unit)], self.replicates[(b, unit)]
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = np.where(rb > 0, 1.0 - ra / np.where(rb > 0, rb, 1.0), np.where(ra > 0, -np.inf, np.nan))
        lo, hi = interval(reps, self.level)
        return Estimate(point, lo, hi, self.level)


def reduction(a: float | None, b: float | None) -> float | None:
    """1 - a / b: the share of B's interference (b) that A (a) avoids, for point values.

    None when either is unknown or b is not a positive finite number (nothing to reduce)."""
    if a is None or b is None or not _finite(a) or not _finite(b) or b <= 0:
        return None
    return 1.0 - a / b


def _common_seeds(items: Mapping[str, ModelItems], models: Sequence[str]) -> tuple:
    seeds = {m: tuple(sorted(items[m], key=str)) for m in models}
    first = seeds[models[0]]
    odd = [m for m in models if set(seeds[m]) != set(first)]
    if odd:
        raise ValueError(f"models evaluated under different seeds: {models[0]} has {list(first)}, "
                         + ", ".join(f"{m} has {list(seeds[m])}" for m in odd))
    if not first:
        raise ValueError(f"{models[0]} has no evaluation")
    return first


def measure_interference(items: Mapping[str, ModelItems], references: Sequence[str], *,
                         models: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                         resamples: int = RESAMPLES, rng_seed: int = 0, level: float = LEVEL) -> InterferenceStudy:
    """The interference of each of `models` (default: every model in `items`) against the one
    reference set `references` (those present in `items`), with paired bootstrap intervals.

    `items` is `{model: {seed: {task score name: TaskItems}}}`, every model under the same seed
    labels; tasks are those `score_unit` knows (default: all of them). A task is compared on the
    items every model that has it shares, when a reference has it; a model's tasks that are not
    compared are in its `skipped`. A model is not measured (no units) when the reference set
    holds nothing but itself.

    Raises KeyError for a model not in `items`; ValueError when the models were evaluated under
    different seeds, or a task's same document ids carry other byte counts.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    refs = tuple(r for r in dict.fromkeys(references) if r in items)
    compared = list(dict.fromkeys(items if models is None else models))
    for m in compared:
        items[m]  # noqa: B018 - KeyError for an unknown model
    everyone = list(dict.fromkeys([*refs, *compared]))
    if not everyone:
        return InterferenceStudy(refs, (), resamples, level, rng_seed, {}, {})
    seeds = _common_seeds(items, everyone)
    has = lambda m, t: all(t in items[m][s] for s in seeds)  # noqa: E731
    names = sorted({t for m in everyone for s in seeds for t in items[m][s]
                    if score_unit(t) is not None and (tasks is None or t in tasks)})

    rng = np.random.default_rng(rng_seed)
    seed_weights = count_draws(rng, resamples, len(seeds)) / len(seeds)
    tables: list[ItemTable] = []
    for task in names:
        holders = [m for m in everyone if has(m, task)]
        if not any(r in holders for r in refs):
            continue
        table = item_table(task, items, holders, seeds)
        if table is not None:
            tables.append(table)
    counts = {t.task: count_draws(rng, resamples, len(t.ids)) for t in tables}  # drawn in task order

    per_task: dict[str, dict[str, tuple[TaskDrop, np.ndarray]]] = {}
    for t in tables:
        unit = score_unit(t.task)
        sign = -1.0 if t.bytes is not None else 1.0  # oriented: higher is better
        point = {m: t.point(m) for m in t.values}
        reps = {m: t.replicates(m, counts[t.task], seed_weights) for m in t.values}
        ref_here = [r for r in refs if r in t.values]
        best_model = max(ref_here, key=lambda r: sign * point[r])
        best = sign * point[best_model]
        best_reps = np.max([sign * reps[r] for r in ref_here], axis=0)
        per_task[t.task] = {}
        for m in compared:
            if m not in t.values:
                continue
            drop = max(0.0, best - sign * point[m])
            drop_reps = np.maximum(0.0, best_reps - sign * reps[m])
            with np.errstate(divide="ignore", invalid="ignore"):
                rel_reps = drop_reps / np.abs(best_reps)
            rel = drop / abs(best) if best else (0.0 if drop == 0 else math.inf)
            lo, hi = interval(drop_reps, level)
            rlo, rhi = interval(rel_reps, level)
            td = TaskDrop(t.task, unit, point[m], point[best_model], best_model, Estimate(drop, lo, hi, level),
                          Estimate(rel, rlo, rhi, level), len(t.ids), t.bytes is not None)
            per_task[t.task][m] = (td, rel_reps if unit == BPB else drop_reps)

    results: dict[str, Interference] = {}
    replicates: dict[tuple[str, str], np.ndarray] = {}
    for m in compared:
        own = [t for s in seeds for t in items[m][s] if score_unit(t) is not None and (tasks is None or t in tasks)]
        own = list(dict.fromkeys(own))
        if not [r for r in refs if r != m]:  # compared with itself only: says nothing
            results[m] = Interference(m, refs, (), {}, tuple(sorted(own)), len(seeds))
            continue
        drops = [per_task[t][m] for t in sorted(per_task) if m in per_task[t]]
        units: dict[str, Estimate] = {}
        for unit in UNITS:
            mine = [(td, r) for td, r in drops if td.unit == unit]
            if not mine:
                continue
            value = float(np.mean([td.relative_drop.value if unit == BPB else td.drop.value for td, _ in mine]))
            reps = np.mean([r for _, r in mine], axis=0)
            replicates[(m, unit)] = reps
            units[unit] = Estimate(value, *interval(reps, level), level)
        done = {td.task for td, _ in drops}
        results[m] = Interference(m, refs, tuple(td for td, _ in drops), units,
                                  tuple(sorted(t for t in own if t not in done)), len(seeds))
    return InterferenceStudy(refs, seeds, resamples, level, rng_seed, results, replicates)


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
        for metric in PRIMARY_METRICS:
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
