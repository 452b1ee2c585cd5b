"""The evaluate stage's report: every evaluated model's scores, the candidate's knowledge
interference against its references, failures and reuse, as markdown, JSON and a PNG chart."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fusion_core.evaluation import json_safe
from fusion_core.interference import Interference, interference, primary_scores
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


def interference_of(models: list[ModelEvaluation], candidate: str) -> tuple[dict[str, dict[str, float]], dict]:
    """The score table `{label: {task: score}}` and the interference of every non-reference model
    against the references (`role == "reference"`): `{label: Interference}`."""
    scores = {m.label: primary_scores(m.metrics) for m in models}
    refs = [m.label for m in models if m.role == "reference"]
    tasks = list(scores.get(candidate, {}))
    result = {m.label: interference(m.label, scores, refs, tasks) for m in models
              if m.role != "reference" or m.label == candidate}
    return scores, result


def write_report(out_dir: Path, *, title: str, models: list[ModelEvaluation], candidate: str,
                 missing_references: list[str]) -> tuple[Interference, dict[str, Path]]:
    """Write evaluation.md, evaluation.json and evaluation.png into `out_dir`; return the
    candidate's Interference and the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, inter = interference_of(models, candidate)
    mine = inter[candidate]
    labels = [m.label for m in models]
    tasks = list(scores.get(candidate, {}))
    lines = [f"# {title}", ""]
    refs = [m.label for m in models if m.role == "reference"]
    lines += ["## Scores", "",
              "The primary score of each task (↑ higher is better, ↓ lower is better); ★ marks the best.", "",
              markdown_table(scores, labels, tasks, label="task"), ""]
    lines += ["## Knowledge interference of the candidate", ""]
    if missing_references:
        lines += [f"**Missing references:** {', '.join(missing_references)} (not trained yet: `fusion reproduce`, "
                  f"or `evaluation.train_references: true`). The numbers below compare against "
                  f"{', '.join(refs) or 'no reference'} only.", ""]
    if mine.value is None:
        lines += ["Not measured: no reference model scored the candidate's tasks.", ""]
    else:
        lines += [f"Against the best of {', '.join(refs)} on each task (METHOD.md): drop = how far the candidate "
                  "falls behind it, 0 when it does not.", "",
                  "| task | candidate | best reference | which | drop | relative drop |", "|---|---|---|---|---|---|"]
        for t in mine.tasks:
            lines.append(f"| {t.task} | {fmt(t.score)} | {fmt(t.best)} | {t.best_model} | {fmt(t.drop)} | "
                         f"{t.relative_drop:.1%} |")
        lines += ["", f"- **interference = {mine.value:.4f}** (mean drop / mean best score)",
                  f"- tasks hurt: {mine.tasks_hurt} of {len(mine.tasks)}",
                  f"- mean relative drop: {mine.mean_relative_drop:.2%}", ""]
        others = [(label, i) for label, i in inter.items() if i.value is not None]
        if len(others) > 1:
            lines += ["| model | interference | tasks hurt | mean relative drop |", "|---|---|---|---|"]
            lines += [f"| {label} | {i.value:.4f} | {i.tasks_hurt} of {len(i.tasks)} | {i.mean_relative_drop:.2%} |"
                      for label, i in others]
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
        "interference": {label: {"value": i.value, "tasks_hurt": i.tasks_hurt if i.value is not None else None,
                                 "mean_relative_drop": i.mean_relative_drop, "references": list(i.references),
                                 "skipped": list(i.skipped),
                                 "tasks": [{"task": t.task, "score": t.score, "best": t.best,
                                            "best_model": t.best_model, "drop": t.drop} for t in i.tasks]}
                         for label, i in inter.items()},
    }
    js = out_dir / "evaluation.json"
    js.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    return mine, {"markdown": md, "json": js, "chart": png}
