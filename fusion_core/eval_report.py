"""The evaluate stage's report: every evaluated model's scores, the candidate's knowledge
interference against the reference set (per unit, with bootstrap intervals over items), failures
and reuse, as markdown, JSON and a PNG chart."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from fusion_core.eval_items import task_items
from fusion_core.evaluation import json_safe
from fusion_core.interference import ACC, BPB, Interference, InterferenceStudy, measure_interference, primary_scores
from fusion_core.reporting import bar_chart, fmt, markdown_table

HUMANEVAL_STATUSES = ("passed", "failed", "timeout", "sandbox_violation", "empty", "error")


@dataclass(frozen=True)
class ModelEvaluation:
    """What the report needs of one evaluated model."""

    label: str
    role: str  # candidate | baseline | reference | source
    metrics: Mapping[str, float]
    failures: Mapping[str, str]
    computed: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    items: Sequence[Mapping] = ()  # per-item records (fusion_core.eval_items) of its completed units


def interference_of(models: list[ModelEvaluation], candidate: str, *, candidate_is_reference: bool = False,
                    resamples: int = 1000, rng_seed: int = 0) -> tuple[dict[str, dict[str, float]], InterferenceStudy]:
    """The score table `{label: {task: score}}` and the interference of every model against one
    reference set: the models with `role == "reference"`, and the candidate too when it is one
    of them (`candidate_is_reference`: a clm or single-source pipeline). Each model is one
    evaluation (one seed); intervals are over items."""
    scores = {m.label: primary_scores(m.metrics) for m in models}
    refs = [m.label for m in models if m.role == "reference" or (candidate_is_reference and m.label == candidate)]
    items = {m.label: {0: task_items(m.items)} for m in models}
    return scores, measure_interference(items, refs, resamples=resamples, rng_seed=rng_seed)


def _unit_line(i: Interference, unit: str) -> str:
    est = i.units[unit]
    tasks = i.unit_tasks(unit)
    hurt = f"{sum(t.hurt for t in tasks)} of {len(tasks)} tasks hurt"
    if unit == BPB:
        return (f"- **bits per byte: interference = {est.text()}** (mean relative drop: {est.value:.2%} more "
                f"bits per byte than the best reference; {hurt})")
    return (f"- **accuracy: interference = {est.text(100, 2, ' points')}** (mean absolute drop in accuracy "
            f"points; {hurt})")


def _unit_cell(i: Interference, unit: str) -> str:
    if unit not in i.units:
        return "-"
    tasks = i.unit_tasks(unit)
    est = i.units[unit]
    text = est.text() if unit == BPB else est.text(100, 2)
    return f"{text} ({sum(t.hurt for t in tasks)}/{len(tasks)} hurt)"


def write_report(out_dir: Path, *, title: str, models: list[ModelEvaluation], candidate: str,
                 missing_references: list[str], candidate_is_reference: bool = False,
                 resamples: int = 1000) -> tuple[Interference, dict[str, Path]]:
    """Write evaluation.md, evaluation.json and evaluation.png into `out_dir`; return the
    candidate's Interference and the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, study = interference_of(models, candidate, candidate_is_reference=candidate_is_reference,
                                    resamples=resamples)
    inter = study.models
    mine = inter[candidate]
    labels = [m.label for m in models]
    tasks = list(scores.get(candidate, {}))
    lines = [f"# {title}", ""]
    refs = list(study.references)
    lines += ["## Scores", "",
              "The primary score of each task (↑ higher is better, ↓ lower is better); ★ marks the best.", "",
              markdown_table(scores, labels, tasks, label="task"), ""]
    lines += ["## Knowledge interference of the candidate", ""]
    if missing_references:
        lines += [f"**Missing references:** {', '.join(missing_references)} (not trained yet: `fusion reproduce`, "
                  f"or `evaluation.train_references: true`). The numbers below compare against "
                  f"{', '.join(refs) or 'no reference'} only.", ""]
    if not mine.measured:
        lines += ["Not measured: no other model of the reference set scored the candidate's tasks item by item.", ""]
    else:
        pct = f"{study.level:.0%}"
        lines += [f"One reference set R = {{{', '.join(refs)}}} for every model (docs/method.md): on each task, best = "
                  f"the best score in R; drop = max(0, best - score), 0 when the model does not fall behind. "
                  f"[lo, hi]: {pct} bootstrap interval over items ({study.resamples} resamples); a task is hurt "
                  f"when the interval on its drop excludes 0.", "",
                  "| task | candidate | best in R | which | drop [lo, hi] | relative drop | hurt |",
                  "|---|---|---|---|---|---|---|"]
        for t in mine.tasks:
            lines.append(f"| {t.task} | {fmt(t.score)} | {fmt(t.best)} | {t.best_model} | {t.drop.text()} | "
                         f"{t.relative_drop.value:.1%} | {'yes' if t.hurt else 'no'} |")
        lines += [""] + [_unit_line(mine, unit) for unit in (BPB, ACC) if unit in mine.units] + [""]
        others = [(label, i) for label, i in inter.items() if i.measured]
        if len(others) > 1:
            lines += ["| model | bits per byte: mean relative drop [lo, hi] | accuracy: mean drop in points "
                      "[lo, hi] |", "|---|---|---|"]
            lines += [f"| {label} | {_unit_cell(i, BPB)} | {_unit_cell(i, ACC)} |" for label, i in others]
            lines.append("")
    failures = [(m.label, unit, err) for m in models for unit, err in m.failures.items()]
    lines += ["## Failures", ""]
    if failures:
        lines += ["| model | unit | error |", "|---|---|---|"]
        lines += [f"| {label} | {unit} | {err.replace('|', '/')} |" for label, unit, err in failures]
    else:
        lines.append("None: every unit of every model completed.")
    lines.append("")
    he = [m for m in models if any(k.startswith("humaneval.status.") for k in m.metrics)]
    if he:
        lines += ["## HumanEval outcomes", "", "| model | " + " | ".join(HUMANEVAL_STATUSES) + " | pass@1 |",
                  "|---|" + "---|" * (len(HUMANEVAL_STATUSES) + 1)]
        for m in he:
            counts = [f"{m.metrics[key]:.0f}" if (key := f"humaneval.status.{s}") in m.metrics else "-"
                      for s in HUMANEVAL_STATUSES]
            lines.append(f"| {m.label} | " + " | ".join(counts) + f" | {fmt(m.metrics.get('humaneval.pass_at_1'))} |")
        lines.append("")
    lines += ["## Where the numbers come from", "", "| model | role | computed | reused from MLflow |",
              "|---|---|---|---|"]
    lines += [f"| {m.label} | {m.role} | {', '.join(m.computed) or '-'} | {', '.join(m.reused) or '-'} |"
              for m in models]
    md = out_dir / "evaluation.md"
    md.write_text("\n".join(lines) + "\n")
    png = bar_chart(out_dir / "evaluation.png", scores, labels, tasks, title=title, highlight=candidate)
    data = {
        "title": title, "candidate": candidate, "missing_references": missing_references,
        "models": {m.label: {"role": m.role, "metrics": dict(m.metrics), "failures": dict(m.failures),
                             "computed": list(m.computed), "reused": list(m.reused)} for m in models},
        "scores": scores,
        "interference": {label: {"units": {u: {"value": e.value, "lo": e.lo, "hi": e.hi} for u, e in i.units.items()},
                                 "tasks_hurt": i.tasks_hurt if i.measured else None,
                                 "references": list(i.references), "skipped": list(i.skipped),
                                 "tasks": [{"task": t.task, "unit": t.unit, "score": t.score, "best": t.best,
                                            "best_model": t.best_model, "drop": t.drop.value, "drop_lo": t.drop.lo,
                                            "drop_hi": t.drop.hi, "relative_drop": t.relative_drop.value,
                                            "hurt": t.hurt, "items": t.items} for t in i.tasks]}
                         for label, i in inter.items()},
        "bootstrap": {"resamples": study.resamples, "level": study.level, "rng_seed": study.rng_seed},
    }
    js = out_dir / "evaluation.json"
    js.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    return mine, {"markdown": md, "json": js, "chart": png}
