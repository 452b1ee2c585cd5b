"""Comparison tables and charts: markdown, HTML and PNG from `{column: {metric: value}}`.

Used by the evaluate stage's per-run report, `fusion compare` and `fusion reproduce`. The best
value of each row is marked (lower is better for bits per byte, perplexity, NLL, loss and
interference; higher for the rest). Pure: no MLflow, no Prefect.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Mapping, Sequence

from fusion_core.interference import lower_is_better

BEST_MARK = "★"
Table = Mapping[str, Mapping[str, float]]  # column -> metric -> value


def better_low(metric: str) -> bool:
    """Direction of a compared row: interference and its drops are better low, like bits per byte."""
    return lower_is_better(metric) or metric.startswith("interference") or metric.endswith(
        (".tasks_hurt", ".failed_units"))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_columns(table: Table, metric: str, columns: Sequence[str]) -> set[str]:
    """The columns holding the best finite value of `metric` (ties all marked; none when fewer
    than 2 values or all equal)."""
    values = {c: table[c][metric] for c in columns if _finite(table.get(c, {}).get(metric))}
    if len(values) < 2 or len(set(values.values())) == 1:  # nothing to tell apart
        return set()
    best = (min if better_low(metric) else max)(values.values())
    return {c for c, v in values.items() if v == best}


def shared_metrics(table: Table, columns: Sequence[str]) -> list[str]:
    """Metrics with a finite value in every one of `columns`, sorted."""
    sets = [{m for m, v in table.get(c, {}).items() if _finite(v)} for c in columns]
    return sorted(set.intersection(*sets)) if sets else []


def fmt(v, digits: int = 4) -> str:
    if not _finite(v):
        return "-"
    if float(v).is_integer() and abs(v) >= 1:
        return str(int(v))
    return f"{v:.{digits}f}"


def markdown_table(table: Table, columns: Sequence[str], metrics: Sequence[str], *, label: str = "metric",
                   mark_best: bool = True, names: Mapping[str, str] | None = None) -> str:
    """A markdown table: a row per metric, a column per entry of `columns`, best marked ★."""
    names = names or {}
    head = [label, *[names.get(c, c) for c in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in metrics:
        best = best_columns(table, m, columns) if mark_best else set()
        cells = [fmt(table.get(c, {}).get(m)) + (f" {BEST_MARK}" if c in best else "") for c in columns]
        arrow = "↓" if better_low(m) else "↑"
        lines.append(f"| {m} {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(table: Table, columns: Sequence[str], metrics: Sequence[str], *, label: str = "metric",
               names: Mapping[str, str] | None = None) -> str:
    names = names or {}
    out = ["<table>", "<thead><tr><th>" + html.escape(label) + "</th>"
           + "".join(f"<th>{html.escape(names.get(c, c))}</th>" for c in columns) + "</tr></thead><tbody>"]
    for m in metrics:
        best = best_columns(table, m, columns)
        arrow = "↓" if better_low(m) else "↑"
        cells = "".join(
            f"<td class=\"{'best' if c in best else ''}\">{html.escape(fmt(table.get(c, {}).get(m)))}"
            f"{' ' + BEST_MARK if c in best else ''}</td>" for c in columns)
        out.append(f"<tr><th>{html.escape(m)} {arrow}</th>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def html_page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f4f4f4}"
             "td.best{background:#e3f6e3;font-weight:bold} img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def bar_chart(path: Path, table: Table, columns: Sequence[str], metrics: Sequence[str], *, title: str,
              highlight: str | None = None, names: Mapping[str, str] | None = None,
              errors: Table | None = None) -> Path:
    """A PNG with one small bar chart per metric (a bar per column, `highlight` in a strong
    colour, the best bar outlined), written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    metrics = list(metrics)
    n = max(1, len(metrics))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 0.9 + 2.9 * rows), squeeze=False)
    labels = [names.get(c, c) for c in columns]
    for ax, m in zip(axes.flat, metrics):
        values = [table.get(c, {}).get(m, float("nan")) for c in columns]
        err = [errors.get(c, {}).get(m, 0.0) for c in columns] if errors else None
        colours = ["#d95f02" if c == highlight else "#7570b3" for c in columns]
        bars = ax.bar(range(len(columns)), [v if _finite(v) else 0 for v in values], color=colours, yerr=err,
                      capsize=3 if err else 0)
        for c, bar in zip(columns, bars):
            if c in best_columns(table, m, columns):
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
        finite = [v for v in values if _finite(v)]
        if finite and better_low(m):  # lower-better scores differ little: zoom on their range
            lo, hi = min(finite), max(finite)
            pad = (hi - lo) * 0.3 or abs(hi) * 0.05 or 0.05
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_title(f"{m} {'↓' if better_low(m) else '↑'}", fontsize=9)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
